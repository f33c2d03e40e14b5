"""A lock's life is visible: log lines, the lock_released and lock_taken_over signals, Prometheus counters."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, chain
from prometheus_client import REGISTRY

from celery_unique import DuplicateTaskError, UniqueLocks, UniqueTask, lock_released, lock_taken_over
from celery_unique.testing import RedisServer
from tests.conftest import BROKER_DB, LOCK_DB, RESULT_DB
from tests.lifecycle_support import Lifecycle

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def received() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """What lock_released and lock_taken_over said while the test ran."""
    heard: list[tuple[str, dict[str, Any]]] = []

    def on_released(sender: Any = None, **kwargs: Any) -> None:
        heard.append(("released", {"sender": sender, **kwargs}))

    def on_taken_over(sender: Any = None, **kwargs: Any) -> None:
        heard.append(("taken_over", {"sender": sender, **kwargs}))

    lock_released.connect(on_released, weak=False)
    lock_taken_over.connect(on_taken_over, weak=False)
    yield heard
    lock_released.disconnect(on_released)
    lock_taken_over.disconnect(on_taken_over)


def counted(name: str, task: str) -> float:
    return REGISTRY.get_sample_value(f"celery_unique_{name}_total", {"task": task}) or 0.0


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    ours = [r for r in caplog.records if r.name.startswith("celery_unique")]
    return [r.getMessage() for r in ours if r.levelno == level]


def test_taken_released_and_kept_are_logged_at_debug(
    eager: Celery, caplog: pytest.LogCaptureFixture, received: list[Any]
) -> None:
    """DEBUG lines say when a lock is taken, released and kept, with the reason; lock_released is sent."""

    @eager.task(base=UniqueTask, name="tests.events_ok")
    def ok(n: int) -> int:
        return n

    @eager.task(base=UniqueTask, name="tests.events_fails")
    def fails(n: int) -> None:
        raise RuntimeError(n)

    with caplog.at_level(logging.DEBUG, logger="celery_unique"):
        ok.apply_async((1,), unique=60)
        with pytest.raises(RuntimeError):
            fails.apply_async((1,), unique=60)
    debug = messages(caplog, logging.DEBUG)
    assert any("tests.events_ok" in m and "took lock" in m for m in debug), debug
    assert any("released lock" in m and "tests.events_ok" in m and "(success)" in m for m in debug), debug
    assert any("kept lock" in m and "unique_until='success'" in m for m in debug), debug
    assert [kind for kind, said in received if said["sender"] == "tests.events_ok"] == ["released"]
    (said,) = [said for _, said in received]
    assert said["reason"] == "success"
    assert said["key"].startswith("unique:celery:tests.events_ok:")


def test_take_over_and_reap_are_logged_at_info_and_signalled(
    celery_app: Celery, tasks: Any, caplog: pytest.LogCaptureFixture, received: list[Any]
) -> None:
    """Taking a finished holder's lock over, or reaping it, is an INFO line and a lock_taken_over."""
    task = tasks.send_report
    first = task.apply_async((1,), unique=60)
    celery_app.backend.mark_as_done(first.id, "done")  # finished, but never released
    with caplog.at_level(logging.INFO, logger="celery_unique"):
        second = task.apply_async((1,), unique=60)
        celery_app.backend.mark_as_done(second.id, "done")
        assert UniqueLocks(celery_app).reap() == 1
    info = messages(caplog, logging.INFO)
    assert any("took over lock" in m and first.id in m and second.id in m for m in info), info
    assert any("reaped lock" in m and second.id in m for m in info), info
    taken = [said for kind, said in received if kind == "taken_over"]
    assert [(s["holder"], s["task_id"], s["state"]) for s in taken] == [
        (first.id, second.id, "SUCCESS"), (second.id, "", "SUCCESS"),
    ]


def test_counters_count_each_event_by_task(eager: Celery) -> None:
    """The Prometheus counters count taken, refused and released locks, by task name."""

    @eager.task(base=UniqueTask, name="tests.events_counted")
    def counted_task(n: int) -> int:
        return n

    name = counted_task.name
    before = {event: counted(event, name) for event in ("taken", "refused", "released")}
    eager.conf.task_always_eager = False
    counted_task.apply_async((7,), unique=60)
    with pytest.raises(DuplicateTaskError):
        counted_task.apply_async((7,), unique=60)
    eager.conf.task_always_eager = True
    counted_task.apply_async((8,), unique=60)  # runs here, and releases
    assert counted("taken", name) == before["taken"] + 2
    assert counted("refused", name) == before["refused"] + 1
    assert counted("released", name) == before["released"] + 1


def test_store_errors_are_counted(redis_server: RedisServer) -> None:
    """A lock store that does not answer counts a store error for the task."""
    from celery_unique.testing import free_port

    app = Celery("events-down", broker=redis_server.url(BROKER_DB), set_as_current=False)
    app.conf.update(unique_redis_url=f"redis://127.0.0.1:{free_port()}/0", unique_redis_socket_timeout=0.5)

    @app.task(base=UniqueTask, name="tests.events_down", shared=False)
    def down() -> None:
        pass

    before = counted("store_errors", "tests.events_down")
    with pytest.raises(Exception, match="did not answer"):
        down.apply_async(unique=60)
    assert counted("store_errors", "tests.events_down") == before + 1


def test_without_prometheus_client_counting_does_nothing() -> None:
    """Without prometheus_client installed, the counters are functions that do nothing."""
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "from celery_unique import metrics\n"
        "assert all(f is metrics._nothing for f in (metrics.taken, metrics.refused, metrics.released,"
        " metrics.taken_over, metrics.store_error))\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_refused_chain_link_is_one_info_line_in_the_worker(redis_server: RedisServer, tmp_path: Path) -> None:
    """A chain link refused as a worker sends it costs one INFO line and no traceback."""
    life = Lifecycle.on(redis_server)
    app = life.app()
    double = app.tasks["life.double"]
    log = tmp_path / "worker.log"
    with life.worker(log):
        holder = double.apply_async((2,), unique=60, countdown=60)
        result = chain(double.s(1).set(unique=60), double.s().set(unique=60)).apply_async()
        with pytest.raises(DuplicateTaskError):
            result.get(timeout=15)
        holder.revoke()
    text = log.read_text()
    assert "Traceback" not in text
    refusals = [line for line in text.splitlines() if "refused duplicate" in line]
    assert len(refusals) == 1, refusals
    assert "INFO" in refusals[0]


def test_a_script_whose_chain_was_refused_exits_quietly(redis_server: RedisServer) -> None:
    """A script that saw its chain refused prints nothing at interpreter exit (no ImportError, no warning)."""
    code = f"""
from celery import Celery, chain
from celery_unique import DuplicateTaskError, UniqueTask

app = Celery("quiet", broker={redis_server.url(BROKER_DB)!r}, backend={redis_server.url(RESULT_DB)!r})
app.conf.update(unique_redis_url={redis_server.url(LOCK_DB)!r}, broker_connection_retry_on_startup=False)

@app.task(base=UniqueTask, name="quiet.double")
def double(x):
    return 2 * x

holder = double.apply_async((1,), unique=60, countdown=60)
try:
    chain(double.s(1).set(unique=60), double.s()).apply_async()
except DuplicateTaskError:
    pass
holder.revoke()
# A module-level AsyncResult that lives until interpreter exit unsubscribes
# from the result backend as Python shuts down, and redis-py then fails to
# import: plain Celery does that too (redis-py 8). The refused chain must
# leave nothing of its own behind.
del holder
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
