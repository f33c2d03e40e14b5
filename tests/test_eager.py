"""Eager runs follow a worker's rules: task_always_eager, apply(), and eager canvases."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from celery import Celery, chain, group

from celery_unique import DuplicateTaskError, UniqueTask
from celery_unique.config import lock_store


@pytest.fixture
def eager_tasks(celery_app: Celery) -> Any:
    """Tasks that report whether they hold their own lock while they run."""

    @celery_app.task(base=UniqueTask, name="tests.eager_holds", bind=True)
    def holds(self: UniqueTask, x: int) -> int:
        key = self.request.headers["celery_unique_lock"]
        assert lock_store(self.app).holder(key) == self.request.id, "runs without its lock"
        return x + 1

    @celery_app.task(base=UniqueTask, name="tests.eager_fails")
    def fails(x: int) -> None:
        raise RuntimeError(f"eager failure {x}")

    return holds, fails


def test_eager_success_releases(eager: Celery, eager_tasks: Any, locks: redis.Redis) -> None:
    """An eager task holds its lock while it runs and releases it on success."""
    holds, _ = eager_tasks
    assert holds.apply_async((1,), unique=60).get() == 2
    assert locks.dbsize() == 0


@pytest.mark.parametrize(("until", "kept"), [("success", True), ("finish", False)])
def test_eager_propagated_failure_follows_the_mode(
    eager: Celery, eager_tasks: Any, locks: redis.Redis, until: str, kept: bool
) -> None:
    """With task_eager_propagates, a final failure keeps the lock under "success", as a worker does."""
    _, fails = eager_tasks
    with pytest.raises(RuntimeError):
        fails.apply_async((1,), unique=60, unique_until=until)
    assert locks.dbsize() == (1 if kept else 0)
    if kept:
        with pytest.raises(DuplicateTaskError):
            fails.apply_async((1,), unique=60)


def test_eager_chain_members_lock_and_release(eager: Celery, eager_tasks: Any, locks: redis.Redis) -> None:
    """Each member of an eager chain takes its lock for its run and releases it."""
    holds, _ = eager_tasks
    members = [holds.s(1).set(unique=60), holds.s().set(unique=60), holds.s().set(unique=60)]
    result = chain(*members).apply_async()
    assert result.get() == 4
    assert locks.dbsize() == 0


def test_eager_group_duplicate_member_is_refused(
    celery_app: Celery, eager_tasks: Any, locks: redis.Redis
) -> None:
    """A group run with apply() refuses a member whose lock is held, as apply_async would."""
    holds, _ = eager_tasks
    holds.apply_async((5,), unique=60, countdown=60)  # queued: holds holds(5)
    with pytest.raises(DuplicateTaskError):
        group(holds.s(4).set(unique=60), holds.s(5).set(unique=60)).apply()
    assert locks.dbsize() == 1


def test_apply_takes_the_lock_as_apply_async_does(
    celery_app: Celery, eager_tasks: Any, locks: redis.Redis
) -> None:
    """Task.apply() with unique= runs under the call's lock and refuses a held one."""
    holds, _ = eager_tasks
    assert holds.apply((7,), unique=60).get() == 8
    assert locks.dbsize() == 0
    holds.apply_async((7,), unique=60, countdown=60)
    with pytest.raises(DuplicateTaskError):
        holds.apply((7,), unique=60)


def test_eager_chain_whose_first_step_is_refused_fails_at_once(eager: Celery, eager_tasks: Any) -> None:
    """Eagerly, a chain whose first step is refused with "existing" raises at once instead of waiting."""
    holds, _ = eager_tasks
    eager.conf.task_always_eager = False
    holds.apply_async((5,), unique=60, countdown=60)  # a holder a worker would run in a minute
    eager.conf.task_always_eager = True
    with pytest.raises(DuplicateTaskError):
        chain(holds.s(5).set(unique=60, on_duplicate="existing"), holds.s()).apply_async()


def test_eager_group_member_refused_fails_at_once(eager: Celery, eager_tasks: Any) -> None:
    """Eagerly, a group member refused with "existing" is a failed result at once; the others run."""
    holds, _ = eager_tasks
    eager.conf.task_always_eager = False
    holds.apply_async((6,), unique=60, countdown=60)
    eager.conf.task_always_eager = True
    refused, other = group(
        holds.s(6).set(unique=60, on_duplicate="existing"), holds.s(7).set(unique=60)
    ).apply_async().results
    with pytest.raises(DuplicateTaskError):
        refused.get(timeout=1)
    assert other.get(timeout=1) == 8
