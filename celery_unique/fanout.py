"""The calls a ``fan_out()`` block defers, to take all their locks in one round trip.

Inside :func:`celery_unique.fan_out`, a unique task's ``apply_async`` with a
task id already chosen (each member of a group or chord header, a chain's
first step, a frozen signature) is not locked or published at once: it is
kept here as a signature (deferred), and the block's end hands every one of them to
:func:`celery_unique.apply_many`, which takes their locks in one script
call. Celery's canvases do not use the result a member's ``apply_async``
returns (they keep the one they froze), so the member's own ``AsyncResult``
stands in until then.

This module holds only the collection, so that :mod:`celery_unique.task`
can consult it without importing the batch machinery that imports the task.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

from celery.canvas import Signature

from .continuation import continued_run

__all__ = ["Batch", "defer_call", "deferred", "outside_block"]


class Batch:
    """The calls a ``fan_out()`` block deferred; closed once the block ends.

    A context copied inside the block (an asyncio task, ``to_thread``) keeps
    a reference to it: a call made there after the block ended finds it
    closed and goes out at once instead of into a batch already sent.
    """

    __slots__ = ("calls", "open")

    def __init__(self) -> None:
        self.calls: list[Signature[Any]] = []
        self.open = True


#: The batch of the ``fan_out()`` block of this context, or None outside one.
deferred: ContextVar[Batch | None] = ContextVar("celery_unique_fan_out", default=None)


def outside_block(call: Callable[..., Any], *args: Any) -> Any:
    """``call(*args)`` with no block open: what it sends goes out at once.

    A ``Task.replace()`` sends its replacement so: the ``Ignore`` it raises
    next would make an open block drop the replacement.
    """
    if deferred.get() is None:
        return call(*args)
    token = deferred.set(None)
    try:
        return call(*args)
    finally:
        deferred.reset(token)


def defer_call(
    task: Any,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    task_id: str | None,
    parameters: Mapping[str, Any],
    options: Mapping[str, Any],
) -> bool:
    """Keep this ``apply_async`` call for the block's end, if a block is open and the call can wait.

    It waits when its id is chosen already (so that its result is known
    now), it is not run eagerly, and it is not a task's own retry or
    replacement (which continues a lock at once). ``parameters`` are
    ``apply_async``'s ``link``, ``link_error`` and ``shadow``; the producer
    is left out, since the block's end publishes on a producer of its own.
    """
    batch = deferred.get()
    if batch is None or not batch.open or not task_id or task._get_app().conf.task_always_eager:
        return False
    if options.get("unique", task.unique) is None:
        return False  # takes no lock: it goes out as it is made, as a plain task's call does
    if continued_run(task, task_id, options) is not None:
        return False
    own = {name: value for name, value in parameters.items() if value is not None}
    batch.calls.append(Signature(task.name, args, kwargs, {**options, **own, "task_id": task_id},
                           type=task, app=task._get_app()))
    return True
