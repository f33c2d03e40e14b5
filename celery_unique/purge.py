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

import contextlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from kombu.entity import Queue

from .headers import carried_by
from .lock import attempt_of

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
    """Remove every message from the queues ``names`` and release the locks they held.

    A queue the broker does not know (on RabbitMQ, one not declared yet)
    holds no message, as for ``celery purge``: the next queues are purged all
    the same.
    """
    messages = released = 0
    with app.connection_for_write() as connection:
        for name in names:
            # A channel of its own per queue: on RabbitMQ, an unknown queue
            # closes the channel that asked for it.
            channel = connection.channel()
            try:
                queue = Queue(name, channel=channel)  # type: ignore[no-untyped-call]
                while True:
                    message: Any = queue.get(no_ack=False)  # type: ignore[no-untyped-call]
                    if message is None:
                        break
                    # Acknowledged first: if this process dies before the
                    # release, the lock waits out its TTL, and the task is
                    # never both requeued and unlocked.
                    message.ack()
                    messages += 1
                    released += _release(store, message)
            except connection.channel_errors:
                pass
            finally:
                _close(channel)
    return PurgeResult(messages, released)


def _release(store: LockStore, message: Any) -> int:
    headers = message.headers or {}
    carried = carried_by(headers)
    if carried is None:
        return 0
    task_id = headers.get("id")
    fields: Mapping[str, Any] = headers
    if not isinstance(task_id, str):
        # Task protocol 1: the id and the retries are in the body.
        body = message.payload
        fields = body if isinstance(body, Mapping) else {}
        task_id = fields.get("id")
    if not isinstance(task_id, str):
        return 0
    # Purged: any other copy of it (a redelivery waiting elsewhere) is dropped
    # too, and a copy that runs keeps the lock (see DISCARD_SCRIPT).
    return int(store.discard(carried.key, attempt_of(task_id, fields, carried.nonce), drop_later=True))


def _close(channel: Any) -> None:
    with contextlib.suppress(Exception):  # already closed by the broker's error
        channel.close()
