"""``send_unique``: enqueue by name with uniqueness, where ``app.send_task`` cannot.

``app.send_task`` publishes directly and never calls a task's
``apply_async``, so it bypasses the lock. ``send_unique`` is the supported way
to enqueue by name: it uses the registered task when the app has it (its
signature binds the arguments, its options route the message) and otherwise
keys the lock on the arguments exactly as given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from celery import Task
from celery.result import AsyncResult

from .call import Call
from .keys import run_signature
from .task import UniqueTask

if TYPE_CHECKING:
    from celery import Celery

    from .options import OnDuplicate, UniqueOn, Until

__all__ = ["send_unique"]

#: Attribute of the Celery app that holds its stand-in task class.
_STAND_IN_ATTR = "_celery_unique_named_task"
_UNSET: Any = object()


def send_unique(
    app: Celery,
    name: str,
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    *,
    unique: float | timedelta | None = None,
    unique_on: UniqueOn | None = _UNSET,
    unique_until: Until | None = None,
    on_duplicate: OnDuplicate | None = None,
    **options: Any,
) -> AsyncResult[Any]:
    """Enqueue the task ``name`` as ``send_task`` does, taking its unique lock first.

    ``unique`` and the other unique options (``unique_on``, ``unique_until``,
    ``on_duplicate``) work as in ``apply_async``. A registered ``UniqueTask``
    with a default TTL needs no ``unique``.
    """
    registered = app.tasks.get(name)
    if unique is not None:
        options["unique"] = unique
    # Omitted, unique_on is the task's; None is all arguments.
    if unique_on is not _UNSET:
        options["unique_on"] = unique_on
    if unique_until is not None:
        options["unique_until"] = unique_until
    if on_duplicate is not None:
        options["on_duplicate"] = on_duplicate
    if isinstance(registered, UniqueTask):
        return registered.apply_async(args, kwargs, **options)
    return _stand_in_class(app)(name, registered).apply_async(args, kwargs, **options)


def _stand_in_class(app: Celery) -> type[_NamedTask]:
    """Return the stand-in task class bound to ``app``, made on first use."""
    # Celery binds tasks to apps per class, so the stand-in needs a class of
    # its own per app. One per call would be garbage that only the cyclic
    # collector frees (a class refers to itself through its __mro__): about
    # 2 KB a call, piling up between full collections in a busy producer.
    cls: type[_NamedTask] | None = app.__dict__.get(_STAND_IN_ATTR)
    if cls is None:
        made = type("NamedTask", (_NamedTask,), {"_app": app, "__bound__": True})
        # Two threads may both make one; every caller then uses the one kept.
        cls = app.__dict__.setdefault(_STAND_IN_ATTR, made)
    return cls


class _NamedTask(UniqueTask):
    """Stands in for a task the app knows only by name, or as a plain ``Task``."""

    def __init__(self, name: str, registered: Task | None) -> None:
        self.name = name
        self._registered = registered
        if registered is not None:
            self.typing = registered.typing
            # Worked out once and kept on the registered task, not per call.
            self.__dict__["_unique_signature"] = run_signature(registered)
        else:
            # Another service's task: its parameters are unknown here, so the
            # arguments are keyed as given.
            self.typing = False
            self.__dict__["_unique_signature"] = None

    def _get_exec_options(self) -> dict[str, Any]:
        if self._registered is not None:
            return dict(self._registered._get_exec_options())
        return {}

    def _publish(self, call: Call) -> AsyncResult[Any]:
        return self._get_app().send_task(
            self.name, call.args, call.kwargs, task_id=call.task_id, producer=call.producer,
            link=call.link, link_error=call.link_error, shadow=call.shadow, **call.options,
        )
