"""Worker-side release of locks, and the ``task_duplicate`` signal.

The lock key travels with the task in the ``celery_unique_lock`` message
header, so the worker never recomputes it; ``celery_unique_until`` says when
to release it when that is not on success. Every release is owner-checked
against the task id: a task whose lock expired while it ran, or a message
whose header was forged, cannot delete a lock another task holds.

=============  ==========================================================
``unique_until``  released on
=============  ==========================================================
``success``    ``task_success`` (Asynq's rule; the default)
``finish``     ``task_success``, or ``task_failure`` (a final failure)
``start``      ``task_prerun``, as the task starts running
(any)          ``task_revoked``: a revoke or an expired message
=============  ==========================================================
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Task
from celery.signals import task_failure, task_prerun, task_revoked, task_success
from celery.utils.dispatch import Signal

from .config import app_state

__all__ = ["LOCK_HEADER", "UNTIL_HEADER", "task_duplicate"]

logger = logging.getLogger(__name__)

#: The message header that carries a task's lock key to the worker.
LOCK_HEADER = "celery_unique_lock"
#: The message header that says when to release, if not on success.
UNTIL_HEADER = "celery_unique_until"

#: Sent for every refused duplicate, with ``sender=<task>``, ``key``,
#: ``task_id`` (the holder), ``args`` and ``kwargs``.
task_duplicate = Signal(name="task_duplicate")


def release_lock(task: Task, request: Any, when: str) -> bool:
    """Release the lock ``request`` carries if it is due ``when`` and the task holds it."""
    # Custom message headers land in request.headers, in a worker and in
    # eager mode alike (Task.retry() copies them into the retry message).
    headers = getattr(request, "headers", None)
    if not headers:
        return False
    key = headers.get(LOCK_HEADER)
    if not isinstance(key, str) or not request.id:
        return False
    if when != "revoked" and when not in _RELEASED_ON.get(headers.get(UNTIL_HEADER), ()):
        return False
    try:
        return app_state(task.app).store.release(key, request.id)
    except redis.RedisError as exc:
        logger.warning(
            "celery_unique: could not release lock %s of task %s[%s] (%s); its TTL will free it",
            key, task.name, request.id, exc,
        )
        return False


# unique_until -> the events that release its lock (None: the default).
_RELEASED_ON: dict[Any, tuple[str, ...]] = {
    None: ("success",),
    "success": ("success",),
    "finish": ("success", "failure"),
    "start": ("start",),
}


def _release_on_start(sender: Task | None = None, **_: Any) -> None:
    if sender is not None:
        release_lock(sender, sender.request, "start")


def _release_on_success(sender: Task | None = None, **_: Any) -> None:
    if sender is not None:
        release_lock(sender, sender.request, "success")


def _release_on_failure(sender: Task | None = None, **_: Any) -> None:
    # task_failure means a final failure: a retry raises Retry instead.
    if sender is not None:
        release_lock(sender, sender.request, "failure")


def _release_on_revoked(sender: Task | None = None, request: Any = None, **_: Any) -> None:
    # Asynq: deleting a task releases its lock. Celery's counterparts are a
    # revoke (terminated or not) and an expired message.
    if sender is not None and request is not None:
        release_lock(sender, request, "revoked")


# Connected once, at import: the receivers act only on tasks whose message
# carries a lock key, so other tasks pay one attribute lookup.
task_prerun.connect(_release_on_start, weak=False)
task_success.connect(_release_on_success, weak=False)
task_failure.connect(_release_on_failure, weak=False)
task_revoked.connect(_release_on_revoked, weak=False)
