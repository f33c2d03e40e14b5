"""Where a lock's life meets Celery's edges: reused ids, replace in canvases, retries, time limits, pools.

Real ``celery worker`` subprocesses (``tests/lifecycle_app.py``), as in
``tests/test_lifecycle.py``. Each test says when docs/semantics.md promises the
lock goes, and checks that it goes then: not while the task can still run,
and not only when its TTL runs out.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import redis
from celery import chain, chord, states

from celery_unique import DuplicateTaskError, send_unique
from celery_unique.lock import running_marker_key
from celery_unique.testing import RedisServer
from tests.conftest import BROKER_DB, wait_until
from tests.lifecycle_support import (
    REDELIVER,
    Lifecycle,
    events,
    lock_of,
    pids,
    redeliver_copy,
    stored,
    wait_event,
)
from tests.versions import (
    CELERY_57,
    QUICK_REDELIVERY,
    needs_celery_57,
    needs_quick_redelivery,
)

pytestmark = pytest.mark.slow





@pytest.mark.parametrize("backend", [True, False])
def test_task_id_reused_after_its_run_runs_again(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path, backend: bool
) -> None:
    """A caller-chosen task id enqueued again right after its run ended runs again and releases."""
    life = Lifecycle.on(redis_server, backend=backend)
    app, scratch = life.app(), life.scratch_client()
    work = app.tasks["life.work"]
    key = lock_of(app, "life.work", ("reused",))
    with life.worker(tmp_path / "worker.log"):
        work.apply_async(("reused",), unique=60, task_id="nightly-report")
        wait_until(lambda: events(scratch, "reused") == ["start", "end"], what="first run")
        wait_until(lambda: not locks.exists(key), what="first release")
        work.apply_async(("reused",), unique=60, task_id="nightly-report")
        wait_until(lambda: events(scratch, "reused") == ["start", "end", "start", "end"],
                   what="second run")
        wait_until(lambda: not locks.exists(key), what="second release")


@pytest.mark.parametrize("backend", [True, False])
def test_replace_inside_a_chain_releases_when_the_replacement_ends(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path, backend: bool
) -> None:
    """A chain member that replaces itself hands its lock to its replacement, which releases it."""
    life = Lifecycle.on(redis_server, backend=backend, unique_check_holder=False)
    app, scratch = life.app(), life.scratch_client()
    replacer, work = app.tasks["life.replacer"], app.tasks["life.work"]
    key = lock_of(app, "life.replacer", ("in-chain",), {"seconds": 1})
    with life.worker(tmp_path / "worker.log"):
        chain(replacer.si("in-chain", seconds=1).set(unique=60), work.si("after")).apply_async()
        wait_event(scratch, "in-chain", "start")
        assert locks.exists(key)  # the replacement runs under the replaced task's lock
        wait_until(lambda: events(scratch, "after") == ["start", "end"], what="the next chain step")
        wait_until(lambda: not locks.exists(key), what="released by the replacement")


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_revoked_task_the_pool_will_still_run_keeps_its_lock(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path, pool: str
) -> None:
    """A revoke (no terminate) of a task queued behind a busy one: it never runs, and its lock goes.

    A prefork worker holds it back and discards it; a threads pool has
    already taken it, and its run drops it as it begins. The lock is never
    freed while the task could still run.
    """
    life = Lifecycle.on(redis_server, unique_check_holder=False)
    app, scratch = life.app(), life.scratch_client()
    work = app.tasks["life.work"]
    log = tmp_path / "worker.log"
    with life.worker(log, extra=(f"--pool={pool}",)):
        work.apply_async(("busy",), {"seconds": 3})
        wait_event(scratch, "busy", "start")
        queued = work.apply_async(("buffered",), {"seconds": 1}, unique=60)
        key = lock_of(app, "life.work", ("buffered",), {"seconds": 1})
        wait_until(lambda: queued.id in log.read_text(), what="received")
        app.control.revoke(queued.id)
        time.sleep(1.5)  # three turns of the revoke watcher
        held = locks.get(key) == queued.id.encode()
        wait_until(lambda: "end" in events(scratch, "busy"), what="busy ends")
        time.sleep(2)
        ran = "start" in events(scratch, "buffered")
        assert held or not ran, "the lock went while the revoked task was still going to run"
        assert not ran
        wait_until(lambda: not locks.exists(key), what="released")


def test_retry_picked_up_at_once_is_not_held_back(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A retry published with countdown 0 runs at once, even when another pool process takes it first."""
    life = Lifecycle.on(redis_server)
    app = life.app()
    retry = app.tasks["life.quick_retry"]
    log = tmp_path / "worker.log"
    with life.worker(log, concurrency=2):
        results = [retry.apply_async((f"quick-{i}",), {"failures": 3}, unique=60) for i in range(20)]
        assert [r.get(timeout=60) for r in results] == [3] * 20
    assert "already running elsewhere" not in log.read_text()


