"""The lock protocol against real workers: copies that come back late, retries, purge, rpc://, crashes.

Each test is a case the previous design got wrong (docs/protocol.md says why
each now holds). Real prefork workers on the suite's Redis, or an rpc://
result backend.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import chain, chord, group, states

from celery_unique import DuplicateTaskError, UniqueLocks, send_unique
from celery_unique.lock import running_marker_key
from celery_unique.testing import RedisServer
from tests.conftest import wait_until
from tests.lifecycle_app import QUEUE
from tests.lifecycle_support import REDELIVER, Lifecycle, events, lock_of, park, stored, wait_event
from tests.versions import QUICK_REDELIVERY, needs_quick_redelivery

pytestmark = pytest.mark.slow
quick_redelivery = pytest.mark.skipif(not QUICK_REDELIVERY, reason=needs_quick_redelivery)


def refused(app: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> bool:
    """Whether enqueueing the call now is refused as a duplicate."""
    try:
        result = app.tasks[name].apply_async(args, kwargs or {}, unique=60, countdown=600)
    except DuplicateTaskError:
        return True
    result.revoke()
    return False


@quick_redelivery
def test_held_back_copy_that_comes_back_late_is_dropped(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """A copy held back while its task ran, and run only long after that task ended, is dropped."""
    life = Lifecycle.on(redis_server, **REDELIVER)
    app, scratch = life.app(), life.scratch_client()
    work = app.tasks["life.work"]
    log = tmp_path / "worker.log"
    with life.worker(log, concurrency=2):
        # Its message is restored while it runs (visibility_timeout 2 s,
        # checked every second), with a second to spare on a loaded machine.
        work.apply_async(("late",), {"seconds": 4}, unique=60)
        wait_until(lambda: "already running elsewhere" in log.read_text(), timeout=15, what="a held copy")
        # Both processes busy for long after "late" ends: its held copy comes
        # back well after three of its marker's TTLs.
        for n in range(2):
            work.apply_async((f"blocker-{n}",), {"seconds": 6})
        wait_event(scratch, "late", "end")
        wait_until(lambda: "has already run" in log.read_text(), timeout=30, what="the late copy dropped")
    assert events(scratch, "late") == ["start", "end"]


@quick_redelivery
def test_countdown_longer_than_the_visibility_timeout_runs_once(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """An eta past visibility_timeout, acknowledged on receipt: its restored copies never run it twice."""
    conf = {**REDELIVER, "task_acks_late": False}
    life = Lifecycle.on(redis_server, **conf)
    app, scratch = life.app(), life.scratch_client()
    with life.worker(tmp_path / "worker.log", concurrency=2):
        result = app.tasks["life.work"].apply_async(("eta",), {"seconds": 1}, unique=60, countdown=4)
        assert result.get(timeout=20) == "eta"
        time.sleep(4)  # every restored copy has come due
    assert events(scratch, "eta") == ["start", "end"]


def test_plain_task_reenqueued_right_after_its_result_is_never_refused(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """send_unique to a plain task: enqueueing it again as soon as result.get() returns is accepted."""
    life = Lifecycle.on(redis_server)
    app = life.app()
    with life.worker(tmp_path / "worker.log"):
        for _ in range(100):
            send_unique(app, "life.plain_work", ("again",), unique=60).get(timeout=10)


@quick_redelivery
def test_plain_task_copy_beside_the_first_never_releases(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """A plain task's redelivered copy runs beside the first (said in a warning) and leaves the lock alone."""
    life = Lifecycle.on(redis_server, **REDELIVER)
    app, scratch = life.app(), life.scratch_client()
    log = tmp_path / "worker.log"
    with life.worker(log, concurrency=2):
        result = send_unique(app, "life.plain_work", ("plain-copy",), {"seconds": 4}, unique=60)
        (key,) = [lock.key for lock in UniqueLocks(app).list()]
        wait_until(lambda: len([e for e in events(scratch, "plain-copy") if e == "start"]) == 2,
                   timeout=15, what="the copy runs")
        assert "runs while another copy of it runs" in log.read_text()
        while "end" not in events(scratch, "plain-copy"):
            assert locks.get(key) == result.id.encode()
            time.sleep(0.1)


