"""kombu transports that take a unique task's lock and queue its message in one script.

Select one explicitly::

    app.conf.broker_transport = "celery_unique.transport:Transport"          # redis://
    app.conf.broker_transport = "celery_unique.transport:SentinelTransport"  # sentinel://

They are kombu's Redis transports with one change, in the channel's ``_put``:
a message whose headers carry a ``celery_unique_ticket`` (put there by the
enqueue, see :mod:`celery_unique.atomic`) is queued by ENQUEUE_SCRIPT
(:mod:`celery_unique.lock`), which takes the lock too, and the answer goes
to the enqueue waiting on it. Every other message goes through kombu's own
``_put``, unchanged.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

from .atomic import TRANSPORT_FLAG, waiting
from .headers import TICKET_HEADER
from .lock import Ticket, enqueue_locked

__all__ = ["Channel", "SentinelChannel", "SentinelTransport", "Transport"]


class _AtomicPut:
    """The ``_put`` of the package's channels (a mixin before kombu's Redis ``Channel``)."""

    _unique_client: tuple[Any, int] | None = None

    def _enqueue_client(self) -> tuple[Any, int]:
        # One client on the channel's publishing pool, and that pool's
        # database, made once: kombu's _put builds a client on every publish,
        # which costs a sixth of a unique enqueue. A client is safe to share
        # between threads; the pool hands each command a connection.
        channel: Any = self
        pool = channel.pool
        made = self._unique_client
        if made is None or made[0].connection_pool is not pool:
            with channel.conn_or_acquire() as client:
                made = self._unique_client = (client, int(pool.connection_kwargs.get("db") or 0))
        return made

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        headers = message.get("headers")
        if not isinstance(headers, dict) or headers.get(TICKET_HEADER) is None:
            super()._put(queue, message, **kwargs)  # type: ignore[misc,unused-ignore]
            return
        # A copy without the ticket: kombu resends this very message after a
        # lost connection, and the worker never sees the ticket.
        message = {**message, "headers": {k: v for k, v in headers.items() if k != TICKET_HEADER}}
        ticket = Ticket(*headers[TICKET_HEADER])
        asking = waiting.get()
        if asking is None or asking.task_id != ticket.task_id:
            # No enqueue would hear of a refusal: kombu queues it as it is.
            super()._put(queue, message, **kwargs)  # type: ignore[misc,unused-ignore]
            return
        channel: Any = self
        priority = channel._get_message_priority(message, reverse=False)
        expires = getattr(channel, "_expires", None) or {}
        expire = None
        if queue in expires:
            expire = ([channel._q_for_pri(queue, p) for p in channel.priority_steps], expires[queue])
        # A publish batch (kombu 5.7+) would send the script later: it is
        # sent now, since the enqueue waits on its answer.
        client, db = self._enqueue_client()
        key = channel._q_for_pri(queue, priority)
        holder = enqueue_locked(client, key, _dumps(message), ticket, db, expire)
        asking.holder = holder
        asking.answered = True


def _dumps(message: dict[str, Any]) -> str:
    # kombu's own serializer of a queued message, as its ``_put`` uses it.
    text: str = dumps(message)  # type: ignore[no-untyped-call,unused-ignore]
    return text


class Channel(_AtomicPut, kombu_redis.Channel):  # type: ignore[misc,unused-ignore]
    """kombu's Redis channel, queueing a unique task's message under its lock."""


class SentinelChannel(_AtomicPut, kombu_redis.SentinelChannel):  # type: ignore[misc,unused-ignore]
    """kombu's Sentinel channel, queueing a unique task's message under its lock."""


class Transport(kombu_redis.Transport):  # type: ignore[misc,unused-ignore]
    """kombu's Redis transport with :class:`Channel`, for a ``redis://`` broker."""

    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):  # type: ignore[misc,unused-ignore]
    """kombu's Sentinel transport with :class:`SentinelChannel`, for a ``sentinel://`` broker."""

    Channel = SentinelChannel


setattr(Transport, TRANSPORT_FLAG, True)
setattr(SentinelTransport, TRANSPORT_FLAG, True)
