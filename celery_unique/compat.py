"""Where supported versions of redis-py and Celery differ, in one place."""

from __future__ import annotations

from typing import Any

import redis

__all__ = ["get_connection", "waiting_requests"]


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


# redis-py before 5.3 requires a command name; later versions deprecate it.
_POOL_WANTS_COMMAND_NAME = _version(redis.__version__) < (5, 3)


def get_connection(pool: Any) -> Any:
    """Check out a connected connection from a redis-py connection pool."""
    if _POOL_WANTS_COMMAND_NAME:
        return pool.get_connection("EVALSHA")
    return pool.get_connection()


def waiting_requests(consumer: Any) -> list[Any]:
    """Requests a worker holds but has not started: reserved, or waiting for their eta.

    Celery 5.7 keeps the eta ones in ``state.scheduled_requests``; before, they
    are found in the consumer's timer, as ``celery inspect scheduled`` does.
    """
    from celery.worker import state
    from celery.worker.request import Request

    active = state.active_requests
    waiting = [request for request in list(state.reserved_requests) if request not in active]
    scheduled = getattr(state, "scheduled_requests", None)
    if scheduled is not None:
        waiting.extend(list(scheduled))
        return waiting
    timer = getattr(consumer, "timer", None)
    for entry in list(getattr(getattr(timer, "schedule", None), "queue", ())):
        args = getattr(getattr(entry, "entry", None), "args", None) or ()
        if args and isinstance(args[0], Request):
            waiting.append(args[0])
    return waiting
