"""A throttle, unique_until="expiry": at most one accepted call per TTL window, whatever the task does."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery

from celery_unique import DuplicateTaskError, UniqueLocks, UniqueTask
from tests.conftest import wait_until


@pytest.fixture
def throttled(celery_app: Celery) -> SimpleNamespace:
    """Tasks whose locks live out their TTL."""
    ns = SimpleNamespace()

    @celery_app.task(base=UniqueTask, name="tests.sync_inbox", unique_until="expiry")
    def sync_inbox(user_id: int) -> int:
        return user_id

    @celery_app.task(base=UniqueTask, name="tests.sync_fails", unique_until="expiry")
    def sync_fails(user_id: int) -> None:
        raise RuntimeError(f"cannot sync {user_id}")

    @celery_app.task(
        base=UniqueTask, name="tests.sync_retries", bind=True, unique_until="expiry",
        max_retries=2, default_retry_delay=0.2,
    )
    def sync_retries(self: UniqueTask, user_id: int) -> int:
        if self.request.retries < 1:
            raise self.retry()
        return int(self.request.retries)

    ns.sync_inbox, ns.sync_fails, ns.sync_retries = sync_inbox, sync_fails, sync_retries
    return ns


def only_lock(locks: redis.Redis) -> bytes:
    (key,) = wait_until(lambda: locks.keys("*"), what="the lock")
    return bytes(key)


def test_success_keeps_the_lock_for_its_ttl(
    throttled: SimpleNamespace, worker: Any, locks: redis.Redis
) -> None:
    """A throttled task that succeeds keeps its lock: the next call is refused until the TTL passes."""
    first = throttled.sync_inbox.apply_async((1,), unique=2)
    assert first.get(timeout=10) == 1
    key = only_lock(locks)
    assert locks.get(key) == first.id.encode()
    # The holder's SUCCESS is stored, and the holder check would take a
    # "success" lock over; a throttle's stands.
    with pytest.raises(DuplicateTaskError) as info:
        throttled.sync_inbox.apply_async((1,), unique=2)
    assert info.value.task_id == first.id
    wait_until(lambda: not locks.exists(key), timeout=5, what="the TTL to pass")
    assert throttled.sync_inbox.apply_async((1,), unique=2).get(timeout=10) == 1


def test_final_failure_keeps_the_lock(
    throttled: SimpleNamespace, worker: Any, locks: redis.Redis
) -> None:
    """A throttled task that fails for good keeps its lock too."""
    first = throttled.sync_fails.apply_async((1,), unique=60)
    with pytest.raises(RuntimeError):
        first.get(timeout=10)
    assert locks.get(only_lock(locks)) == first.id.encode()
    with pytest.raises(DuplicateTaskError):
        throttled.sync_fails.apply_async((1,), unique=60)


def test_retries_continue_the_window(
    throttled: SimpleNamespace, worker: Any, locks: redis.Redis
) -> None:
    """A throttled task's retry runs under its lock, and the lock outlives the retry's success."""
    first = throttled.sync_retries.apply_async((1,), unique=60)
    assert first.get(timeout=10) == 1
    assert locks.get(only_lock(locks)) == first.id.encode()


def test_revoke_frees_the_window(
    throttled: SimpleNamespace, worker: Any, locks: redis.Redis
) -> None:
    """A revoked throttled call never ran: its lock goes, and the next call is accepted."""
    first = throttled.sync_inbox.apply_async((1,), unique=60, countdown=1.5)
    key = only_lock(locks)
    time.sleep(0.5)  # the worker holds the countdown message
    first.revoke()
    wait_until(lambda: not locks.exists(key), what="the revoke to free the lock")
    assert throttled.sync_inbox.apply_async((1,), unique=60).get(timeout=10) == 1


def test_reap_leaves_a_throttle_alone(
    celery_app: Celery, throttled: SimpleNamespace, worker: Any, locks: redis.Redis
) -> None:
    """The reaper never finds a throttle's holder finished."""
    first = throttled.sync_inbox.apply_async((1,), unique=60)
    first.get(timeout=10)
    assert UniqueLocks(celery_app).reap() == 0
    assert locks.get(only_lock(locks)) == first.id.encode()


def test_eager_run_keeps_the_lock(eager: Celery, throttled: SimpleNamespace, locks: redis.Redis) -> None:
    """An eager throttled call keeps its lock after it ran, like a worker's run."""
    assert throttled.sync_inbox.apply_async((1,), unique=60).result == 1
    only_lock(locks)
    with pytest.raises(DuplicateTaskError):
        throttled.sync_inbox.apply_async((1,), unique=60)
