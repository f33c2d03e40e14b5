"""A holder that has finished never blocks the call; a revoked one frees it once discarded.

Real prefork workers; a foreign worker that never imports celery_unique; a
lock store paused as the task ends; revokes of queued and scheduled tasks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_unique import DuplicateTaskError, UniqueLocks, send_unique
from celery_unique.testing import RedisServer
from tests.conftest import BROKER_DB, LOCK_DB, RESULT_DB, wait_until
from tests.lifecycle_support import SCRATCH_DB, Lifecycle, events

pytestmark = pytest.mark.slow



def accepted_within(call: Any, seconds: float) -> bool:
    """Whether ``call()`` stops raising DuplicateTaskError within ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            call()
            return True
        except DuplicateTaskError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


@pytest.mark.parametrize("check", [True, False])
def test_foreign_worker_holder_is_taken_over_once_finished(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path, check: bool
) -> None:
    """A task run by a worker without celery_unique keeps its lock; the check takes it over once SUCCESS."""
    life = Lifecycle.on(redis_server, unique_check_holder=check)
    app, scratch = life.app(), life.scratch_client()
    with life.worker(tmp_path / "foreign.log", app="tests.foreign_app"):
        first = send_unique(app, "foreign.charge", (7,), unique=60)
        wait_until(lambda: scratch.llen("charged:7") == 1, what="first charge")
        wait_until(lambda: first.state == "SUCCESS", what="SUCCESS stored")
        assert len(locks.keys("*")) == 1  # never released: that worker has no receivers
        if check:
            second = send_unique(app, "foreign.charge", (7,), unique=60)
            assert second.id != first.id
            wait_until(lambda: scratch.llen("charged:7") == 2, what="second charge")
        else:
            with pytest.raises(DuplicateTaskError) as info:
                send_unique(app, "foreign.charge", (7,), unique=60)
            assert info.value.task_id == first.id


@pytest.fixture
def lock_server() -> Iterator[RedisServer]:
    """A redis-server of its own for the locks, so a test can pause it."""
    with RedisServer() as server:
        yield server


def test_release_missed_while_the_store_blinked_does_not_block(
    redis_server: RedisServer, lock_server: RedisServer, tmp_path: Path
) -> None:
    """A release lost to a paused lock store leaves a lock the next call takes over (state SUCCESS)."""
    life = Lifecycle(
        broker=redis_server.url(BROKER_DB),
        backend=redis_server.url(RESULT_DB),
        locks=lock_server.url(LOCK_DB),
        scratch=redis_server.url(SCRATCH_DB),
        conf={"unique_running_ttl": 1},
    )
    app, scratch = life.app(), life.scratch_client()
    work = app.tasks["life.work"]
    store = lock_server.client(LOCK_DB)
    with life.worker(tmp_path / "worker.log"):
        first = work.apply_async(("blink",), {"seconds": 1}, unique=60)
        wait_until(lambda: "start" in events(scratch, "blink"), what="started")
        lock_server.client().execute_command("CLIENT", "PAUSE", 3000, "WRITE")
        wait_until(lambda: first.state == "SUCCESS", timeout=20, what="SUCCESS stored")
        time.sleep(3)  # the pause is over; the release it swallowed is gone
        key = work.lock_key(("blink",), {"seconds": 1}, {})
        assert store.get(key) == first.id.encode()
        assert "could not" in (tmp_path / "worker.log").read_text()
        second = work.apply_async(("blink",), {"seconds": 1}, unique=60)
        assert second.get(timeout=20) == "blink"
        assert events(scratch, "blink").count("start") == 2


def test_stale_result_of_a_reused_task_id_is_not_a_finished_holder(
    redis_server: RedisServer, locks: redis.Redis
) -> None:
    """A reused task id's earlier SUCCESS does not let a duplicate take over its queued successor."""
    life = Lifecycle.on(redis_server)
    app = life.app()
    work = app.tasks["life.work"]
    app.backend.mark_as_done("report-9", "earlier run")  # an earlier run of the same id
    queued = work.apply_async(("reused",), unique=60, task_id="report-9", countdown=60)
    with pytest.raises(DuplicateTaskError) as info:
        work.apply_async(("reused",), unique=60)
    assert info.value.task_id == queued.id == "report-9"


def test_reap_releases_only_finished_holders(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """UniqueLocks.reap() releases the locks of finished holders and leaves the others."""
    life = Lifecycle.on(redis_server)
    app, scratch = life.app(), life.scratch_client()
    with life.worker(tmp_path / "foreign.log", app="tests.foreign_app"):
        finished = send_unique(app, "foreign.charge", (1,), unique=60)
        wait_until(lambda: finished.state == "SUCCESS", what="SUCCESS stored")
    waiting = send_unique(app, "foreign.charge", (2,), unique=60)  # no worker now: PENDING
    assert scratch.llen("charged:1") == 1
    assert UniqueLocks(app).reap() == 1
    holders = {lock.task_id for lock in UniqueLocks(app).list()}
    assert holders == {waiting.id}


@pytest.mark.parametrize("backend", [True, False])
def test_revoked_scheduled_task_frees_the_call_within_a_second(
    redis_server: RedisServer, tmp_path: Path, backend: bool
) -> None:
    """After revoke() of a task waiting for its countdown, the same call is accepted within a second."""
    life = Lifecycle.on(redis_server, backend=backend)
    app = life.app()
    work = app.tasks["life.work"]
    with life.worker(tmp_path / "worker.log"):
        scheduled = work.apply_async(("later",), unique=600, countdown=60)
        wait_until(lambda: "received" in (tmp_path / "worker.log").read_text(), what="reserved")
        app.control.revoke(scheduled.id)
        assert accepted_within(lambda: work.apply_async(("later",), unique=600, countdown=60), 1.5)


def test_revoked_task_still_in_the_broker_frees_the_call_when_discarded(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A revoked task still queued in the broker keeps the call's lock until a worker discards it, unrun.

    The REVOKED a worker stores for a task it does not hold frees nothing:
    another worker may be running that task. The worker that takes the
    message discards it and frees the call.
    """
    life = Lifecycle.on(redis_server)
    app, scratch = life.app(), life.scratch_client()
    work = app.tasks["life.work"]
    with life.worker(tmp_path / "worker.log"):
        work.apply_async(("busy",), {"seconds": 3})
        work.apply_async(("reserved",), {"seconds": 1})
        queued = work.apply_async(("queued",), unique=600)
        time.sleep(0.5)
        assert queued.id not in (tmp_path / "worker.log").read_text()  # still in the broker
        app.control.revoke(queued.id)
        time.sleep(1)
        with pytest.raises(DuplicateTaskError):
            work.apply_async(("queued",), unique=600)
        assert accepted_within(lambda: work.apply_async(("queued",), unique=600), 10)
        wait_until(lambda: events(scratch, "queued") == ["start", "end"], what="the new call runs")
        time.sleep(0.5)
    assert events(scratch, "queued") == ["start", "end"]  # the revoked one never ran
