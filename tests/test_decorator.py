"""unique_task declares unique tasks as app.task does, with typed options."""

from __future__ import annotations

import pytest
import redis
from celery import Celery

from celery_unique import DuplicateTaskError, UniqueTask, unique_task


def test_unique_task_declares_a_unique_task(celery_app: Celery, broker: redis.Redis) -> None:
    """A task made by unique_task is a registered UniqueTask whose options are its defaults."""

    @unique_task(celery_app, name="tests.declared", unique=60, unique_on="user_id", on_duplicate="raise")
    def declared(user_id: int, note: str = "") -> str:
        return note

    assert isinstance(declared, UniqueTask)
    assert isinstance(celery_app.tasks["tests.declared"], UniqueTask)
    assert (declared.unique, declared.unique_on, declared.on_duplicate) == (60, "user_id", "raise")
    first = declared.delay(7, "a")
    with pytest.raises(DuplicateTaskError) as info:
        declared.delay(7, "b")  # the same user: unique_on left the note out
    assert info.value.task_id == first.id
    assert broker.llen("celery") == 1


def test_unique_task_leaves_omitted_options_to_the_base(celery_app: Celery) -> None:
    """Options not given to unique_task keep the base class's defaults, and the task is of that class."""

    class UntilStart(UniqueTask):  # type: ignore[misc,unused-ignore]
        unique_until = "start"

    @unique_task(celery_app, base=UntilStart, name="tests.declared_start", unique=60)
    def started() -> None:
        pass

    assert isinstance(started, UntilStart)
    assert (started.unique, started.unique_until, started.on_duplicate) == (60, "start", None)


def test_unique_task_without_an_app_is_a_shared_task(celery_app: Celery) -> None:
    """Without an app, unique_task is shared_task: the task is on every app, the current one too."""

    @unique_task(name="tests.typing_shared_declared", unique=30)
    def shared(x: int) -> int:
        return x

    task = celery_app.tasks["tests.typing_shared_declared"]
    assert isinstance(task, UniqueTask)
    assert task.unique == 30
    assert shared.name == task.name
