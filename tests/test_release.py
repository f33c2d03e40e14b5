"""Releasing locks through real workers: success, retries, failure, revoke, expiry, owner check."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker

from celery_unique import DuplicateTaskError
from tests.conftest import wait_until


def only_key(locks: redis.Redis) -> bytes:
    keys = locks.keys("*")
    assert len(keys) == 1, keys
    return bytes(keys[0])


def test_success_releases_the_lock(
    tasks: SimpleNamespace, worker: Any, locks: redis.Redis
) -> None:
    """After the task succeeds the lock is gone and the same enqueue is accepted again."""
    first = tasks.send_report.apply_async((42,), unique=3600)
    assert first.get(timeout=10) == "report 42 daily"
    wait_until(lambda: locks.dbsize() == 0, what="lock released")
    second = tasks.send_report.apply_async((42,), unique=3600)
    assert second.get(timeout=10) == "report 42 daily"


def test_lock_is_held_while_the_task_runs(tasks: SimpleNamespace, worker: Any) -> None:
    """While the task runs, its own id holds the lock."""
    result = tasks.held_by.apply_async((1,), unique=60)
    assert result.get(timeout=10) == result.id


def test_failure_keeps_the_lock_until_ttl(
    tasks: SimpleNamespace, worker: Any, locks: redis.Redis
) -> None:
    """A task that fails for good keeps its lock (Asynq); duplicates stay refused."""
    result = tasks.fail.apply_async((1,), unique=60)
    with pytest.raises(RuntimeError):
        result.get(timeout=10)
    key = only_key(locks)
    assert locks.get(key) == result.id.encode()
    with pytest.raises(DuplicateTaskError):
        tasks.fail.apply_async((1,), unique=60)


def test_failure_lock_expires_with_its_ttl(
    tasks: SimpleNamespace, worker: Any, locks: redis.Redis
) -> None:
    """The TTL frees a failed task's lock, then the call is accepted again."""
    result = tasks.fail.apply_async((2,), unique=1)
    with pytest.raises(RuntimeError):
        result.get(timeout=10)
    wait_until(lambda: locks.dbsize() == 0, timeout=5, what="ttl expiry")
    tasks.fail.apply_async((2,), unique=1)


def test_retry_keeps_the_lock_and_succeeds(
    tasks: SimpleNamespace, worker: Any, locks: redis.Redis
) -> None:
    """Task.retry() re-enqueues under the same id without a duplicate error, then releases."""
    result = tasks.flaky.apply_async((1,), {"failures": 2}, unique=60)
    key = wait_until(lambda: locks.keys("*"), what="lock")[0]
    # While it waits for its retries, duplicates are refused.
    with pytest.raises(DuplicateTaskError) as info:
        tasks.flaky.apply_async((1,), {"failures": 2}, unique=60)
    assert info.value.task_id == result.id
    assert result.get(timeout=15) == 2
    wait_until(lambda: not locks.exists(key), what="released after retries")


def test_retry_with_task_default_ttl(celery_app: Celery, locks: redis.Redis) -> None:
    """A task whose TTL is its default re-takes its own lock on retry and passes."""
    from celery_unique import UniqueTask

    @celery_app.task(base=UniqueTask, name="tests.retry_default", bind=True, unique=60)
    def retry_default(self: UniqueTask, x: int) -> int:
        if self.request.retries < 1:
            raise self.retry(countdown=0.1)
        return x

    with start_worker(celery_app, pool="solo", perform_ping_check=False):
        result = retry_default.delay(5)
        assert result.get(timeout=15) == 5
        wait_until(lambda: locks.dbsize() == 0, what="released")


def test_revoke_releases_the_lock(
    celery_app: Celery, tasks: SimpleNamespace, worker: Any, locks: redis.Redis
) -> None:
    """A revoked task releases its lock (Asynq: deleting a task releases its lock)."""
    result = tasks.send_report.apply_async((3,), unique=600, countdown=1.5)
    key = only_key(locks)
    time.sleep(0.5)  # let the worker receive the message
    result.revoke()
    wait_until(lambda: not locks.exists(key), timeout=10, what="released on revoke")
    assert result.state == "REVOKED"


def test_expiry_releases_the_lock(
    celery_app: Celery, tasks: SimpleNamespace, locks: redis.Redis
) -> None:
    """A message that expires before a worker takes it releases its lock."""
    result = tasks.send_report.apply_async((4,), unique=600, expires=0.5)
    key = only_key(locks)
    time.sleep(1)
    with start_worker(celery_app, pool="solo", perform_ping_check=False):
        wait_until(lambda: not locks.exists(key), timeout=10, what="released on expiry")
    assert result.state == "REVOKED"


def test_expired_lock_does_not_release_the_next_holder(
    tasks: SimpleNamespace, worker: Any, locks: redis.Redis
) -> None:
    """A task whose lock expired while it ran does not delete the newer holder's lock."""
    first = tasks.slow.apply_async((1,), {"seconds": 2.0}, unique=1)
    key = only_key(locks)
    wait_until(lambda: not locks.exists(key), timeout=5, what="first lock expired")
    # The newer copy waits on a countdown, so it is still queued when the first ends.
    second = tasks.slow.apply_async((1,), {"seconds": 2.0}, unique=60, countdown=30)
    assert first.get(timeout=10) == 1
    time.sleep(0.2)
    assert locks.get(key) == second.id.encode()
    second.revoke()


def test_store_release_is_owner_checked(tasks: SimpleNamespace, celery_app: Celery) -> None:
    """LockStore.release deletes only the holder's lock."""
    from celery_unique.config import lock_store

    result = tasks.send_report.apply_async((9,), unique=60)
    store = lock_store(celery_app)
    key = tasks.send_report.lock_key((9,), {}, {})
    assert store.release(key, "someone-else") is False
    assert store.holder(key) == result.id
    assert store.release(key, result.id) is True
    assert store.holder(key) is None
