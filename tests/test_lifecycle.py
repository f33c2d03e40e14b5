"""A lock lives exactly as long as its task: real prefork workers, signals, replace, Ignore, Reject.

Each test runs ``celery worker --pool=prefork`` on ``tests/lifecycle_app.py``
with the broker, results and locks in the suite's Redis, and watches the lock
while the task starts, survives or dies, and ends.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import states

from celery_unique import DuplicateTaskError
from celery_unique.lock import running_marker_key
from celery_unique.testing import RedisServer
from tests.conftest import LOCK_DB, wait_until
from tests.lifecycle_support import REDELIVER, Lifecycle, events, lock_of, pids, stored, wait_event
from tests.versions import QUICK_REDELIVERY, needs_quick_redelivery

pytestmark = pytest.mark.slow



def refused(app: Any, name: str, args: tuple[Any, ...], **options: Any) -> bool:
    """Whether enqueueing the call now is refused as a duplicate."""
    try:
        app.tasks[name].apply_async(args, unique=60, **options)
    except DuplicateTaskError:
        return True
    return False




def test_sigusr1_survivor_keeps_its_lock_until_it_ends(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """A task that survives revoke(terminate, SIGUSR1) keeps its lock, REVOKED or not, until success."""
    life = Lifecycle.on(redis_server, unique_running_ttl=1)
    app, scratch = life.app(), life.scratch_client()
    with life.worker(tmp_path / "worker.log"):
        result = app.tasks["life.survivor"].apply_async(("usr1",), {"after": 0.2}, unique=60)
        wait_event(scratch, "usr1", "start")
        app.control.revoke(result.id, terminate=True, signal="SIGUSR1")
        wait_event(scratch, "usr1", "signalled")
        # Celery stores REVOKED at once, though the task runs on.
        wait_until(lambda: stored(app, result.id) == states.REVOKED, what="REVOKED stored")
        assert locks.get(lock_of(app, "life.survivor", ("usr1",), {"after": 0.2})) == result.id.encode()
        # The holder check sees REVOKED but also the running marker, renewed
        # by the heartbeat well past its 1 s TTL: the duplicate is refused.
        for _ in range(3):
            assert refused(app, "life.survivor", ("usr1",), kwargs={"after": 0.2})
            time.sleep(1)
        scratch.set("go:usr1", 1)
        wait_until(
            lambda: stored(app, result.id) == states.SUCCESS, timeout=25, what="success after surviving"
        )
        key = lock_of(app, "life.survivor", ("usr1",), {"after": 0.2})
        wait_until(lambda: not locks.exists(key), what="released")
        assert not refused(app, "life.survivor", ("usr1",), kwargs={"after": 0.2})
        scratch.set("go:usr1", 1)


def test_sigusr1_survivor_that_fails_follows_its_mode(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """A SIGUSR1 survivor that then fails keeps its lock under "success" and releases it under "finish"."""
    life = Lifecycle.on(redis_server, unique_running_ttl=1)
    app, scratch = life.app(), life.scratch_client()
    survivor = app.tasks["life.survivor"]
    with life.worker(tmp_path / "worker.log", concurrency=2):
        kept = survivor.apply_async(("kept",), {"fail": True, "after": 0}, unique=60)
        freed = survivor.apply_async(
            ("freed",), {"fail": True, "after": 0}, unique=60, unique_until="finish"
        )
        for token, result in (("kept", kept), ("freed", freed)):
            wait_event(scratch, token, "start")
            app.control.revoke(result.id, terminate=True, signal="SIGUSR1")
            wait_event(scratch, token, "signalled")
            scratch.set(f"go:{token}", 1)
        for result in (kept, freed):
            wait_until(lambda r=result: stored(app, r.id) == states.FAILURE, what="failure stored")
        freed_key = lock_of(app, "life.survivor", ("freed",), {"fail": True, "after": 0})
        wait_until(lambda: not locks.exists(freed_key), what="freed")
        time.sleep(0.5)
        kept_key = lock_of(app, "life.survivor", ("kept",), {"fail": True, "after": 0})
        assert locks.get(kept_key) == kept.id.encode()


def test_sigusr1_survivor_killed_later_releases(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """A task revoked with SIGUSR1 that survives, then dies (SIGKILL), releases its lock."""
    life = Lifecycle.on(redis_server, unique_running_ttl=1)
    app, scratch = life.app(), life.scratch_client()
    with life.worker(tmp_path / "worker.log"):
        result = app.tasks["life.survivor"].apply_async(("killed",), unique=60)
        wait_event(scratch, "killed", "start")
        app.control.revoke(result.id, terminate=True, signal="SIGUSR1")
        wait_event(scratch, "killed", "signalled")
        key = lock_of(app, "life.survivor", ("killed",))
        time.sleep(0.5)
        assert locks.get(key) == result.id.encode()
        os.kill(pids(scratch, "killed")[0], signal.SIGKILL)
        wait_until(lambda: not locks.exists(key), what="released after the kill")


def test_sigterm_terminate_releases_at_once(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """revoke(terminate=True) with SIGTERM releases the lock as the task is terminated."""
    life = Lifecycle.on(redis_server)
    app, scratch = life.app(), life.scratch_client()
    with life.worker(tmp_path / "worker.log"):
        result = app.tasks["life.work"].apply_async(("term",), {"seconds": 30}, unique=60)
        wait_event(scratch, "term", "start")
        app.control.revoke(result.id, terminate=True)
        key = lock_of(app, "life.work", ("term",), {"seconds": 30})
        wait_until(lambda: not locks.exists(key), what="released")
        assert not refused(app, "life.work", ("term",), kwargs={"seconds": 30})
        app.control.revoke(result.id, terminate=True)


@pytest.mark.parametrize(("fail", "until", "released"), [
    (False, "success", True),
    (True, "success", False),
    (True, "finish", True),
])
def test_replace_hands_the_lock_to_the_replacement(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path, fail: bool, until: str, released: bool
) -> None:
    """Task.replace() keeps the call's lock until the replacement ends, then follows the mode."""
    life = Lifecycle.on(redis_server)
    app, scratch = life.app(), life.scratch_client()
    token = f"replaced-{fail}-{until}"
    with life.worker(tmp_path / "worker.log"):
        result = app.tasks["life.replacer"].apply_async(
            (token,), {"seconds": 1.5, "fail": fail}, unique=60, unique_until=until
        )
        key = lock_of(app, "life.replacer", (token,), {"seconds": 1.5, "fail": fail})
        wait_event(scratch, token, "start")  # the replacement, under the same task id
        assert locks.get(key) == result.id.encode()
        assert refused(app, "life.replacer", (token,), kwargs={"seconds": 1.5, "fail": fail})
        if fail:
            with pytest.raises(RuntimeError):
                result.get(timeout=20)
        else:
            assert result.get(timeout=20) == token
        if released:
            wait_until(lambda: not locks.exists(key), what="released after the replacement")
        else:
            time.sleep(1)
            assert locks.get(key) == result.id.encode()
    assert events(scratch, token) == ["replacing", "start", "end"]