@quick_redelivery
def test_purge_keeps_the_lock_of_a_task_that_runs(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """A purge that takes a redelivered copy off the queue leaves the lock of the copy that runs."""
    life = Lifecycle.on(redis_server, **REDELIVER)
    app, scratch = life.app(), life.scratch_client()
    broker = redis_server.client(0)
    with life.worker(tmp_path / "worker.log"):
        result = app.tasks["life.work"].apply_async(("purged-copy",), {"seconds": 5}, unique=60)
        key = lock_of(app, "life.work", ("purged-copy",), {"seconds": 5})
        wait_event(scratch, "purged-copy", "start")
        wait_until(lambda: broker.llen(QUEUE) == 1, timeout=15, what="the copy restored to the queue")
        purged = UniqueLocks(app).purge([QUEUE])
        assert (purged.messages, purged.released) == (1, 0)
        assert locks.get(key) == result.id.encode()
        assert result.get(timeout=20) == "purged-copy"
        wait_until(lambda: not locks.exists(key), what="released at the end")
    assert events(scratch, "purged-copy") == ["start", "end"]


def test_retry_without_throw_keeps_the_lock_while_the_retry_waits(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """retry(throw=False) stores SUCCESS for the attempt, yet the lock stays with the waiting retry."""
    life = Lifecycle.on(redis_server)
    app, scratch = life.app(), life.scratch_client()
    with life.worker(tmp_path / "worker.log"):
        result = app.tasks["life.retry_no_throw"].apply_async(("nothrow",), {"countdown": 3}, unique=60)
        key = lock_of(app, "life.retry_no_throw", ("nothrow",), {"countdown": 3})
        wait_until(lambda: stored(app, result.id) == states.SUCCESS, what="the first attempt's SUCCESS")
        assert refused(app, "life.retry_no_throw", ("nothrow",), {"countdown": 3})
        assert locks.get(key) == result.id.encode()
        assert (locks.get(running_marker_key(key, result.id)) or b"").startswith(b"q|0|1|")
        wait_until(lambda: events(scratch, "nothrow") == ["start", "start"], what="the retry runs")
        wait_until(lambda: not locks.exists(key), what="released after the retry")


@pytest.fixture
def rpc_life(redis_server: RedisServer) -> Lifecycle:
    life = Lifecycle.on(redis_server)
    life.backend = "rpc://"
    return life


def test_rpc_refused_chain_link_fails_the_chain_at_once(rpc_life: Lifecycle, tmp_path: Path) -> None:
    """With an rpc:// backend, a chain whose link is refused fails at once; its first step kept its result."""
    app = rpc_life.app()
    double = app.tasks["life.double"]
    with rpc_life.worker(tmp_path / "worker.log"):
        holder = park(app, 2)
        result = chain(double.s(1).set(unique=60), double.s().set(unique=60)).apply_async()
        with pytest.raises(DuplicateTaskError) as info:
            result.get(timeout=15)
        assert info.value.task_id == holder.id
        assert result.parent.get(timeout=15) == 2
        holder.revoke()


def test_rpc_refused_group_member_fails_at_once(rpc_life: Lifecycle, tmp_path: Path) -> None:
    """With an rpc:// backend, a refused group member's result raises at once; the others run."""
    app = rpc_life.app()
    double = app.tasks["life.double"]
    with rpc_life.worker(tmp_path / "worker.log"):
        holder = park(app, 4)
        members = [double.s(x).set(unique=60, on_duplicate="existing") for x in (1, 4, 5)]
        result = group(members).apply_async()
        assert result.results[0].get(timeout=15) == 2
        with pytest.raises(DuplicateTaskError):
            result.results[1].get(timeout=15)
        assert result.results[2].get(timeout=15) == 10
        holder.revoke()


@pytest.mark.parametrize(("until", "released"), [("success", False), ("finish", True)])
def test_rpc_ignore_after_storing_failure_is_a_failure(
    rpc_life: Lifecycle, locks: redis.Redis, tmp_path: Path, until: str, released: bool
) -> None:
    """With an rpc:// backend, update_state(FAILURE) then Ignore counts as a failure of the mode."""
    app, scratch = rpc_life.app(), rpc_life.scratch_client()
    token = f"rpc-ignored-{until}"
    with rpc_life.worker(tmp_path / "worker.log"):
        app.tasks["life.self_stored"].apply_async((token, "FAILURE"), unique=60, unique_until=until)
        key = lock_of(app, "life.self_stored", (token, "FAILURE"))
        wait_event(scratch, token, "start")
        if released:
            wait_until(lambda: not locks.exists(key), what="released as a failure")
        else:
            time.sleep(1)
            assert locks.exists(key)


@pytest.mark.parametrize("on_duplicate", ["existing", "raise"])
def test_refused_step_inside_a_chord_keeps_the_step_that_ran_and_frees_the_pool(
    redis_server: RedisServer, tmp_path: Path, on_duplicate: str
) -> None:
    """A chord member's refused chain step: the step before stays SUCCESS, the chord fails, the pool lives."""
    life = Lifecycle.on(redis_server)
    app = life.app()
    double, total = app.tasks["life.double"], app.tasks["life.total"]
    with life.worker(tmp_path / "worker.log"):
        holder = park(app, 2)
        first = double.s(1).set(unique=60)
        member = chain(first, double.s().set(unique=60, on_duplicate=on_duplicate))
        result = chord([member, double.s(5).set(unique=60)], total.s()).apply_async()
        # DuplicateTaskError, or a ChordError quoting it.
        with pytest.raises(Exception, match="duplicate refused"):
            result.get(timeout=15)
        step = next(r for r in result.parent.results if r.parent is not None).parent
        assert step.get(timeout=15) == 2
        assert stored(app, step.id) == states.SUCCESS
        # The pool process is not wedged: a new task runs on this one-process worker.
        assert double.apply_async((21,)).get(timeout=15) == 42
        holder.revoke()


@quick_redelivery
def test_copy_of_a_killed_workers_task_runs_once_it_is_redelivered(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """A late-acknowledged task whose worker was SIGKILLed runs again here as soon as it is redelivered."""
    life = Lifecycle.on(redis_server, **{**REDELIVER, "unique_running_ttl": 30})
    app, scratch = life.app(), life.scratch_client()
    work = app.tasks["life.work"]
    with life.worker(tmp_path / "first.log") as first:
        result = work.apply_async(("killed",), {"seconds": 4}, unique=60)
        wait_event(scratch, "killed", "start")
        time.sleep(1.5)  # marked half a second after its receipt (a quarter of visibility_timeout)
        os.killpg(first.pid, signal.SIGKILL)
    with life.worker(tmp_path / "second.log") as second:
        # The dead copy's marker would live 30 s more; its process is shown
        # dead, so the redelivered copy runs well before that.
        assert result.get(timeout=20) == "killed"
        assert "is dead; this copy runs" in (tmp_path / "second.log").read_text()
        assert second.poll() is None
    assert events(scratch, "killed") == ["start", "start", "end"]
