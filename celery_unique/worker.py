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

import redis
from billiard.exceptions import Terminated, TimeLimitExceeded, WorkerLostError
from celery.signals import worker_init, worker_ready, worker_shutdown
from celery.worker.request import Request

from .compat import waiting_requests
from .config import app_state
from .errors import ConfigurationError
from .execution import LOCK_HEADER, UNTIL_HEADER, marker_owner, report_configuration_once
from .lock import attempt_of, running_marker_key

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

    def on_timeout(self, soft: bool, timeout: float) -> None:
        with _failing(self):
            super().on_timeout(soft, timeout)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        with _failing(self):
            super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        if return_ok:
            return  # the pool process reported it: its run has ended there
        exc = getattr(exc_info, "exception", None)
        exc = getattr(exc, "exc", exc)  # ExceptionWithTraceback
        if not isinstance(exc, _DEATHS):
            return
        if self._already_revoked:
            self._end_dead_run(leave_done=True, release=True)
        elif self._already_cancelled:
            self._end_dead_run(leave_done=False, release=False)
        else:
            until = self._headers().get(UNTIL_HEADER) or "success"
            self._end_dead_run(
                leave_done=self.final_failure,
                release=self.final_failure and until == "finish",
            )

    def _headers(self) -> dict[str, Any]:
        headers = self.request_dict
        return headers if isinstance(headers, dict) else {}

    def _end_dead_run(self, *, leave_done: bool, release: bool) -> None:
        headers = self._headers()
        key = headers.get(LOCK_HEADER)
        if not isinstance(key, str):
            return
        try:
            state = app_state(self.task._get_app())
        except ConfigurationError:
            return
        attempt = attempt_of(headers.get("retries"), headers.get("replaced_task_nesting"))
        running = f"run|{attempt}|{marker_owner(self.hostname, self.worker_pid)}"
        done_ttl_ms = int(3 * state.config.running_ttl * 1000)
        try:
            state.store.end(
                key,
                running_marker_key(key, self.id),
                running,
                f"done|{attempt}" if leave_done else "",
                done_ttl_ms,
                self.id if release else "",
            )
        except redis.RedisError as exc:
            logger.warning(
                "celery_unique: could not end the run of task %s[%s] (%s)", self.task.name, self.id, exc
            )


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
                key = (request.request_dict or {}).get(LOCK_HEADER)
                if isinstance(key, str):
                    self._release(key, request.id)

    def _release(self, key: str, task_id: str) -> None:
        # A revoked task that has not started never starts: Celery discards
        # it when its turn comes, and its marker turns "revoked" so that it is
        # dropped even by a worker restarted without the revoke. Owner-checked,
        # as every release, and never under another copy of the same task id
        # that runs (a deferred copy waiting here while the first runs on).
        try:
            app_state(self.app).store.release_unless_running(key, task_id, revoked=True)
        except (redis.RedisError, ConfigurationError) as exc:
            logger.warning(
                "celery_unique: could not release lock %s of revoked task %s (%s)", key, task_id, exc
            )


def _check_settings(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is None:
        return
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
