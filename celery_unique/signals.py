"""Signal receivers that begin and end runs, and the ``task_duplicate`` signal.

Every task whose message carries a lock, a ``UniqueTask`` or a plain task
reached with ``send_unique``, runs inside a run (see
:mod:`celery_unique.execution`): it begins at ``task_prerun`` and ends at
``task_postrun``, the two points Celery signals for every outcome. The
worker's main process adds:

* ``task_received``: the time the message arrived, so a run can tell
  whether the broker may have copied it since;
* ``task_revoked``: a message discarded as revoked or expired releases its
  lock (Asynq: deleting a task releases its lock), never while a copy of the
  same task id runs, and drops any later copy of it. A terminated task's
  lock goes when its process is known to have ended (see
  :mod:`celery_unique.worker`).
"""

from __future__ import annotations

import logging
import signal as _signal
import threading
import time
from typing import Any

from celery import Task
from celery.signals import (
    beat_init,
    task_failure,
    task_postrun,
    task_prerun,
    task_received,
    task_revoked,
)
from celery.utils.dispatch import Signal

from .execution import RUN_ATTR, begin_run, end_run, warn_release_failed, worker_state
from .headers import LOCK_HEADER, RECEIVED_KEY, carried_by, headers_of
from .lock import attempt_of

__all__ = ["in_beat", "task_duplicate"]

logger = logging.getLogger(__name__)

#: Sent for every refused duplicate, with ``sender=<task>``, ``key``,
#: ``task_id`` (the holder), ``args`` and ``kwargs``.
task_duplicate = Signal(name="task_duplicate")

# Signals a terminated task cannot survive.
_FATAL_SIGNALS = frozenset({_signal.SIGTERM, _signal.SIGKILL})

_local = threading.local()


def in_beat() -> bool:
    """Whether this thread runs Celery beat's scheduler (``beat_init`` was sent here)."""
    return bool(getattr(_local, "beat", False))


def _on_beat_init(**_: Any) -> None:
    # Beat sends beat_init from the thread that then runs its scheduler loop,
    # as a process, an embedded process or an embedded thread alike.
    _local.beat = True


def _on_received(request: Any = None, **_: Any) -> None:
    # In the worker's main process, as the message arrives: stamped on the
    # request the pool receives, locked messages only.
    request_dict = getattr(request, "request_dict", None)
    if isinstance(request_dict, dict) and LOCK_HEADER in request_dict:
        request_dict[RECEIVED_KEY] = time.time()


def _on_prerun(sender: Task | None = None, **_: Any) -> None:
    if sender is None:
        return
    request = sender.request
    run = begin_run(sender, request)
    if run is None or run.verdict in ("run", "stray") or getattr(sender, "runs_its_own_lock", False):
        return
    # A UniqueTask holds back or drops such a copy (UniqueTask.before_start);
    # a plain task cannot be stopped here: it runs, and leaves the lock alone.
    logger.warning(
        "celery_unique: task %s[%s] runs while another copy of it runs or has run (%s); "
        "only a UniqueTask holds such a copy back", sender.name, run.task_id, run.verdict,
    )
    run.verdict = "unmarked"


def _on_postrun(sender: Task | None = None, state: str | None = None, retval: Any = None, **_: Any) -> None:
    if sender is not None:
        request = sender.request
        if RUN_ATTR in request.__dict__:
            end_run(request, state, retval)


def _on_failure(sender: Task | None = None, task_id: str | None = None, **_: Any) -> None:
    # In the worker's main process, a final failure it records for a pool
    # process that died: UniqueRequest ends that run once it knows whether
    # the message comes back.
    from .worker import failing_request

    failing = failing_request()
    if failing is not None and failing.id == task_id:
        failing.final_failure = True


def _on_revoked(
    sender: Task | None = None,
    request: Any = None,
    terminated: bool = False,
    signum: Any = None,
    **_: Any,
) -> None:
    if sender is None or request is None:
        return
    carried = carried_by(headers_of(request))
    if carried is None or not getattr(request, "id", None):
        return
    state = worker_state(sender)
    if state is None:
        return
    attempt = attempt_of(request.id, request, carried.nonce)
    if terminated and (getattr(sender, "runs_its_own_lock", False) or not _is_fatal(signum)):
        # A UniqueTask's run ends when its process is known to be gone
        # (UniqueRequest), or by itself if it survives the signal (SIGUSR1
        # raises SoftTimeLimitExceeded inside it).
        logger.info(
            "celery_unique: task %s[%s] was sent signal %s; its lock %s stays until it ends",
            sender.name, request.id, signum, carried.key,
        )
        return
    # Discarded as revoked or expired (it never runs here), or a plain task
    # killed: a copy of the same task id that runs elsewhere, marked, keeps
    # the lock (see DISCARD_SCRIPT).
    try:
        state.store.discard(carried.key, attempt, drop_later=True)
    except Exception as exc:
        warn_release_failed(sender, request.id, carried.key, exc)


def _is_fatal(signum: Any) -> bool:
    try:
        if isinstance(signum, str):
            signum = int(signum) if signum.lstrip("-").isdigit() else _signal.Signals[
                signum if signum.startswith("SIG") else f"SIG{signum}"
            ]
        # billiard reports a job it terminated as Terminated(-signum).
        return abs(int(signum)) in _FATAL_SIGNALS
    except (KeyError, TypeError, ValueError):
        return True  # unknown: as a kill


# Connected once, at import: the receivers act only on tasks whose message
# carries a lock key, so other tasks pay one attribute lookup.
beat_init.connect(_on_beat_init, weak=False)
task_received.connect(_on_received, weak=False)
task_prerun.connect(_on_prerun, weak=False)
task_postrun.connect(_on_postrun, weak=False)
task_failure.connect(_on_failure, weak=False)
task_revoked.connect(_on_revoked, weak=False)