def test_plain_task_sent_unique_that_replaces_itself_keeps_the_lock_while_replaced(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """A plain task sent with send_unique that replaces itself keeps the lock while its replacement runs.

    The replacement carries no lock header: once it has succeeded, the next
    call takes the lock over (its state is SUCCESS and nothing runs).
    """
    life = Lifecycle.on(redis_server)
    app, scratch = life.app(), life.scratch_client()
    with life.worker(tmp_path / "worker.log"):
        result = send_unique(app, "life.plain_replacer", ("plain",), {"seconds": 2}, unique=60)
        key = locks.keys("unique:*")[0]
        wait_event(scratch, "plain", "start")  # the replacement runs, under the same task id
        assert locks.get(key) == result.id.encode(), "released while the replacement runs"
        assert result.get(timeout=20) == "plain"
        again = send_unique(app, "life.plain_replacer", ("plain",), {"seconds": 2}, unique=60)
        assert locks.get(key) == again.id.encode()
        assert again.get(timeout=20) == "plain"


@pytest.mark.parametrize(("until", "released"), [("success", False), ("finish", True)])
def test_hard_time_limit_is_a_final_failure(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path, until: str, released: bool
) -> None:
    """A hard time limit keeps the lock under "success" and releases it under "finish"; no copy runs again."""
    life = Lifecycle.on(redis_server)
    app, scratch = life.app(), life.scratch_client()
    token = f"limited-{until}"
    with life.worker(tmp_path / "worker.log"):
        result = app.tasks["life.hard_limited"].apply_async((token,), unique=60, unique_until=until)
        key = lock_of(app, "life.hard_limited", (token,))
        wait_until(lambda: stored(app, result.id) == states.FAILURE, what="failure stored")
        if released:
            wait_until(lambda: not locks.exists(key), what="released")
        else:
            time.sleep(1)
            assert locks.get(key) == result.id.encode()
        marker = locks.get(running_marker_key(key, result.id))
        assert marker is not None
        assert marker.startswith(b"d|"), marker
    assert events(scratch, token) == ["start"]


@pytest.mark.skipif(not CELERY_57, reason=needs_celery_57)
def test_hard_time_limit_requeued_by_celery_runs_again(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """With acks_late and acks_on_timeout off, a timed-out task is requeued: it runs again, under the lock."""
    life = Lifecycle.on(redis_server, task_acks_late=True, task_acks_on_timeout=False)
    app, scratch = life.app(), life.scratch_client()
    token = "limited-requeued"
    with life.worker(tmp_path / "worker.log"):
        result = app.tasks["life.hard_limited"].apply_async((token,), unique=60)
        key = lock_of(app, "life.hard_limited", (token,))
        wait_until(lambda: events(scratch, token).count("start") >= 2, timeout=15, what="runs again")
        assert locks.get(key) == result.id.encode()
        app.control.revoke(result.id, terminate=True, signal="SIGKILL")


@pytest.mark.parametrize("setting", [
    "task_reject_on_worker_lost",
    pytest.param(
        "task_retry_on_worker_lost", marks=pytest.mark.skipif(not CELERY_57, reason=needs_celery_57)
    ),
])
def test_killed_child_whose_task_comes_back_runs_again_under_its_lock(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path, setting: str
) -> None:
    """A killed pool process whose task Celery requeues or retries runs again, its lock held throughout."""
    life = Lifecycle.on(redis_server, task_acks_late=True, **{setting: True})
    app, scratch = life.app(), life.scratch_client()
    token = f"lost-{setting}"
    with life.worker(tmp_path / "worker.log"):
        result = app.tasks["life.work_soon_retried"].apply_async((token,), {"seconds": 2}, unique=60)
        key = lock_of(app, "life.work_soon_retried", (token,), {"seconds": 2})
        wait_event(scratch, token, "start")
        os.kill(pids(scratch, token)[0], signal.SIGKILL)
        wait_until(lambda: events(scratch, token).count("start") == 2, timeout=20, what="runs again")
        assert locks.get(key) == result.id.encode()
        assert result.get(timeout=20) == token
        wait_until(lambda: not locks.exists(key), what="released")
    assert events(scratch, token) == ["start", "start", "end"]


@pytest.mark.skipif(not QUICK_REDELIVERY, reason=needs_quick_redelivery)
def test_start_mode_redelivered_copy_does_not_run_beside_the_first(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """Under "start" the lock goes as the task starts; a redelivered copy still waits for the running one."""
    life = Lifecycle.on(
        redis_server, task_acks_late=True, unique_running_ttl=1,
        broker_transport_options={"visibility_timeout": 2, "unacked_restore_interval": 1,
                                  "unacked_restore_throttle": 1},
    )
    app, scratch = life.app(), life.scratch_client()
    log = tmp_path / "worker.log"
    with life.worker(log, concurrency=2):
        result = app.tasks["life.work"].apply_async(
            ("started",), {"seconds": 6}, unique=60, unique_until="start"
        )
        key = lock_of(app, "life.work", ("started",), {"seconds": 6})
        wait_event(scratch, "started", "start")
        wait_until(lambda: not locks.exists(key), what="released at start")
        wait_until(lambda: "already running elsewhere" in log.read_text(), timeout=15, what="a redelivery")
        assert result.get(timeout=20) == "started"
        time.sleep(3)
    assert events(scratch, "started") == ["start", "end"]


def test_autoretry_keeps_the_lock_until_the_last_attempt_succeeds(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """autoretry_for retries keep the lock; the attempt that succeeds releases it."""
    life = Lifecycle.on(redis_server)
    app, scratch = life.app(), life.scratch_client()
    task = app.tasks["life.autoretry"]
    with life.worker(tmp_path / "worker.log"):
        result = task.apply_async(("auto",), {"failures": 2}, unique=60)
        key = lock_of(app, "life.autoretry", ("auto",), {"failures": 2})
        wait_until(lambda: len(events(scratch, "auto")) >= 2, what="a retry")
        assert locks.get(key) == result.id.encode()
        with pytest.raises(DuplicateTaskError):
            task.apply_async(("auto",), {"failures": 2}, unique=60)
        assert result.get(timeout=20) == 2
        wait_until(lambda: not locks.exists(key), what="released")


def test_chain_member_that_retries_keeps_its_lock_then_the_chain_goes_on(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """A unique chain member that retries holds its lock across retries; the next member runs after it."""
    life = Lifecycle.on(redis_server)
    app = life.app()
    flaky, double = app.tasks["life.flaky"], app.tasks["life.double"]
    with life.worker(tmp_path / "worker.log"):
        steps = [flaky.si("chained", failures=2).set(unique=60), double.s().set(unique=60)]
        result = chain(*steps).apply_async()
        assert result.get(timeout=20) == 4
        wait_until(lambda: not [k for k in locks.keys("unique:*") if b":run:" not in k], what="all released")


def test_replace_with_a_group_releases_when_the_group_is_done(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """A task replaced by a group keeps its lock while the group runs and releases it when it is done."""
    life = Lifecycle.on(redis_server, unique_check_holder=False)
    app, scratch = life.app(), life.scratch_client()
    with life.worker(tmp_path / "worker.log", concurrency=2):
        result = app.tasks["life.group_replacer"].apply_async(("grouped",), {"seconds": 1}, unique=60)
        key = lock_of(app, "life.group_replacer", ("grouped",), {"seconds": 1})
        wait_event(scratch, "grouped-a", "start")
        assert locks.get(key) == result.id.encode()
        assert result.get(timeout=20) == ["grouped-a", "grouped-b"]
        wait_until(lambda: not locks.exists(key), what="released after the group")


def test_replace_with_a_chain_releases_when_the_chain_is_done(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """A task replaced by a chain keeps its lock until the chain's last task ends."""
    life = Lifecycle.on(redis_server, unique_check_holder=False)
    app, scratch = life.app(), life.scratch_client()
    with life.worker(tmp_path / "worker.log"):
        result = app.tasks["life.chain_replacer"].apply_async(("chained",), {"seconds": 1}, unique=60)
        key = lock_of(app, "life.chain_replacer", ("chained",), {"seconds": 1})
        wait_event(scratch, "chained-a", "start")
        assert locks.get(key) == result.id.encode()
        assert result.get(timeout=20) == "chained"
        wait_until(lambda: not locks.exists(key), what="released after the chain")


def test_sigusr1_survivor_that_retries_is_dropped_and_releases(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """A task that survives a SIGUSR1 revoke and retries: the retry is discarded as revoked; the lock goes."""
    life = Lifecycle.on(redis_server, unique_running_ttl=1)
    app, scratch = life.app(), life.scratch_client()
    with life.worker(tmp_path / "worker.log"):
        result = app.tasks["life.survivor_retry"].apply_async(("usr1-retry",), unique=60)
        key = lock_of(app, "life.survivor_retry", ("usr1-retry",))
        wait_event(scratch, "usr1-retry", "start")
        app.control.revoke(result.id, terminate=True, signal="SIGUSR1")
        wait_event(scratch, "usr1-retry", "signalled")
        assert locks.get(key) == result.id.encode()
        scratch.set("go:usr1-retry", 1)
        # The retry is published, received and discarded as revoked: on a
        # loaded machine that takes more than the default 10 s.
        wait_until(lambda: not locks.exists(key), timeout=25, what="released")
        time.sleep(1.5)
    assert "retried" not in events(scratch, "usr1-retry")


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_markers_are_renewed_and_the_lock_released_in_other_pools(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path, pool: str
) -> None:
    """Solo and threads pools mark a late-acknowledged run in time, renew its marker, then release."""
    life = Lifecycle.on(redis_server, **REDELIVER)
    app, scratch = life.app(), life.scratch_client()
    with life.worker(tmp_path / "worker.log", concurrency=2, extra=(f"--pool={pool}",)):
        result = app.tasks["life.work"].apply_async((pool,), {"seconds": 4}, unique=60)
        key = lock_of(app, "life.work", (pool,), {"seconds": 4})
        marker = running_marker_key(key, result.id)
        wait_event(scratch, pool, "start")
        time.sleep(1)  # marked half a second after the message came (a quarter of visibility_timeout)
        for _ in range(5):
            value = locks.get(marker)
            if "end" in events(scratch, pool):
                break
            assert value is not None
            assert value.startswith(b"r|"), value
            time.sleep(0.5)
        assert result.get(timeout=20) == pool
        wait_until(lambda: not locks.exists(key), what="released")
        assert (locks.get(marker) or b"").startswith(b"d|")


def test_expired_task_releases_when_discarded(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """A task that expires while queued behind another releases its lock when the worker discards it."""
    life = Lifecycle.on(redis_server)
    app, scratch = life.app(), life.scratch_client()
    work = app.tasks["life.work"]
    with life.worker(tmp_path / "worker.log"):
        work.apply_async(("blocker",), {"seconds": 2})
        wait_event(scratch, "blocker", "start")
        late = work.apply_async(("expiring",), unique=60, expires=1)
        key = lock_of(app, "life.work", ("expiring",))
        wait_until(lambda: not locks.exists(key), what="released on expiry")
        assert stored(app, late.id) == states.REVOKED
    assert events(scratch, "expiring") == []


def test_revoked_countdown_task_does_not_run_after_a_worker_restart(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """A countdown task revoked while a worker held it does not run after a restart beside a new call."""
    life = Lifecycle.on(redis_server, broker_transport_options={"visibility_timeout": 2})
    app, scratch = life.app(), life.scratch_client()
    work = app.tasks["life.work"]
    log = tmp_path / "first.log"
    with life.worker(log) as first:
        revoked = work.apply_async(("restarted",), unique=60, countdown=4)
        wait_until(lambda: revoked.id in log.read_text(), what="received")
        app.control.revoke(revoked.id)
        key = lock_of(app, "life.work", ("restarted",))
        wait_until(lambda: not locks.exists(key), what="released by the watcher")
        first.send_signal(signal.SIGTERM)  # warm shutdown: the eta message goes back to the queue
        first.wait(timeout=20)
    work.apply_async(("restarted",), unique=60, countdown=4)  # accepted: the call is free
    with life.worker(tmp_path / "second.log"):
        wait_until(lambda: "start" in events(scratch, "restarted"), timeout=20, what="the new call runs")
        time.sleep(3)
    assert events(scratch, "restarted") == ["start", "end"], "the revoked task ran too"


@pytest.mark.skipif(not CELERY_57, reason=needs_celery_57)
def test_revoke_without_terminate_of_a_running_task_keeps_its_lock_on_two_workers(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """revoke() of a task running on one of two workers (it runs on) keeps the lock until it ends."""
    life = Lifecycle.on(redis_server, unique_running_ttl=1)
    app, scratch = life.app(), life.scratch_client()
    work = app.tasks["life.work"]
    with life.worker(tmp_path / "a.log"), life.worker(tmp_path / "b.log"):
        result = work.apply_async(("two",), {"seconds": 4}, unique=60)
        key = lock_of(app, "life.work", ("two",), {"seconds": 4})
        wait_event(scratch, "two", "start")
        app.control.revoke(result.id)
        wait_until(lambda: stored(app, result.id) == states.REVOKED, what="REVOKED stored")
        for _ in range(3):
            with pytest.raises(DuplicateTaskError):
                work.apply_async(("two",), {"seconds": 4}, unique=60)
            time.sleep(0.5)
        wait_until(lambda: "end" in events(scratch, "two"), what="runs on")
        wait_until(lambda: not locks.exists(key), what="released at its end")


def test_warm_shutdown_finishes_running_tasks_and_keeps_queued_locks(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """A warm shutdown lets the running task end and release; the queued one comes back still locked."""
    life = Lifecycle.on(redis_server)
    app, scratch = life.app(), life.scratch_client()
    work = app.tasks["life.work"]
    with life.worker(tmp_path / "first.log") as first:
        running = work.apply_async(("warm-running",), {"seconds": 2}, unique=60)
        wait_event(scratch, "warm-running", "start")
        queued = work.apply_async(("warm-queued",), unique=60)
        time.sleep(0.3)
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=20)
    assert events(scratch, "warm-running") == ["start", "end"]
    assert not locks.exists(lock_of(app, "life.work", ("warm-running",), {"seconds": 2}))
    assert locks.get(lock_of(app, "life.work", ("warm-queued",))) == queued.id.encode()
    assert stored(app, running.id) == states.SUCCESS
    with life.worker(tmp_path / "second.log"):
        assert queued.get(timeout=20) == "warm-queued"
        wait_until(lambda: not locks.exists(lock_of(app, "life.work", ("warm-queued",))), what="released")


def test_chord_members_that_retry_keep_their_locks_and_the_chord_completes(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """Unique chord header members that retry keep their locks; the body runs and every lock goes."""
    life = Lifecycle.on(redis_server)
    app = life.app()
    flaky, double, total = app.tasks["life.flaky"], app.tasks["life.double"], app.tasks["life.total"]
    with life.worker(tmp_path / "worker.log", concurrency=2):
        header = [flaky.si("in-chord", failures=1).set(unique=60), double.si(2).set(unique=60)]
        result = chord(header, total.s().set(unique=60)).apply_async()
        assert result.get(timeout=30) == 5
        wait_until(lambda: not [k for k in locks.keys("unique:*") if b":run:" not in k], what="all released")


def test_forwarded_release_mode_does_not_change_when_the_lock_goes(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """A call that forwards another task's celery_unique_until="start" still holds its lock while it runs."""
    life = Lifecycle.on(redis_server)
    app, scratch = life.app(), life.scratch_client()
    forwarded = {"celery_unique_until": "start", "celery_unique_lock": "unique:lifecycle:other:digest"}
    with life.worker(tmp_path / "worker.log"):
        result = app.tasks["life.work"].apply_async(
            ("forwarded",), {"seconds": 2}, unique=60, headers=forwarded
        )
        key = lock_of(app, "life.work", ("forwarded",), {"seconds": 2})
        wait_event(scratch, "forwarded", "start")
        assert locks.get(key) == result.id.encode()
        assert result.get(timeout=20) == "forwarded"
        wait_until(lambda: not locks.exists(key), what="released on success")


def test_copy_of_an_attempt_that_retried_is_dropped(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """A redelivered copy of an attempt that ended in a retry is dropped while the retry waits."""
    life = Lifecycle.on(redis_server)
    app, scratch = life.app(), life.scratch_client()
    log = tmp_path / "worker.log"
    with life.worker(log):
        result = app.tasks["life.slow_retry"].apply_async(("retried",), unique=60)
        key = lock_of(app, "life.slow_retry", ("retried",))
        marker = running_marker_key(key, result.id)
        wait_until(lambda: (locks.get(marker) or b"").startswith(b"q|0|1|"), what="the retry queued")
        redeliver_copy(redis_server.client(BROKER_DB), app, "life.slow_retry", result.id, key, ("retried",))
        wait_until(lambda: "has already run" in log.read_text(), what="the copy dropped")
        assert result.get(timeout=20) == 1
        wait_until(lambda: not locks.exists(key), what="released")
    assert events(scratch, "retried") == ["start", "start"]


def test_reject_with_requeue_runs_again_under_the_lock(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """Reject(requeue=True) keeps the lock, and the message that comes back runs and releases it."""
    life = Lifecycle.on(redis_server)
    app, scratch = life.app(), life.scratch_client()
    with life.worker(tmp_path / "worker.log"):
        result = app.tasks["life.requeue_once"].apply_async(("requeued",), unique=60, unique_until="finish")
        key = lock_of(app, "life.requeue_once", ("requeued",))
        assert result.get(timeout=20) == "requeued"
        wait_until(lambda: not locks.exists(key), what="released")
    assert events(scratch, "requeued") == ["start", "start"]


def test_refused_reuse_of_a_queued_id_leaves_its_state_alone(redis_server: RedisServer) -> None:
    """Enqueueing a queued task's own id again is refused without recording a failure for that id."""
    life = Lifecycle.on(redis_server)
    app = life.app()
    work = app.tasks["life.work"]
    work.apply_async(("same-id",), unique=60, task_id="report-77", countdown=60)
    with pytest.raises(DuplicateTaskError):
        work.apply_async(("same-id",), unique=60, task_id="report-77", countdown=60)
    assert stored(app, "report-77") == states.PENDING



def test_expired_copy_of_a_running_task_does_not_release_its_lock(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """A redelivered copy that expires is discarded without freeing the lock of the copy still running."""
    life = Lifecycle.on(redis_server, **REDELIVER)
    app, scratch = life.app(), life.scratch_client()
    log = tmp_path / "worker.log"
    with life.worker(log, concurrency=2):
        result = app.tasks["life.work"].apply_async(("expiring-copy",), {"seconds": 8}, unique=60, expires=4)
        key = lock_of(app, "life.work", ("expiring-copy",), {"seconds": 8})
        wait_event(scratch, "expiring-copy", "start")
        while "end" not in events(scratch, "expiring-copy"):
            assert locks.get(key) == result.id.encode(), "released while the task runs"
            time.sleep(0.2)
        assert result.get(timeout=20) == "expiring-copy"


def test_revoked_copy_of_a_running_task_does_not_release_its_lock(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """After revoke() (no terminate) of a running task, its discarded copies leave its lock alone."""
    life = Lifecycle.on(redis_server, **REDELIVER)
    app, scratch = life.app(), life.scratch_client()
    log = tmp_path / "worker.log"
    with life.worker(log, concurrency=2):
        result = app.tasks["life.work"].apply_async(("revoked-copy",), {"seconds": 8}, unique=60)
        key = lock_of(app, "life.work", ("revoked-copy",), {"seconds": 8})
        wait_event(scratch, "revoked-copy", "start")
        app.control.revoke(result.id)
        while "end" not in events(scratch, "revoked-copy"):
            assert locks.get(key) == result.id.encode(), "released while the task runs"
            time.sleep(0.2)


@pytest.mark.skipif(not CELERY_57, reason=needs_celery_57)
def test_revoked_task_a_threads_pool_took_never_runs_beside_the_new_call(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """A revoke of a task a threads pool took frees the call, and the revoked task is dropped, not run."""
    life = Lifecycle.on(redis_server)
    app, scratch = life.app(), life.scratch_client()
    work = app.tasks["life.work"]
    log = tmp_path / "worker.log"
    with life.worker(log, extra=("--pool=threads",)):
        work.apply_async(("busy",), {"seconds": 3})
        wait_event(scratch, "busy", "start")
        queued = work.apply_async(("taken",), unique=60)
        wait_until(lambda: queued.id in log.read_text(), what="received")
        app.control.revoke(queued.id)
        wait_until(lambda: stored(app, queued.id) == states.REVOKED, what="REVOKED stored")
        # REVOKED alone frees nothing (another worker may run a revoked task);
        # the thread that takes the task drops it and frees its lock.
        with pytest.raises(DuplicateTaskError):
            work.apply_async(("taken",), unique=60)
        wait_until(lambda: "revoked or purged" in log.read_text(), what="the revoked task dropped")
        fresh = work.apply_async(("taken",), unique=60)
        assert fresh.get(timeout=20) == "taken"
    assert events(scratch, "taken") == ["start", "end"]


@pytest.mark.parametrize("pool", [
    "solo",
    pytest.param("threads", marks=pytest.mark.skipif(
        not CELERY_57,
        reason="Celery 5.3's threads pool on a Redis broker takes a message every 10 s (BRPOP's timeout)",
    )),
])
def test_no_run_is_left_behind_in_the_worker(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path, pool: str
) -> None:
    """After tasks of every outcome, the worker process keeps no run and renews no marker."""
    life = Lifecycle.on(redis_server, unique_running_ttl=1, task_acks_late=True)
    app = life.app()
    t = app.tasks
    with life.worker(tmp_path / "worker.log", extra=(f"--pool={pool}",)):
        results = [
            t["life.work"].apply_async(("ok",), unique=60),
            t["life.work"].apply_async(("failed",), {"fail": True}, unique=60),
            t["life.flaky"].apply_async(("retried",), unique=60),
            t["life.self_stored"].apply_async(("ignored",), unique=60),
            t["life.reject"].apply_async(("rejected",), unique=60),
            t["life.replacer"].apply_async(("replaced",), unique=60),
            send_unique(app, "life.plain_work", ("plain-ok",), unique=60),
            send_unique(app, "life.plain_work", ("plain-failed",), {"fail": True}, unique=60),
            send_unique(app, "life.plain_replacer", ("plain-replaced",), unique=60),
        ]
        for result in results:
            if result is results[4] and not CELERY_57:
                # Before Celery 5.7 Reject(requeue=False) stores no state at all.
                wait_until(lambda: "start" in events(life.scratch_client(), "rejected"), what="rejected")
                continue
            wait_until(lambda r=result: stored(app, r.id) in states.READY_STATES, what=f"{result.id} ends")
        time.sleep(1)
        assert t["life.run_state"].delay().get(timeout=20) == {"renewed": 0}


def test_task_that_exits_leaves_no_marker_to_renew(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """A body that raises SystemExit in a threads pool stops renewing its marker, which then expires.

    The worker process lives on (a solo pool's worker stops on such a task),
    so a marker still renewed would say the task runs for ever.
    """
    life = Lifecycle.on(redis_server, unique_running_ttl=1)
    app, scratch = life.app(), life.scratch_client()
    with life.worker(tmp_path / "worker.log", extra=("--pool=threads",)):
        result = app.tasks["life.exits"].apply_async(("exits",), unique=60)
        marker = running_marker_key(lock_of(app, "life.exits", ("exits",)), result.id)
        wait_event(scratch, "exits", "start")
        wait_until(lambda: not (locks.get(marker) or b"").startswith(b"r|"), what="the marker expires")
        assert app.tasks["life.run_state"].delay().get(timeout=20) == {"renewed": 0}


def test_retry_taken_by_another_process_before_the_attempt_ended_is_not_held_back(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """A retry another pool process takes while the retrying attempt still cleans up runs at once."""
    life = Lifecycle.on(redis_server, unique_running_ttl=3)
    app, scratch = life.app(), life.scratch_client()
    log = tmp_path / "worker.log"
    with life.worker(log, concurrency=2):
        result = app.tasks["life.retry_then_clean_up"].apply_async(("cleanup",), unique=60)
        assert result.get(timeout=30) == 1
    assert "already running elsewhere" not in log.read_text()
    assert events(scratch, "cleanup") == ["start", "start"]
