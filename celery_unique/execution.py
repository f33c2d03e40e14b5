"""A run of a task whose message carries a lock: when the lock goes, and its running marker.

The lock key travels with the task in the ``celery_unique_lock`` message header
and ``celery_unique_until`` says when to release it, if not on success. A run
begins as the task starts and ends with one outcome:

============  ===========================  =====================================
outcome       what happened                the lock
============  ===========================  =====================================
success       the body returned            released ("success", "finish")
failure       a final failure              released under "finish", else kept
retry         ``Task.retry()``             kept: the retry carries it
requeue       ``Reject(requeue=True)``     kept: the message comes back
replaced      ``Task.replace()``           kept: the replacement carries it
============  ===========================  =====================================

Under "start" the lock goes as the run begins. Every release is owner-checked
against the task id, so a task whose lock expired, or a forged header, can
never delete a lock another task holds. A ``Task.replace()`` or an ``Ignore``
after the task stored its own state follows the same table through the state
it stored.

Outside eager mode a run also holds the task id's running marker (see
:mod:`celery_unique.lock`) while it runs, renewed by a heartbeat thread: a
second copy of the same task id (a message redelivered after its visibility
timeout, say) does not run beside it, but is published again with a
countdown, and runs later only if the first copy's worker died.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import redis
from celery import states
from celery.exceptions import Ignore

from .config import app_state
from .errors import ConfigurationError
from .holders import stored_state
from .lock import LockStore, attempt_of, running_marker_key

if TYPE_CHECKING:
    from celery import Task

    from .config import _AppState

__all__ = [
    "LOCK_HEADER",
    "REPLACES_HEADER",
    "UNTIL_HEADER",
    "Run",
    "begin_run",
    "lock_of",
    "marker_owner",
    "per_process",
    "report_configuration_once",
]

logger = logging.getLogger(__name__)

#: The message header that carries a task's lock key to the worker.
LOCK_HEADER = "celery_unique_lock"
#: The message header that says when to release, if not on success.
UNTIL_HEADER = "celery_unique_until"
#: Set on a replacement's message: the task id whose lock it continues.
REPLACES_HEADER = "celery_unique_replaces"

Outcome = Literal["success", "failure", "retry", "requeue", "replaced"]

# unique_until -> the outcomes that release the lock at the end of a run.
_RELEASED_BY: dict[str, frozenset[str]] = {
    "success": frozenset({"success"}),
    "finish": frozenset({"success", "failure"}),
    "start": frozenset(),
}
# Outcomes after which no copy of this attempt may run again.
_ENDS_ATTEMPT = frozenset({"success", "failure", "retry", "replaced"})

#: Attribute of a request (Celery's ``Context``) that holds its run.
RUN_ATTR = "_celery_unique_run"


def lock_of(request: Any) -> tuple[str, str] | None:
    """Return ``(lock key, unique_until)`` carried by a request, or None."""
    headers = getattr(request, "headers", None)
    if not isinstance(headers, Mapping):
        return None
    key = headers.get(LOCK_HEADER)
    if not isinstance(key, str) or not getattr(request, "id", None):
        return None
    until = headers.get(UNTIL_HEADER)
    return key, until if until in _RELEASED_BY else "success"


class Run:
    """One run of one copy of a task that carries a lock."""

    def __init__(self, task: Task, request: Any, key: str, until: str, state: _AppState) -> None:
        self.task = task
        self.task_id: str = request.id
        self.key = key
        self.until = until
        self.state = state
        self.eager = bool(getattr(request, "is_eager", False))
        self.attempt = attempt_of(request.retries, getattr(request, "replaced_task_nesting", 0))
        self.marker = running_marker_key(key, self.task_id)
        #: Where this copy runs: the worker's node name and the process id, as
        #: the worker's main process can also name it (see UniqueRequest).
        self.owner = marker_owner(getattr(request, "hostname", None), os.getpid())
        self.running = f"run|{self.attempt}|{self.owner}"
        #: Whether this copy holds the running marker (False in eager mode, or
        #: when the lock store could not be reached as the run began).
        self.holds_marker = False
        #: Set by ``UniqueTask.on_replace``: the body replaced itself.
        self.replaced = False
        self.ended = False

    @property
    def store(self) -> LockStore:
        return self.state.store

    def begin(self) -> Literal["run", "wait", "skip", "revoked"]:
        """Take the running marker; return "run", or "wait", "skip" or "revoked" (see BEGIN_SCRIPT)."""
        release_id = self.task_id if self.until == "start" else ""
        if self.eager:
            if release_id:
                self._release()
            return "run"
        ttl_ms = _ms(self.state.config.running_ttl)
        try:
            verdict = self.store.begin(
                self.key, self.marker, self.attempt, self.owner, ttl_ms, release_id
            )
        except redis.RedisError as exc:
            # The task runs anyway: a lock store that is down must not stop work.
            logger.warning(
                "celery_unique: could not mark task %s[%s] running (%s); it runs unmarked",
                self.task.name, self.task_id, exc,
            )
            return "run"
        if verdict == "run":
            self.holds_marker = True
            heartbeat(self.state).add(self.marker, self.running)
            return "run"
        if verdict == "skip":
            return "skip"
        if verdict == "revoked":
            return "revoked"
        return "wait"

    def end(self, outcome: Outcome) -> None:
        """End the run with ``outcome``: leave the marker and release the lock as it says."""
        if self.ended:
            return
        self.ended = True
        release = outcome in _RELEASED_BY[self.until]
        if not self.holds_marker:
            if release:
                self._release()
            return
        heartbeat(self.state).discard(self.marker)
        leave = f"done|{self.attempt}" if outcome in _ENDS_ATTEMPT else ""
        done_ttl_ms = 3 * _ms(self.state.config.running_ttl)
        try:
            self.store.end(
                self.key, self.marker, self.running, leave, done_ttl_ms, self.task_id if release else ""
            )
        except redis.RedisError as exc:
            warn_release_failed(self.task, self.task_id, self.key, exc)

    def abandon(self) -> None:
        """Stop renewing the marker of a run whose body raised a BaseException that is not an Exception.

        Whether the process goes on (a threads pool) or is on its way out, the
        marker then expires within ``unique_running_ttl``, as a dead worker's
        does, instead of saying for ever that the task runs.
        """
        if not self.ended and self.holds_marker:
            self.ended = True
            heartbeat(self.state).discard(self.marker)

    def end_ignored(self) -> None:
        """End a run whose body raised ``Ignore``: replaced, or judged by the state it stored."""
        if self.replaced:
            self.end("replaced")
            return
        # celery's documented pattern stores a state itself, then ignores:
        # ``update_state(state=FAILURE, ...); raise Ignore()``.
        state = stored_state(self.task.backend, self.task_id)
        self.end("failure" if state == states.FAILURE else "success")

    def _release(self) -> None:
        try:
            self.store.release(self.key, self.task_id)
        except redis.RedisError as exc:
            warn_release_failed(self.task, self.task_id, self.key, exc)


def marker_owner(hostname: str | None, pid: int | None) -> str:
    """Return the owner part of a running marker: ``<worker node name>/<pid>``."""
    return f"{hostname or 'local'}/{pid}"


def begin_run(task: Task, request: Any) -> Run | None:
    """Return the begun run of ``request``, or None if it carries no lock.

    A request is begun once: a task calling itself directly inside its body
    shares its request's run and does not begin another.
    """
    if getattr(request, "called_directly", True) or RUN_ATTR in request.__dict__:
        return None
    carried = lock_of(request)
    if carried is None:
        return None
    state = worker_state(task)
    if state is None:
        return None
    run = Run(task, request, carried[0], carried[1], state)
    request.__dict__[RUN_ATTR] = run
    return run


def worker_state(task: Task) -> _AppState | None:
    """Return the app state of ``task`` for a release, or None if its settings are broken.

    A worker whose lock-store settings are broken logs one error naming the
    setting (see :mod:`celery_unique.worker`), then runs its tasks without
    locks rather than failing every one of them.
    """
    try:
        return app_state(task._get_app())
    except ConfigurationError as exc:
        report_configuration_once(exc)
        return None


_reported = threading.Event()


def report_configuration_once(exc: ConfigurationError) -> None:
    """Log, once per worker, that its lock-store settings are broken and why."""
    if not _reported.is_set():
        _reported.set()
        logger.error("celery_unique: this worker cannot release locks: %s", exc)


def defer(task: Task, request: Any, args: Any, kwargs: Any, countdown: float) -> None:
    """Publish this copy again, unchanged but for a countdown, bypassing the lock.

    The copy's message is then acknowledged (the caller raises ``Ignore``), so
    the task is never lost: if the copy that runs now dies, this one runs later.
    """
    signature = task.signature_from_request(request, args, kwargs, countdown=countdown)
    # Task.apply_async itself: this is the same task, already holding its lock.
    from celery import Task as CeleryTask

    CeleryTask.apply_async(task, signature.args, signature.kwargs, **signature.options)


def second_copy(task: Task, run: Run, verdict: str, args: Any, kwargs: Any) -> Ignore:
    """Handle a copy that must not run now; return the ``Ignore`` to raise."""
    if verdict == "wait":
        countdown = run.state.config.running_ttl
        logger.info(
            "celery_unique: task %s[%s] is already running elsewhere; this copy runs again in %gs "
            "if that one has not finished by then", task.name, run.task_id, countdown,
        )
        defer(task, task.request, args, kwargs, countdown)
        return Ignore("celery_unique: another copy of this task id is running")
    if verdict == "revoked":
        logger.info("celery_unique: dropped task %s[%s]: it was revoked", task.name, run.task_id)
        return Ignore("celery_unique: this task was revoked")
    logger.info(
        "celery_unique: dropped a copy of task %s[%s]: this attempt has already run",
        task.name, run.task_id,
    )
    return Ignore("celery_unique: this attempt of the task has already run")


def warn_release_failed(task: Task, task_id: str, key: str, exc: Exception) -> None:
    """Log that ``task_id``'s lock could not be released, and that its TTL will free it."""
    logger.warning(
        "celery_unique: could not release lock %s of task %s[%s] (%s); its TTL will free it",
        key, task.name, task_id, exc,
    )


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class Heartbeat:
    """Renews the running markers this process holds, from one daemon thread."""

    def __init__(self, state: _AppState) -> None:
        self._state = state
        self._markers: dict[str, str] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, marker: str, value: str) -> None:
        with self._lock:
            self._markers[marker] = value
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="celery-unique-heartbeat", daemon=True
                )
                self._thread.start()

    def discard(self, marker: str) -> None:
        with self._lock:
            self._markers.pop(marker, None)

    def _loop(self) -> None:
        ttl = self._state.config.running_ttl
        while not self._wake.wait(ttl / 3):
            # Held through the renewal: a run that ends waits in discard()
            # until it is done, so a renewal never puts back a marker that
            # the run's end has just removed.
            with self._lock:
                markers = list(self._markers.items())
                if not markers:
                    continue
                try:
                    self._state.store.heartbeat(markers, _ms(ttl))
                except redis.RedisError as exc:
                    logger.warning("celery_unique: could not renew running markers (%s)", exc)


def heartbeat(state: _AppState) -> Heartbeat:
    """Return this process's heartbeat for the app state ``state``."""
    return per_process(state, "heartbeat", Heartbeat)


_T = TypeVar("_T")
_per_process_lock = threading.Lock()


def per_process(owner: Any, name: str, make: Callable[[Any], _T]) -> _T:
    """Return ``owner``'s object ``name`` of this process, made by ``make(owner)`` once.

    Kept on ``owner`` with the pid that made it: a forked pool process makes
    one of its own instead of trusting one (a thread, a socket) that did not
    survive the fork.
    """
    pid = os.getpid()
    made: tuple[int, _T] | None = owner.__dict__.get(f"_per_process_{name}")
    if made is None or made[0] != pid:
        with _per_process_lock:
            made = owner.__dict__.get(f"_per_process_{name}")
            if made is None or made[0] != pid:
                made = owner.__dict__[f"_per_process_{name}"] = (pid, make(owner))
    return made[1]
