"""Signal receivers that end runs, and the ``task_duplicate`` signal.

``UniqueTask`` runs its body inside a run of its own (see
:mod:`celery_unique.execution`). These receivers cover the rest:

* tasks of other classes whose message carries a lock (``send_unique`` to a
  plain task, a plain task that replaced a unique one): a run begins at
  ``task_prerun`` and ends at ``task_success``, ``task_failure``,
  ``task_retry`` or ``task_postrun``;
* failures the worker's main process reports (a pool process that died, a
  hard time limit);
* ``task_revoked``: a revoke or an expired message releases the lock (Asynq:
  deleting a task releases its lock), except a terminate with a signal the
  task may survive, such as ``SIGUSR1``: that task ends its run itself, or its
  death is reported to the main process (see :mod:`celery_unique.worker`).
"""

from __future__ import annotations

import logging
import signal as _signal
import threading
from typing import Any

import redis
from celery import Task, states
from celery.exceptions import Ignore
from celery.signals import (
    beat_init,
    task_failure,
    task_postrun,
    task_prerun,
    task_retry,
    task_revoked,
    task_success,
)
from celery.utils.dispatch import Signal

from .execution import (
    LOCK_HEADER,
    RUN_ATTR,
    UNTIL_HEADER,
    Run,
    begin_run,
    lock_of,
    warn_release_failed,
    worker_state,
)

__all__ = ["LOCK_HEADER", "UNTIL_HEADER", "in_beat", "task_duplicate"]

logger = logging.getLogger(__name__)

#: Sent for every refused duplicate, with ``sender=<task>``, ``key``,
#: ``task_id`` (the holder), ``args`` and ``kwargs``.
task_duplicate = Signal(name="task_duplicate")

# Runs of tasks that are not UniqueTasks, by task id: a failure Celery reports
# after the request left the task's stack (applying a chain link raised) is
# found here by its id.
_plain_runs: dict[tuple[str, int], Run] = {}


def _plain_key(task_id: str) -> tuple[str, int]:
    # Every signal of a run comes from the thread that runs it; keyed by the
    # thread too, two copies of one task id in a threads pool stay apart.
    return task_id, threading.get_ident()


def _pop_plain(task_id: str | None) -> Run | None:
    return _plain_runs.pop(_plain_key(task_id), None) if task_id else None

# The message of the Ignore that Celery's Task.on_replace raises.
_REPLACED = "Replaced by new task"

# Signals a terminated task cannot survive: its lock goes with the revoke.
_FATAL_SIGNALS = frozenset({_signal.SIGTERM, _signal.SIGKILL})

_local = threading.local()


def in_beat() -> bool:
    """Whether this thread runs Celery beat's scheduler (``beat_init`` was sent here)."""
    return bool(getattr(_local, "beat", False))


def _on_beat_init(**_: Any) -> None:
    # Beat sends beat_init from the thread that then runs its scheduler loop,
    # as a process, an embedded process or an embedded thread alike.
    _local.beat = True


def _runs_itself(task: Any) -> bool:
    return bool(getattr(task, "runs_its_own_lock", False))


def _on_prerun(sender: Task | None = None, task_id: str | None = None, **_: Any) -> None:
    if sender is None or _runs_itself(sender):
        return
    run = begin_run(sender, sender.request)
    if run is None:
        return
    verdict = run.begin()
    if verdict != "run":
        # Only a UniqueTask can hold back a second copy of itself.
        logger.warning(
            "celery_unique: task %s[%s] runs while another copy of it runs or has run",
            sender.name, run.task_id,
        )
    _plain_runs[_plain_key(run.task_id)] = run


def _end_plain(task_id: str | None, outcome: Any) -> None:
    run = _pop_plain(task_id)
    if run is not None:
        run.end(outcome)


def _on_success(sender: Task | None = None, **_: Any) -> None:
    if sender is not None:
        _end_plain(sender.request.id, "success")


def _on_retry(request: Any = None, **_: Any) -> None:
    if request is not None:
        _end_plain(getattr(request, "id", None), "retry")


def _on_postrun(task_id: str | None = None, state: str | None = None, retval: Any = None, **_: Any) -> None:
    # Outcomes with no signal of their own.
    if state == states.IGNORED:
        run = _pop_plain(task_id)
        if run is not None:
            # Task.replace() ends the replaced task with Celery's own Ignore:
            # its replacement runs on under this id, so the lock stays.
            run.replaced = isinstance(retval, Ignore) and str(retval) == _REPLACED
            run.end_ignored()
    elif state == states.REJECTED:
        _end_plain(task_id, "requeue" if getattr(retval, "requeue", False) else "failure")
    elif state is None:
        # The body raised a BaseException that is not an Exception.
        run = _pop_plain(task_id)
        if run is not None:
            run.abandon()


def _on_failure(sender: Task | None = None, task_id: str | None = None, **_: Any) -> None:
    # task_failure means a final failure: a retry raises Retry instead.
    run = _pop_plain(task_id)
    if run is not None:
        run.end("failure")
        return
    if sender is None:
        return
    from .worker import failing_request

    failing = failing_request()
    if failing is not None:
        # The main process reports a pool process's death; UniqueRequest
        # ends the run once it knows whether the message comes back.
        if failing.id == task_id:
            failing.final_failure = True
        return
    request = sender.request
    if RUN_ATTR in request.__dict__ or getattr(request, "id", None) != task_id:
        return  # a UniqueTask's own run ended it, or no request to read
    carried = lock_of(request)
    if carried is not None and carried[1] == "finish" and task_id:
        _release(sender, carried[0], task_id)


def _on_revoked(
    sender: Task | None = None,
    request: Any = None,
    terminated: bool = False,
    signum: Any = None,
    **_: Any,
) -> None:
    if sender is None or request is None:
        return
    carried = lock_of(request)
    if carried is None:
        return
    if terminated and not _is_fatal(signum):
        # The task may survive this signal (SIGUSR1 raises SoftTimeLimitExceeded
        # inside it): its lock goes when it really ends.
        logger.info(
            "celery_unique: task %s[%s] was sent signal %s; its lock %s stays until it ends",
            sender.name, request.id, signum, carried[0],
        )
        return
    # A message discarded as revoked or expired (not terminated) may be a copy
    # of the same task id (redelivered, or deferred) while another copy runs.
    _release(sender, carried[0], request.id, unless_running=not terminated)


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


def _release(task: Task, key: str, task_id: str, *, unless_running: bool = False) -> None:
    """Release ``task_id``'s lock, owner-checked; with ``unless_running``, not while a copy of it runs."""
    state = worker_state(task)
    if state is None:
        return
    try:
        if unless_running:
            state.store.release_unless_running(key, task_id)
        else:
            state.store.release(key, task_id)
    except redis.RedisError as exc:
        warn_release_failed(task, task_id, key, exc)


# Connected once, at import: the receivers act only on tasks whose message
# carries a lock key, so other tasks pay one attribute lookup.
beat_init.connect(_on_beat_init, weak=False)
task_prerun.connect(_on_prerun, weak=False)
task_success.connect(_on_success, weak=False)
task_retry.connect(_on_retry, weak=False)
task_postrun.connect(_on_postrun, weak=False)
task_failure.connect(_on_failure, weak=False)
task_revoked.connect(_on_revoked, weak=False)
