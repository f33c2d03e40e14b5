"""The app that :mod:`benchmarks.worker` runs its workers on: one variant's task, and no other library.

A worker is started as ``python -m benchmarks.worker_app worker ...``, which
is the ``celery`` command (``python -m celery -A benchmarks.worker_app worker
...``) with the variant, the Redis URL and the batch size in the environment
(``BENCH_WORKER_*``, set by :mod:`benchmarks.worker`). Only the variant's own
library is imported, so that a plain worker carries none of celery-unique's,
celery-once's or celery-singleton's signal receivers or threads.

That takes one step more for celery-unique: its ``celery unique`` subcommand
is a ``celery.commands`` entry point, which the ``celery`` command imports
at its start, and with it the whole package, receivers and revoke watcher
included, into every worker of an environment where it is installed. The
launcher leaves that entry point out for the variants that do not use
celery-unique, except ``plain+installed``: a plain task's worker in an
environment where celery-unique is installed, to measure just that.

The timing happens in the process that runs the tasks (the pool child with
prefork, the worker itself with solo and threads), with no Redis command of
its own: ``task_prerun`` and ``task_postrun`` stamp ``time.perf_counter()``
into process memory, and the last ``task_postrun`` of each batch of
``BENCH_WORKER_TASKS`` runs writes the batch's stamps, once, to a file named
after ``BENCH_WORKER_DONE``. The receivers are
connected after the variant's library is imported, so the last stamp comes
after that library's own end-of-run work (celery-unique's receivers are
connected at its import; celery-once and celery-singleton release their
locks in ``after_return`` and ``on_success``, which Celery calls before
``task_postrun``).
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import os
import sys
import threading
import time
from typing import Any

from celery import Celery
from celery.signals import task_postrun, task_prerun

#: Lock TTL of every variant, in seconds.
TTL = 60
#: Key prefix of celery-singleton's locks.
SINGLETON_PREFIX = "bench-worker-singleton:"
#: The variants, in the order they are reported: name -> (library, acks_late).
VARIANTS: dict[str, tuple[str, bool]] = {
    "plain": ("celery", False),
    "unique": ("celery-unique", False),
    "celery-once": ("celery-once", False),
    "celery-singleton": ("celery-singleton", False),
    "plain+acks_late": ("celery", True),
    "unique+acks_late": ("celery-unique", True),
    # A plain task, its worker started with celery-unique's entry point loaded.
    "plain+installed": ("celery", False),
}


def queue_of(variant: str) -> str:
    """The default queue of ``variant``'s task (:mod:`benchmarks.worker` routes to one per pool)."""
    return "bench.worker." + variant.replace("+", "-")


def task_name(variant: str) -> str:
    return "benchmarks.worker." + variant.replace("+", "_").replace("-", "_")


def noop(i: int) -> None:
    """Every variant's task body: nothing, so that the worker's own cost is all there is."""


def build(variant: str, url: str) -> tuple[Celery, Any]:
    """The app of ``variant``, with broker and locks at ``url``, and its one task."""
    library, acks_late = VARIANTS[variant]
    queue = queue_of(variant)
    app = Celery("benchmarks.worker_app", set_as_current=False)
    app.conf.update(
        broker_url=url,
        broker_connection_retry_on_startup=False,
        task_default_queue=queue,
        # No result backend and ignored results: the plain run stores nothing.
        result_backend=None,
        task_ignore_result=True,
        worker_hijack_root_logger=True,
    )
    options: dict[str, Any] = {"name": task_name(variant), "acks_late": acks_late}
    if library == "celery-unique":
        from celery_unique import UniqueTask

        app.conf.unique_redis_url = url
        options["base"] = UniqueTask
    elif library == "celery-once":
        from celery_once import QueueOnce

        app.conf.ONCE = {
            "backend": "celery_once.backends.Redis", "settings": {"url": url, "default_timeout": TTL},
        }
        options.update(base=QueueOnce, once={"graceful": True})
    elif library == "celery-singleton":
        from celery_singleton import Singleton

        app.conf.update(
            singleton_backend_url=url, singleton_key_prefix=SINGLETON_PREFIX, singleton_lock_expiry=TTL,
        )
        options["base"] = Singleton
    return app, app.task(**options)(noop)


