"""Where the supported releases of Celery (5.3+) and redis-py (5.0+) differ, in one place.

Every behaviour of celery-unique that depends on the Celery or redis-py
version is decided here, so a reader finds the differences in one place.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "BEAT_HEADER",
    "CLUSTER_RETRIES_FROM_RETRY",
    "cluster_retry_options",
    "waiting_requests",
]

#: The message header Celery beat puts on the tasks it sends, from Celery 5.7
#: on. Beat is recognised on every version by its own thread (``beat_init``);
#: the header also lets a call made outside beat's thread, e.g. by a test
#: driving ``Scheduler.apply_async`` itself, be treated as beat's.
BEAT_HEADER = "celery_beat_task"

#: Whether this redis-py's ``RedisCluster`` takes how often it retries a
#: failed command from its ``retry`` (6.0 and later). Before 6.0 that count is
#: ``cluster_error_retry_attempts`` (default 3), and ``retry`` only reaches
#: each node's connections.
CLUSTER_RETRIES_FROM_RETRY: bool = int(redis.__version__.split(".", 1)[0]) >= 6


def cluster_retry_options(retries: int) -> dict[str, Any]:
    """``RedisCluster`` arguments that retry a failed command ``retries`` times, with no backoff."""
    options: dict[str, Any] = {"retry": Retry(NoBackoff(), retries)}
    if not CLUSTER_RETRIES_FROM_RETRY:
        options["cluster_error_retry_attempts"] = retries
    return options


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