@pytest.mark.parametrize(("state", "released"), [("SUCCESS", True), ("FAILURE", False)])
def test_ignore_after_storing_a_state_follows_that_state(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path, state: str, released: bool
) -> None:
    """A task that stores its own state and raises Ignore is judged by that state."""
    life = Lifecycle.on(redis_server)
    app = life.app()
    with life.worker(tmp_path / "worker.log"):
        result = app.tasks["life.self_stored"].apply_async((state,), {"state": state}, unique=60)
        key = lock_of(app, "life.self_stored", (state,), {"state": state})
        wait_until(lambda: stored(app, result.id) == state, what="state stored")
        if released:
            wait_until(lambda: not locks.exists(key), what="released")
        else:
            time.sleep(1)
            assert locks.get(key) == result.id.encode()


@pytest.mark.parametrize(("until", "released"), [("success", False), ("finish", True)])
def test_reject_without_requeue_is_a_final_failure(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path, until: str, released: bool
) -> None:
    """Reject(requeue=False) keeps the lock under "success" and releases it under "finish"."""
    life = Lifecycle.on(redis_server)
    app, scratch = life.app(), life.scratch_client()
    with life.worker(tmp_path / "worker.log"):
        result = app.tasks["life.reject"].apply_async((until,), unique=60, unique_until=until)
        key = lock_of(app, "life.reject", (until,))
        wait_event(scratch, until, "start")
        if released:
            wait_until(lambda: not locks.exists(key), what="released")
        else:
            time.sleep(1.5)
            assert locks.get(key) == result.id.encode()