class _Stamps:
    """The timing of each batch of ``tasks`` runs in this process, written once at the batch's end.

    A worker drains one batch after another; batch ``k`` is the runs numbered
    ``k * tasks`` to ``(k + 1) * tasks - 1``, its stamps go to
    ``<path>.<k>.json``. Its window starts as its run numbered ``warmup``
    begins, and ends as its last run ends.
    """

    def __init__(self, tasks: int, warmup: int, path: str) -> None:
        self.tasks, self.warmup, self.path = tasks, warmup, path
        # next() on a count is atomic under the GIL: the threads pool's
        # threads share these without a lock.
        self.started = itertools.count()
        self.ended = itertools.count(1)
        self.start = self.start_cpu = 0.0

    def prerun(self, **_: Any) -> None:
        now = time.perf_counter()
        if next(self.started) % self.tasks == self.warmup:
            self.start = now
            self.start_cpu = time.process_time()
            if _profile is not None:
                _profile.reset()

    def postrun(self, **_: Any) -> None:
        ended = next(self.ended)
        if ended % self.tasks:
            return
        end = time.perf_counter()
        stamps = {
            "start": self.start, "end": end, "pid": os.getpid(),
            # CPU time of this whole process (all its threads) over the window.
            "cpu": time.process_time() - self.start_cpu,
            "threads": sorted(t.name for t in threading.enumerate()),
            "profile": _profile.sums if _profile is not None else None,
        }
        path = f"{self.path}.{ended // self.tasks - 1}.json"
        with open(path + ".tmp", "w", encoding="utf-8") as file:
            json.dump(stamps, file)
        os.replace(path + ".tmp", path)


class _Profile:
    """Wall time spent in celery-unique's steps of a run, in this process (``BENCH_WORKER_PROFILE``).

    Each step is timed in place, with ``time.perf_counter()``, around the
    function celery-unique itself calls: the run's beginning at
    ``task_prerun``, ``UniqueTask.before_start``, the run's end at
    ``task_postrun``, and within that end the one lock-store round trip
    (``LockStore.end``). Sums since the current batch's window began.
    """

    STEPS = ("begin_run", "before_start", "end_run", "LockStore.end")

    def __init__(self) -> None:
        self.sums = dict.fromkeys(self.STEPS, 0.0)

    def reset(self) -> None:
        self.sums = dict.fromkeys(self.STEPS, 0.0)

    def timed(self, step: str, function: Any) -> Any:
        clock = time.perf_counter

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return function(*args, **kwargs)
            finally:
                self.sums[step] += clock() - start

        return wrapper

    def install(self) -> None:
        from celery_unique import UniqueTask, lock, signals

        signals.begin_run = self.timed("begin_run", signals.begin_run)
        signals.end_run = self.timed("end_run", signals.end_run)
        UniqueTask.before_start = self.timed("before_start", UniqueTask.before_start)
        lock.LockStore.end = self.timed("LockStore.end", lock.LockStore.end)


_profile: _Profile | None = None


def without_entry_points_of(package: str) -> None:
    """Make ``importlib.metadata.entry_points`` leave out ``package``'s ``celery.commands``."""
    original = importlib.metadata.entry_points

    def entry_points(**params: Any) -> Any:
        found: Any = original(**params)
        if params.get("group") != "celery.commands":
            return found
        return importlib.metadata.EntryPoints(
            point for point in found if point.value.partition(":")[0].partition(".")[0] != package
        )

    importlib.metadata.entry_points = entry_points


def main() -> None:
    """``python -m benchmarks.worker_app <celery worker arguments>``: the ``celery`` command on this app."""
    variant = os.environ["BENCH_WORKER_VARIANT"]
    if VARIANTS[variant][0] != "celery-unique" and variant != "plain+installed":
        # Before celery.bin.celery is imported: it loads the entry points at its import.
        without_entry_points_of("celery_unique")
    from celery.__main__ import main as celery_main

    sys.argv = ["celery", "-A", "benchmarks.worker_app", *sys.argv[1:]]
    celery_main()


if __name__ == "__main__":
    main()
elif os.environ.get("BENCH_WORKER_VARIANT"):
    _variant = os.environ["BENCH_WORKER_VARIANT"]
    app, task = build(_variant, os.environ["BENCH_WORKER_URL"])
    if os.environ.get("BENCH_WORKER_PROFILE") and VARIANTS[_variant][0] == "celery-unique":
        _profile = _Profile()
        _profile.install()
    _stamps = _Stamps(
        int(os.environ["BENCH_WORKER_TASKS"]), int(os.environ["BENCH_WORKER_WARMUP"]),
        os.environ["BENCH_WORKER_DONE"],
    )
    # No sender filter: the worker runs this one task (and ``task`` may be a
    # proxy of it, which a sender filter would not match).
    task_prerun.connect(_stamps.prerun, weak=False)
    task_postrun.connect(_stamps.postrun, weak=False)
