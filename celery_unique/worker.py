"""The worker's main process: deaths it reports, revokes it holds, settings it checks.

* :class:`UniqueRequest`, the request class of every ``UniqueTask``, ends the
  run of a task whose pool process died (killed, out of memory, a hard time
  limit, or a terminate signal it did not survive): the lock goes if the task
  was revoked, or failed for good under ``unique_until="finish"``; otherwise
  the message comes back, so the lock stays, and the dead process's running
  marker is cleared so that the message runs again at once.
* A revoke watcher releases the locks of revoked tasks the worker holds but
  has not started (queued behind others, or waiting for a countdown or eta):
  Celery discards those only when their turn or their eta comes.
* At startup, a worker whose lock-store settings are broken logs one error
  naming the setting.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

from billiard.exceptions import Terminated, TimeLimitExceeded, WorkerLostError
from celery.signals import worker_init, worker_ready, worker_shutdown
from celery.worker.request import Request

from . import events, join, liveness
from .compat import waiting_requests
from .config import app_state
from .errors import ConfigurationError
from .execution import report_configuration_once, warn_release_failed
from .headers import carried_by
from .lock import KEEP, RELEASE, REQUEUE, Attempt, attempt_of

__all__ = ["UniqueRequest", "failing_request"]

# How the main process learns that a pool process died while running a task.
_DEATHS = (Terminated, WorkerLostError, TimeLimitExceeded, SystemExit, KeyboardInterrupt)

logger = logging.getLogger(__name__)

_local = threading.local()


def failing_request() -> UniqueRequest | None:
    """The request whose failure this thread is handling, if in ``UniqueRequest.on_failure``."""
    return getattr(_local, "failing", None)


@contextlib.contextmanager
def _failing(request: UniqueRequest) -> Iterator[None]:
    _local.failing = request
    try:
        yield
    finally:
        _local.failing = None


class UniqueRequest(Request):  # type: ignore[misc]
    """Celery's worker request, ending the run of a task whose process died.

    A ``UniqueTask`` subclass that sets a request class of its own should
    derive it from this one.
    """

    #: Set by the ``task_failure`` receiver: Celery recorded a final failure.
    final_failure = False
    #: Set when a retry of this task was published for it (a lost worker's retry).
    continued = False

    def on_timeout(self, soft: bool, timeout: float) -> None:
        with _failing(self):
            super().on_timeout(soft, timeout)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        exc = getattr(exc_info, "exception", None)
        exc = getattr(exc, "exc", exc)  # ExceptionWithTraceback
        dead = not return_ok and isinstance(exc, _DEATHS)
        if dead:
            # The dead copy runs no more: its marker goes before Celery may
            # requeue the message, so that the copy that comes back runs at once.
            self._end_dead_run(REQUEUE)
        with _failing(self):
            super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        if not dead or self.continued:
            return
        if self._already_revoked:
            self._end_dead_run(None, revoked=True)
        elif not self._already_cancelled and self.final_failure:
            carried = carried_by(self._headers())
            self._end_dead_run(RELEASE if carried and carried.until == "finish" else KEEP)

    def _headers(self) -> dict[str, Any]:
        headers = self.request_dict
        return headers if isinstance(headers, dict) else {}

    def _end_dead_run(self, outcome: str | None, *, revoked: bool = False) -> None:
        carried = carried_by(self._headers())
        if carried is None:
            return
        try:
            state = app_state(self.task._get_app())
        except ConfigurationError:
            return
        attempt = attempt_of(self.id, self._headers(), carried.nonce)
        try:
            if revoked:
                if state.store.discard(carried.key, attempt, drop_later=True):
                    events.released(self.task, carried.key, self.id, "revoked, its process gone")
            elif outcome is not None:
                owner = liveness.owner(self.hostname, pid=self.worker_pid or 0)
                if state.store.end(carried.key, attempt, owner, outcome, leave_done=outcome != REQUEUE):
                    events.released(self.task, carried.key, self.id, "its process died")
        except Exception as exc:
            warn_release_failed(self.task, self.id, carried.key, exc)


class _RevokeWatcher(threading.Thread):
    """Releases the locks of revoked tasks this worker holds but has not started."""

    interval = 0.5

    def __init__(self, consumer: Any) -> None:
        super().__init__(name="celery-unique-revoke-watcher", daemon=True)
        self.consumer = consumer
        self.app = consumer.app
        self.stopped = threading.Event()

    def run(self) -> None:
        from celery.worker import state as worker_state

        released: set[str] = set()
        while not self.stopped.wait(self.interval):
            try:
                waiting = waiting_requests(self.consumer)
            except RuntimeError:  # changed while copied: look again next time
                continue
            pending = {r.id for r in waiting}
            released &= pending
            for request in waiting:
                if request.id in released or request.id not in worker_state.revoked:
                    continue
                if getattr(request, "_apply_result", None) is not None:
                    # Already handed to the pool (a threads pool queues it
                    # there): Celery no longer checks its revoke, and runs it.
                    continue
                released.add(request.id)
                headers = request.request_dict or {}
                carried = carried_by(headers)
                if carried is not None:
                    self._release(carried.key, attempt_of(request.id, headers, carried.nonce), request.name)

    def _release(self, key: str, attempt: Attempt, task_name: str) -> None:
        # A revoked task that has not started never starts: Celery discards
        # it when its turn comes, and its marker turns "revoked" so that it is
        # dropped even by a worker restarted without the revoke. Owner-checked,
        # as every release, and never under another copy of the same task id
        # that runs (a held-back copy waiting here while the first runs on).
        try:
            if app_state(self.app).store.discard(key, attempt, drop_later=True):
                events.released(task_name, key, attempt.task_id, "revoked")
        except Exception as exc:
            logger.warning(
                "celery_unique: could not release lock %s of revoked task %s (%s)", key, attempt.task_id, exc
            )


def _check_settings(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is None:
        return
    join.register(app)  # the follow-up of a refused call under on_duplicate="join"
    try:
        app_state(app).target  # noqa: B018 - resolving it checks every setting
    except ConfigurationError as exc:
        # Reported once here, before the pool starts: its processes inherit
        # the fact and stay silent, running their tasks without locks.
        report_configuration_once(exc)


def _start_watcher(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is None:
        return
    watcher = _RevokeWatcher(sender)
    app.__dict__["_celery_unique_revoke_watcher"] = watcher
    watcher.start()


def _stop_watcher(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    watcher = app.__dict__.pop("_celery_unique_revoke_watcher", None) if app is not None else None
    if watcher is not None:
        watcher.stopped.set()


worker_init.connect(_check_settings, weak=False)
worker_ready.connect(_start_watcher, weak=False)
worker_shutdown.connect(_stop_watcher, weak=False)
