"""Purge: queued messages go, exactly their locks are released, running and reserved tasks keep theirs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from celery_unique import UniqueLocks
from celery_unique.testing import RedisServer
from tests.conftest import BROKER_DB, LOCK_DB, RESULT_DB, wait_until
from tests.lifecycle_app import QUEUE
from tests.lifecycle_support import SCRATCH_DB, Lifecycle, events
from tests.rabbitmq import message_count
from tests.test_admin import celery_cli

pytestmark = pytest.mark.slow


def purge_while_busy(life: Lifecycle, tmp_path: Path, queued_count: Any) -> None:
    """Run a busy worker, queue more behind it, purge, and check which locks went."""
    app, scratch = life.app(), life.scratch_client()
    work = app.tasks["life.work"]
    locks = redis.Redis.from_url(life.locks)
    with life.worker(tmp_path / "worker.log"):
        running = work.apply_async(("running",), {"seconds": 4}, unique=60)
        wait_until(lambda: "start" in events(scratch, "running"), what="running")
        reserved = work.apply_async(("reserved",), unique=60)  # prefetched by the worker
        wait_until(lambda: reserved.id in (tmp_path / "worker.log").read_text(), what="reserved")
        calls = [f"queued-{i}" for i in range(3)]
        for token in calls:
            work.apply_async((token,), unique=60)
        plain = work.apply_async(("plain",))  # not unique: purged, nothing to release
        assert queued_count() == 4
        result = UniqueLocks(app).purge()
        assert (result.messages, result.released) == (4, 3)
        assert queued_count() == 0
        for token in calls:
            assert not locks.exists(work.lock_key((token,), {}, {}))
        held = {lock.task_id for lock in UniqueLocks(app).list()}
        assert held == {running.id, reserved.id}
        # The purged calls are accepted again (apply_async would raise otherwise).
        for token in calls:
            work.apply_async((token,), unique=60)
        assert running.get(timeout=20) == "running"
        assert plain.id not in (tmp_path / "worker.log").read_text()


def test_purge_on_a_redis_broker(redis_server: RedisServer, tmp_path: Path) -> None:
    """On a Redis broker, purge removes the queued messages and releases exactly their locks."""
    life = Lifecycle.on(redis_server)
    broker = redis_server.client(BROKER_DB)
    purge_while_busy(life, tmp_path, lambda: broker.llen(QUEUE))


def test_cli_purge_and_reap(redis_server: RedisServer, tasks: SimpleNamespace, locks: redis.Redis) -> None:
    """`celery unique purge -f` empties the queue and releases its locks; `reap` needs a result backend."""
    for user in (1, 2):
        tasks.send_report.apply_async((user,), unique=60)
    assert locks.dbsize() == 2
    purged = celery_cli(redis_server, "purge", "-f", "-Q", "celery")
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.splitlines()[-1] == "Purged 2 messages from 1 queue; released 2 locks."
    # Only markers are left, saying "purged" until the locks' deadlines, so
    # that a copy of a purged message waiting elsewhere never runs.
    assert locks.dbsize() == 0
    left = redis.Redis(connection_pool=locks.connection_pool).keys("*")
    assert len(left) == 2
    assert all(b":run:{" in key for key in left)
    assert all(locks.get(key).startswith(b"x|") and 0 < locks.pttl(key) <= 60_000 for key in left)
    assert redis_server.client(BROKER_DB).llen("celery") == 0

    reaped = celery_cli(redis_server, "reap")
    assert reaped.returncode == 1
    assert reaped.stderr.strip() == (
        "Error: reap needs a result backend to tell finished tasks from queued ones: set result_backend"
    )
    with_backend = celery_cli(redis_server, "reap", settings={"result_backend": redis_server.url(1)})
    assert with_backend.returncode == 0, with_backend.stderr
    assert with_backend.stdout.splitlines()[-1] == "No lock of a finished task."


def test_purge_on_a_rabbitmq_broker(redis_server: RedisServer, rabbitmq_url: str, tmp_path: Path) -> None:
    """On a RabbitMQ broker, purge removes the queued messages and releases exactly their locks."""
    life = Lifecycle(
        broker=rabbitmq_url,
        backend=redis_server.url(RESULT_DB),
        locks=redis_server.url(LOCK_DB),
        scratch=redis_server.url(SCRATCH_DB),
    )
    purge_while_busy(life, tmp_path, lambda: message_count(rabbitmq_url, QUEUE))
