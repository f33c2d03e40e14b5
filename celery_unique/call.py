"""``Call``: one call of a unique task, from ``apply_async`` or ``apply`` to its lock and its refusal.

====================  ========================================================
set                   fields
====================  ========================================================
as the call is made   ``task``, ``args``, ``kwargs``, ``options``, ``task_id``
                      (the caller's, or None), ``link``, ``link_error``,
                      ``producer``, ``shadow``, ``from_schedule``
by ``lock()``         ``unique`` (the resolved options), ``key``, ``task_id``
                      (now the lock's: the caller's or a new one), ``chosen``,
                      ``nonce``, and the lock's headers in ``options``
====================  ========================================================

:func:`celery_unique.enqueue.lock` fills in the rest once, before it asks
for the lock; nothing changes a call after that. Each step of the enqueue
(the lock, a refusal and the canvas's record of it, the publish, an eager
run) takes the call as its one argument, so none of them restates another's
parameter list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from .options import UniqueOptions

__all__ = ["Call"]


# slots, not frozen: a frozen dataclass costs several times as much to build,
# once on every call.
@dataclass(slots=True)
class Call:
    """One call of a unique task: what the caller asked, and the lock it takes."""

    #: The ``UniqueTask`` called.
    task: Any
    args: Sequence[Any] | None
    kwargs: Mapping[str, Any] | None
    #: Celery's options for the publish (or the run here); the lock adds its headers.
    options: dict[str, Any]
    #: The id Celery gets: the caller's (or None), then the one the lock holds.
    task_id: str | None
    link: Any = None
    link_error: Any = None
    #: ``apply_async``'s own, for the publish.
    producer: Any = None
    shadow: str | None = None
    #: A scheduler sent it (Celery beat, django-celery-beat): a duplicate is only logged.
    from_schedule: bool = False
    #: The options as resolved for this call (set by ``lock()``).
    unique: UniqueOptions = field(init=False)
    #: The lock key (set by ``lock()``).
    key: str = field(init=False)
    #: Whether the caller chose the task id (set by ``lock()``).
    chosen: bool = field(init=False)
    #: The incarnation of a caller-chosen or replaceable call, else None (set by ``lock()``).
    nonce: str | None = field(init=False)
    #: Whether a later call may replace this one (``on_duplicate="replace"``; set by ``lock()``).
    replaceable: bool = field(init=False)

    @property
    def lock_id(self) -> str:
        """The task id the lock holds: ``task_id``, once ``lock()`` has given the call one."""
        return cast(str, self.task_id)
