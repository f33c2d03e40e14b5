"""Producer memory: a unique enqueue keeps no more per call than a plain Celery one.

Each path runs on an app of its own (same settings as the suite: Redis broker,
Redis result backend, Redis locks), ``WARMUP`` calls and then two batches of
``CALLS`` calls, under ``tracemalloc``. Each batch gives two figures per call:

* ``retained``: still allocated after a full ``gc.collect()``, i.e. memory
  that grows with every call for the life of the process;
* ``cyclic``: freed only by the cyclic garbage collector (automatic collection
  is off during the batch, then a young-generation collection frees it),
  i.e. memory that piles up between the collector's full passes.

Each measurement runs in a fresh interpreter (a ``spawn`` child) where the
calling thread is the only one: ``tracemalloc`` counts every thread's
allocations, and a test runner's own threads (pytest-xdist's channel to its
controller) allocate while a batch runs.

Results are ignored (``task_ignore_result``, and ``ignore_result=True`` for
``send_task``). With a Redis result backend, plain Celery itself keeps about
240 bytes a call: every published task leaves its result channel in redis-py's
``PubSub.channels`` and ``pending_unsubscribe_channels`` until the producer
reads its pubsub connection, which a producer that never waits on results
never does, and the growth of those tables makes per-batch figures swing by
more than the margin (see docs/reliability.md). Without it plain Celery keeps
nothing per call, so whatever a unique path keeps is its own. Byte counts, not
times: the figures do not depend on the machine's load.
"""

from __future__ import annotations

import gc
import itertools
import multiprocessing
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from celery import Celery

from celery_unique import DuplicateTaskError, UniqueTask, send_unique

#: Calls before measuring. Past 1,024: Python 3.10 gives a function its
#: opcache on its 1,024th call, a one-off allocation per function.
WARMUP = 1100
#: Of which the last ones run under ``tracemalloc``: the first calls traced
#: allocate once what tracing itself needs.
TRACED_WARMUP = 100
#: Large enough that a table or cache of Celery's, kombu's or the
#: interpreter's growing once in a batch (a few KB) stays inside MARGIN; the
#: traced calls are most of this file's time (about 3 ms each).
CALLS = 600
#: Bytes per call a path may keep beyond its baseline: far below one retained
#: object of the call (a task id alone is 85 bytes), above allocator noise.
MARGIN = 16
TTL = 600


@dataclass(frozen=True)
class Batch:
    """Bytes per call one batch left behind."""

    retained: float
    cyclic: float

    def __str__(self) -> str:
        return f"retained {self.retained:.1f} B/call, cyclic {self.cyclic:.1f} B/call"


def report(user_id: int, period: str = "daily") -> str:
    """The body of every task here; no worker runs it."""
    return f"{user_id} {period}"


def measure(call: Callable[[int], Any]) -> list[Batch]:
    """Run ``call(i)`` ``WARMUP`` times, then two batches of ``CALLS``; return both batches."""
    numbers = itertools.count(1)
    for _ in range(WARMUP - TRACED_WARMUP):
        call(next(numbers))
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    batches = []
    try:
        for _ in range(TRACED_WARMUP):
            call(next(numbers))
        for _ in range(2):
            gc.collect()
            start = tracemalloc.get_traced_memory()[0]
            gc.disable()
            try:
                for _ in range(CALLS):
                    call(next(numbers))
                uncollected = tracemalloc.get_traced_memory()[0]
                # Everything the batch made is in the young generation: this
                # frees exactly the batch's garbage cycles, and no free lists.
                gc.collect(0)
                cycles_freed = uncollected - tracemalloc.get_traced_memory()[0]
            finally:
                gc.enable()
            gc.collect()
            retained = tracemalloc.get_traced_memory()[0] - start
            batches.append(Batch(retained / CALLS, cycles_freed / CALLS))
    finally:
        if not tracing:
            tracemalloc.stop()
    return batches


# The paths: each takes an app and returns call(i), one enqueue whose
# arguments ``i`` makes new (a refused duplicate repeats the held call).


def plain_apply_async(app: Celery) -> Callable[[int], Any]:
    return lambda i: app.tasks["memory.plain"].apply_async((i,))


def unique_apply_async(app: Celery) -> Callable[[int], Any]:
    return lambda i: app.tasks["memory.unique"].apply_async((i,), unique=TTL)


def plain_send_task(app: Celery) -> Callable[[int], Any]:
    return lambda i: app.send_task("elsewhere.charge", (i,), ignore_result=True)


def send_unique_unknown(app: Celery) -> Callable[[int], Any]:
    return lambda i: send_unique(app, "elsewhere.charge", (i,), unique=TTL, ignore_result=True)


