"""Worker-side release of locks: on success, and on revoke or expiry.

The lock key travels with the task in the ``celery_unique_lock`` message
header, so the worker never recomputes it. Every release is owner-checked
against the task id: a task whose lock expired while it ran, or a message whose
header was forged, cannot delete a lock another task holds.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Task
from celery.signals import task_revoked, task_success

from .config import app_state

__all__ = ["LOCK_HEADER"]

logger = logging.getLogger(__name__)

#: The message header that carries a task's lock key to the worker.
LOCK_HEADER = "celery_unique_lock"


def lock_key_of(request: Any) -> str | None:
    """Return the lock key a task request carries, or None."""
    # Custom message headers land in request.headers, in a worker and in
    # eager mode alike (Task.retry() copies them into the retry message).
    headers = getattr(request, "headers", None)
    if not headers:
        return None
    key = headers.get(LOCK_HEADER)
    return key if isinstance(key, str) else None


def release_lock(task: Task, request: Any) -> bool:
    """Release the lock ``request`` carries, if its task still holds it."""
    key = lock_key_of(request)
    if key is None or not request.id:
        return False
    try:
        return app_state(task.app).store.release(key, request.id)
    except redis.RedisError as exc:
        logger.warning(
            "celery_unique: could not release lock %s of task %s[%s] (%s); its TTL will free it",
            key, task.name, request.id, exc,
        )
        return False


def _release_on_success(sender: Task | None = None, **_: Any) -> None:
    if sender is not None:
        release_lock(sender, sender.request)


def _release_on_revoked(sender: Task | None = None, request: Any = None, **_: Any) -> None:
    # Asynq: deleting a task releases its lock. Celery's counterparts are a
    # revoke (terminated or not) and an expired message.
    if sender is not None and request is not None:
        release_lock(sender, request)


# Connected once, at import: the receivers act only on tasks whose message
# carries a lock key, so other tasks pay one dict lookup.
task_success.connect(_release_on_success, weak=False)
task_revoked.connect(_release_on_revoked, weak=False)
