"""``unique_task``: declare a unique task with typed options, where ``app.task`` is untyped.

``@unique_task(app, unique=600)`` is ``@app.task(base=UniqueTask, unique=600)``,
and without an app it is ``@shared_task(base=UniqueTask, ...)``. Celery itself
has no annotations: without celery-types, mypy sees a task made by
``app.task`` as ``Any`` (``--strict`` calls the decorator untyped) and pyright
ignores the decorator and sees a plain function. A task made here is a
``UniqueTask`` to both, so its ``apply_async``, ``delay`` and signatures are
checked, and so are the unique options given here.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar, overload

from celery import shared_task

from .task import UniqueTask

if TYPE_CHECKING:
    from celery import Celery

    from .options import OnDuplicate, OnStoreError, UniqueOn, Until, WhileRunning

__all__ = ["unique_task"]

_T = TypeVar("_T", bound=UniqueTask)
_UNSET: Any = object()


@overload
def unique_task(
    app: Celery | None = None,
    *,
    base: type[_T],
    unique: float | timedelta | None = ...,
    unique_on: UniqueOn | None = ...,
    unique_until: Until | None = ...,
    on_duplicate: OnDuplicate | None = ...,
    unique_on_store_error: OnStoreError | None = ...,
    unique_max_wait: float | timedelta | None = ...,
    unique_limit: int | None = ...,
    unique_while_running: WhileRunning | None = ...,
    **options: Any,
) -> Callable[[Callable[..., Any]], _T]: ...


@overload
def unique_task(
    app: Celery | None = None,
    *,
    unique: float | timedelta | None = ...,
    unique_on: UniqueOn | None = ...,
    unique_until: Until | None = ...,
    on_duplicate: OnDuplicate | None = ...,
    unique_on_store_error: OnStoreError | None = ...,
    unique_max_wait: float | timedelta | None = ...,
    unique_limit: int | None = ...,
    unique_while_running: WhileRunning | None = ...,
    **options: Any,
) -> Callable[[Callable[..., Any]], UniqueTask]: ...


def unique_task(
    app: Celery | None = None,
    *,
    base: type[UniqueTask] = UniqueTask,
    unique: float | timedelta | None = _UNSET,
    unique_on: UniqueOn | None = _UNSET,
    unique_until: Until | None = _UNSET,
    on_duplicate: OnDuplicate | None = _UNSET,
    unique_on_store_error: OnStoreError | None = _UNSET,
    unique_max_wait: float | timedelta | None = _UNSET,
    unique_limit: int | None = _UNSET,
    unique_while_running: WhileRunning | None = _UNSET,
    **options: Any,
) -> Callable[[Callable[..., Any]], UniqueTask]:
    """Return ``app.task`` (or ``shared_task``) for a ``UniqueTask``, typed.

    ``base`` is the task class (``UniqueTask`` or a subclass, such as
    ``UniqueDjangoTask``); the unique options given become the task's
    defaults, as they do with ``app.task``; the other options go to
    ``app.task`` as they are.
    """
    given = {
        "unique": unique,
        "unique_on": unique_on,
        "unique_until": unique_until,
        "on_duplicate": on_duplicate,
        "unique_on_store_error": unique_on_store_error,
        "unique_max_wait": unique_max_wait,
        "unique_limit": unique_limit,
        "unique_while_running": unique_while_running,
    }
    options.update((name, value) for name, value in given.items() if value is not _UNSET)
    decorator: Callable[[Callable[..., Any]], UniqueTask] = (
        shared_task(base=base, **options) if app is None else app.task(base=base, **options)
    )
    return decorator
