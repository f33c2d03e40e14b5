"""Purge queues as ``celery purge`` does, and release exactly the locks their messages held.

``celery purge`` deletes the queued messages in one command and leaves their
locks to their TTL: the same calls are refused although nothing is queued.
Here each message is taken off its queue, acknowledged, and then the lock
its ``celery_unique_lock`` header names is released, owner-checked against
its task id. Messages a worker has already received (running, reserved, or
waiting for their eta) are not in the queue, so their locks are never
touched; neither is a lock that has since passed to another task.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from kombu.entity import Queue

from .execution import LOCK_HEADER

if TYPE_CHECKING:
    from celery import Celery

    from .lock import LockStore

__all__ = ["PurgeResult", "purge_queues", "queue_names"]


class PurgeResult(NamedTuple):
    """What a purge removed."""

    #: Messages removed from the queues.
    messages: int
    #: Locks released (their messages' tasks held them).
    released: int


def queue_names(app: Celery, queues: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> list[str]:
    """The queues to purge: ``queues``, else every task queue the app knows, less ``exclude``."""
    names = set(queues or app.amqp.queues.keys())
    return sorted(names - set(exclude))


def purge_queues(app: Celery, store: LockStore, names: Iterable[str]) -> PurgeResult:
    """Remove every message from the queues ``names`` and release the locks they held."""
    messages = released = 0
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        for name in names:
            queue = Queue(name, channel=channel)  # type: ignore[no-untyped-call]
            while True:
                message: Any = queue.get(no_ack=False)  # type: ignore[no-untyped-call]
                if message is None:
                    break
                headers = message.headers or {}
                # Acknowledged first: if this process dies before the release,
                # the lock waits out its TTL, and the task is never both
                # requeued and unlocked.
                message.ack()
                messages += 1
                key, task_id = headers.get(LOCK_HEADER), headers.get("id")
                if isinstance(key, str) and isinstance(task_id, str) and store.release(key, task_id):
                    released += 1
    return PurgeResult(messages, released)