@pytest.mark.parametrize(("until", "released"), [("success", False), ("finish", True)])
def test_killed_pool_process_is_a_final_failure(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path, until: str, released: bool
) -> None:
    """A pool process killed mid-task (no acks_late) keeps the lock under "success", not "finish"."""
    life = Lifecycle.on(redis_server)
    app, scratch = life.app(), life.scratch_client()
    token = f"lost-{until}"
    with life.worker(tmp_path / "worker.log"):
        result = app.tasks["life.work"].apply_async(
            (token,), {"seconds": 30}, unique=60, unique_until=until
        )
        key = lock_of(app, "life.work", (token,), {"seconds": 30})
        wait_event(scratch, token, "start")
        os.kill(pids(scratch, token)[0], signal.SIGKILL)
        wait_until(lambda: stored(app, result.id) == states.FAILURE, what="failure stored")
        if released:
            wait_until(lambda: not locks.exists(key), what="released")
        else:
            time.sleep(1)
            assert locks.get(key) == result.id.encode()


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_reenqueue_right_after_the_result_is_never_refused(
    redis_server: RedisServer, request: pytest.FixtureRequest, tmp_path: Path, broker: str
) -> None:
    """Enqueueing the same call again as soon as result.get() returns is accepted, 200 times in a row.

    The worker releases just after Celery stores the result; a call that
    comes between finds the holder's SUCCESS and takes the lock over. On
    RabbitMQ with late acknowledgement every run is marked, and the marked
    copy that stored its result is seen to be only ending.
    """
    life = Lifecycle.on(redis_server)
    if broker == "rabbitmq":
        life.broker = request.getfixturevalue("rabbitmq_url")
        life.conf["task_acks_late"] = True
    app = life.app()
    work = app.tasks["life.work"]
    refusals = 0
    with life.worker(tmp_path / "worker.log"):
        for _ in range(200):
            try:
                work.apply_async(("again",), unique=60).get(timeout=10)
            except DuplicateTaskError:
                refusals += 1
    assert refusals == 0


def test_worker_with_broken_settings_reports_once(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A worker whose lock-store settings are broken logs one error naming the setting, not one per task."""
    life = Lifecycle.on(redis_server, unique_redis_socket_timeout=-1)
    app = life.app(unique_redis_socket_timeout=1.0)  # the producer's settings are fine
    log = tmp_path / "worker.log"
    with life.worker(log, concurrency=2):
        results = [app.tasks["life.work"].apply_async((f"broken-{i}",), unique=60) for i in range(4)]
        assert [r.get(timeout=20) for r in results] == [f"broken-{i}" for i in range(4)]
    text = log.read_text(errors="replace")
    errors = [line for line in text.splitlines() if "cannot release locks" in line]
    assert len(errors) == 1, errors
    assert "unique_redis_socket_timeout" in errors[0]
    assert "Traceback" not in text



@pytest.mark.skipif(not QUICK_REDELIVERY, reason=needs_quick_redelivery)
def test_redelivered_copy_waits_for_the_running_one(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """A copy redelivered while the task runs does not run beside it; the lock holds until the end."""
    life = Lifecycle.on(redis_server, **REDELIVER)
    app, scratch = life.app(), life.scratch_client()
    work = app.tasks["life.work"]
    log = tmp_path / "worker.log"
    with life.worker(log, concurrency=2):
        result = work.apply_async(("long",), {"seconds": 7}, unique=60)
        key = lock_of(app, "life.work", ("long",), {"seconds": 7})
        wait_until(lambda: "already running elsewhere" in log.read_text(), timeout=15, what="a redelivery")
        assert events(scratch, "long") == ["start"]
        assert refused(app, "life.work", ("long",), kwargs={"seconds": 7})
        assert result.get(timeout=20) == "long"
        wait_until(lambda: not locks.exists(key), what="released")
        time.sleep(3)  # deferred copies come back, see the attempt done, and are dropped
        assert events(scratch, "long") == ["start", "end"]
        assert "has already run" in log.read_text()


@pytest.mark.skipif(not QUICK_REDELIVERY, reason=needs_quick_redelivery)
def test_redelivered_copy_runs_when_its_worker_died(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """When the worker running a task dies, its redelivered copy runs: the task is never lost."""
    life = Lifecycle.on(redis_server, **REDELIVER)
    app, scratch = life.app(), life.scratch_client()
    work = app.tasks["life.work"]
    with life.worker(tmp_path / "first.log") as first:
        result = work.apply_async(("orphan",), {"seconds": 3}, unique=60)
        wait_event(scratch, "orphan", "start")
        os.killpg(first.pid, signal.SIGKILL)
    with life.worker(tmp_path / "second.log"):
        assert result.get(timeout=30) == "orphan"
        assert events(scratch, "orphan") == ["start", "start", "end"]
        wait_until(lambda: not locks.exists(lock_of(app, "life.work", ("orphan",), {"seconds": 3})),
                   what="released")


def test_heartbeat_puts_back_a_lost_running_marker(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """A running task's marker that vanished (a flushed or restarted Redis) is put back by the heartbeat."""
    life = Lifecycle.on(redis_server, **REDELIVER)
    app, scratch = life.app(), life.scratch_client()
    raw = redis_server.client(LOCK_DB)
    with life.worker(tmp_path / "worker.log"):
        result = app.tasks["life.work"].apply_async(("lost",), {"seconds": 4}, unique=60)
        wait_event(scratch, "lost", "start")
        key = lock_of(app, "life.work", ("lost",), {"seconds": 4})
        marker = running_marker_key(key, result.id)
        value = wait_until(lambda: raw.get(marker), what="the running marker")
        raw.delete(marker)
        wait_until(lambda: raw.get(marker) == value, timeout=3, what="the marker put back")
        assert result.get(timeout=20) == "lost"