def send_unique_plain_task(app: Celery) -> Callable[[int], Any]:
    return lambda i: send_unique(app, "memory.plain", (i,), unique=TTL, ignore_result=True)


def refused_raise(app: Celery) -> Callable[[int], Any]:
    task = app.tasks["memory.unique"]
    task.apply_async((0,), unique=TTL)

    def call(i: int) -> None:
        try:
            task.apply_async((0,), unique=TTL)
        except DuplicateTaskError:
            pass
        else:
            raise AssertionError("the duplicate was published")

    return call


def refused_existing(app: Celery) -> Callable[[int], Any]:
    task = app.tasks["memory.unique"]
    task.apply_async((0,), unique=TTL)
    return lambda i: task.apply_async((0,), unique=TTL, on_duplicate="existing")


def new_app(config: dict[str, Any]) -> Celery:
    """A fresh app on the suite's Redis, with a plain and a unique ``report`` task."""
    app = Celery("memory", set_as_current=False)
    app.conf.update(config, task_ignore_result=True)
    # shared=False: these tasks must not join every app made later.
    app.task(name="memory.plain", shared=False)(report)
    app.task(name="memory.unique", base=UniqueTask, shared=False)(report)
    return app


PATHS = {
    path.__name__: path
    for path in (
        plain_apply_async,
        unique_apply_async,
        plain_send_task,
        send_unique_unknown,
        send_unique_plain_task,
        refused_raise,
        refused_existing,
    )
}


def measure_path(config: dict[str, Any], name: str) -> list[Batch]:
    """Measure the path called ``name`` on a fresh app (runs in the child)."""
    app = new_app(config)
    try:
        return measure(PATHS[name](app))
    finally:
        app.close()


def measured(config: dict[str, Any], *names: str) -> dict[str, list[Batch]]:
    """Measure each named path, one after the other, in a fresh interpreter of their own."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as child:
        return {name: child.submit(measure_path, config, name).result() for name in names}


@pytest.fixture(scope="module")
def plain_celery(celery_config: dict[str, Any]) -> dict[str, list[Batch]]:
    """Plain Celery's figures, measured once for the module, each on an app of its own."""
    return measured(celery_config, plain_apply_async.__name__, plain_send_task.__name__)


def assert_within(path: str, measured: list[Batch], baseline: list[Batch], name: str) -> None:
    """Fail if ``path`` keeps, over both batches, more than ``name`` by over ``MARGIN`` a call.

    Over both batches: a cache or table of Celery's or kombu's that grows now
    and then lands in one batch or the other, while what a call keeps shows
    in both.
    """
    pairs = list(zip(measured, baseline, strict=True))
    figures = "; ".join(f"batch {n}: {path} {m}, {name} {b}" for n, (m, b) in enumerate(pairs, 1))
    print(figures)
    kept = sum(m.retained for m in measured) / len(measured)
    kept_baseline = sum(b.retained for b in baseline) / len(baseline)
    cyclic = sum(m.cyclic for m in measured) / len(measured)
    cyclic_baseline = sum(b.cyclic for b in baseline) / len(baseline)
    assert kept <= kept_baseline + MARGIN, f"{path} keeps more than {name}: {figures}"
    assert cyclic <= cyclic_baseline + MARGIN, f"{path} leaves more garbage cycles than {name}: {figures}"


@pytest.mark.parametrize(
    ("path", "baseline"),
    [
        (unique_apply_async, plain_apply_async),
        (send_unique_unknown, plain_send_task),
        (send_unique_plain_task, plain_send_task),
    ],
    ids=["apply_async", "send_unique-unknown-task", "send_unique-plain-task"],
)
def test_unique_enqueue_keeps_no_more_than_plain_celery(
    celery_config: dict[str, Any],
    plain_celery: dict[str, list[Batch]],
    path: Callable[[Celery], Callable[[int], Any]],
    baseline: Callable[[Celery], Callable[[int], Any]],
) -> None:
    """A published unique enqueue keeps, and leaves to the cyclic GC, no more per call than plain Celery."""
    unique = measured(celery_config, path.__name__)[path.__name__]
    assert_within(path.__name__, unique, plain_celery[baseline.__name__], baseline.__name__)


@pytest.mark.parametrize("path", [refused_raise, refused_existing], ids=["raise", "existing"])
def test_refused_duplicate_keeps_nothing(
    celery_config: dict[str, Any], path: Callable[[Celery], Callable[[int], Any]]
) -> None:
    """A refused duplicate publishes nothing, so it keeps (and leaves to the cyclic GC) nothing per call."""
    nothing = [Batch(0.0, 0.0)] * 2
    assert_within(path.__name__, measured(celery_config, path.__name__)[path.__name__], nothing, "nothing")
