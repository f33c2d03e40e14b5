"""What happens to locks, told three ways: log lines, Celery signals and Prometheus counters.

================  =========  =====================  ===============================
event             log level  signal                 counter (by task name)
================  =========  =====================  ===============================
taken             DEBUG                             ``celery_unique_taken_total``
refused           INFO       ``task_duplicate``     ``celery_unique_refused_total``
released          DEBUG      ``lock_released``      ``celery_unique_released_total``
kept (at an end)  DEBUG
taken over        INFO       ``lock_taken_over``    ``celery_unique_taken_over_total``
replaced          INFO                              ``celery_unique_replaced_total``
store error       WARNING                           ``celery_unique_store_errors_total``
sent unlocked     WARNING                           ``celery_unique_unlocked_total``
(fail-open)       (once a minute per task)
atomic enqueue    INFO       (once per app, on its first unique enqueue)
on / off          WARNING
================  =========  =====================  ===============================

Every line is logged by the ``celery_unique`` logger and names the task,
the task id and the lock key. The counters exist when ``prometheus_client``
is installed (``pip install 'celery-unique[prometheus]'``); without it,
counting costs one call of a function that does nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery.utils.dispatch import Signal

from . import metrics
from .config import app_state

__all__ = [
    "atomic_off",
    "atomic_on",
    "kept",
    "lock_released",
    "lock_taken_over",
    "refused",
    "released",
    "replaced",
    "replaced_not_stored",
    "store_error",
    "taken",
    "taken_over",
    "task_duplicate",
    "unlocked",
]

logger = logging.getLogger("celery_unique")

#: Sent for every refused duplicate, with ``sender=<task>``, ``key``,
#: ``task_id`` (the holder), ``args`` and ``kwargs``.
task_duplicate = Signal(name="task_duplicate")
#: Sent when a lock is released, in the process that released it, with
#: ``sender=<task name>``, ``key``, ``task_id`` (the holder that let go) and
#: ``reason`` ("success", "failure", "start", "revoked", "purged",
#: "not published", ...).
lock_released = Signal(name="lock_released")
#: Sent when a refused call takes a finished holder's lock over, or the
#: reaper releases it, with ``sender=<task name>``, ``key``, ``holder`` (the
#: finished task's id), ``task_id`` (the new holder, "" for the reaper) and
#: ``state`` (the holder's stored state).
lock_taken_over = Signal(name="lock_taken_over")


def _name(task: Any) -> str:
    return str(getattr(task, "name", task))


def taken(task: Any, key: str, task_id: str, ttl_ms: int) -> None:
    """A call took its lock."""
    metrics.taken(_name(task))
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("celery_unique: %s[%s] took lock %s for %gs", _name(task), task_id, key, ttl_ms / 1000)


def refused(task: Any, key: str, holder: str, args: Any, kwargs: Any) -> None:
    """A call was refused: ``holder`` holds its lock."""
    metrics.refused(_name(task))
    task_duplicate.send(sender=task, key=key, task_id=holder, args=args, kwargs=kwargs)
    logger.info("celery_unique: refused duplicate of %s: task %s holds lock %s", _name(task), holder, key)


def released(task: Any, key: str, task_id: str, reason: str) -> None:
    """``task_id`` let go of its lock."""
    name = _name(task)
    metrics.released(name)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("celery_unique: released lock %s of %s[%s] (%s)", key, name, task_id, reason)
    lock_released.send(sender=name, key=key, task_id=task_id, reason=reason)


def kept(task: Any, key: str, task_id: str, reason: str) -> None:
    """A run ended and its lock stays, as ``reason`` says."""
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("celery_unique: kept lock %s of %s[%s] (%s)", key, _name(task), task_id, reason)


def replaced(task: Any, key: str, replaced_id: str, task_id: str) -> None:
    """A call replaced ``replaced_id``, a holder that had not begun (``on_duplicate="replace"``)."""
    name = _name(task)
    metrics.replaced(name)
    logger.info("celery_unique: %s[%s] replaced task %s, which had not begun, under lock %s",
                name, task_id, replaced_id, key)


def replaced_not_stored(task: Any, replaced_id: str, error: BaseException) -> None:
    """The replaced call's REVOKED state could not be stored: it stays PENDING."""
    logger.warning(
        "celery_unique: could not store task %s[%s] as replaced (%s)", _name(task), replaced_id, error,
    )


def taken_over(task: Any, key: str, holder: str, task_id: str, state: str | None) -> None:
    """A finished ``holder``'s lock went to ``task_id`` (or, with an empty one, was reaped)."""
    name = _name(task)
    metrics.taken_over(name)
    if task_id:
        logger.info(
            "celery_unique: %s[%s] took over lock %s from finished task %s (%s)",
            name, task_id, key, holder, state,
        )
    else:
        logger.info("celery_unique: reaped lock %s of finished task %s[%s] (%s)", key, name, holder, state)
    lock_taken_over.send(sender=name, key=key, holder=holder, task_id=task_id, state=state)


def store_error(task: Any) -> None:
    """The lock store failed a call of ``task`` (the caller logs or raises it)."""
    metrics.store_error(_name(task))


#: Seconds between two fail-open warnings of one task.
UNLOCKED_WARNING_INTERVAL = 60.0
_UNLOCKED_LOCK = threading.Lock()


def unlocked(task: Any, key: str, error: BaseException) -> None:
    """The lock store failed and the call went out without its lock (fail-open)."""
    name = _name(task)
    metrics.unlocked(name)
    now = time.monotonic()
    # When each task last warned, kept on its app's state.
    warned = app_state(task._get_app()).unlocked_warned
    with _UNLOCKED_LOCK:
        last = warned.get(name)
        if last is not None and now - last < UNLOCKED_WARNING_INTERVAL:
            return
        warned[name] = now
    logger.warning(
        "celery_unique: %s sent without its lock %s: the lock store failed (%s); "
        "calls of it are not deduplicated until it is back (said once a minute)",
        name, key, error,
    )


def atomic_on(where: str) -> None:
    """The package's transport takes each unique call's lock as it publishes (said once per app)."""
    logger.info(
        "celery_unique: unique tasks take their lock and publish in one script "
        "(celery_unique.transport), on %s", where,
    )


def atomic_off(why: str) -> None:
    """The package's transport is selected but cannot take locks as it publishes (said once per app)."""
    logger.warning(
        "celery_unique: the broker transport is celery_unique.transport's, but %s: "
        "unique tasks take their lock, then publish", why,
    )
