"""A run of a task whose message carries a lock: how it begins, how it ends, and what the lock does.

A run begins as Celery starts the task (``task_prerun``) and ends as Celery
finishes with it (``task_postrun``), so the body runs exactly as Celery runs
it: no frame and no request of the package's own. Its end depends on the
outcome and on ``unique_until``:

==========================  ============  ============  =================  ===========
outcome                     "success"     "finish"      "start"            "expiry"
==========================  ============  ============  =================  ===========
success                     released      released      released at start  kept (TTL)
final failure               kept (TTL)    released      released at start  kept (TTL)
retry, replace              continued by the new attempt
``Reject(requeue=True)``    kept: the message comes back and runs again
``Ignore``                  as the state the task stored itself (FAILURE: a failure)
==========================  ============  ============  =================  ===========

Every release is owner-checked against the task id. Whether a run is
*marked* (see :mod:`celery_unique.lock`) depends on whether a copy of its
message can exist:

* **unmarked** (the default: early acknowledgement, no countdown or eta, or
  one short enough): once the run has begun, the message is acknowledged
  and the broker holds no copy, so the run costs one round trip, at its
  end, and leaves no key;
* **marked**: the message was redelivered or held back, it waited long
  enough for the broker to copy it, or it is acknowledged late on a broker
  that redelivers on a dropped connection. The run holds a marker, renewed
  by the process's keeper; a second copy of the same attempt is held back
  while it runs, and dropped once it has ended. A run acknowledged late on
  a broker with a visibility timeout begins unmarked and is marked a
  quarter of that timeout after its message was received, before any copy
  can exist.

docs/protocol.md states the whole protocol and its invariants.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from celery import states
from celery.exceptions import Ignore

from . import events, liveness
from .config import app_state
from .errors import ConfigurationError
from .headers import (
    HELD_HEADER,
    RECEIVED_KEY,
    REPLACEABLE_HEADER,
    Carried,
    carried_by,
    headers_of,
    nesting_of,
)
from .holders import stored_state
from .keeper import keeper
from .keys import marker_key
from .lock import KEEP, RELEASE, REQUEUE, Attempt, Outcome

if TYPE_CHECKING:
    from celery import Task

    from .config import _AppState

__all__ = [
    "RUN_ATTR",
    "Run",
    "begin_run",
    "eager_calls",
    "end_run",
    "hold_back",
    "pending_eager_retry",
    "report_configuration_once",
    "worker_state",
]

logger = logging.getLogger(__name__)

#: Attribute of a request (Celery's ``Context``) that holds its run.
RUN_ATTR = "_celery_unique_run"

# The message of the Ignore that Celery's Task.on_replace raises.
_REPLACED = "Replaced by new task"
# Verdicts of a run's beginning that let the body run.
_RUNS = frozenset({"run", "stray"})
#: A copy that waits for its lock (``unique_while_running="queue_one"``)
#: tries again after this many seconds, twice as long each time, up to
#: BEHIND_MOST: how long, at most, it lags its holder's end.
BEHIND_FIRST = 0.5
BEHIND_MOST = 5.0

#: Set while UniqueTask.apply_async runs a task eagerly (task_always_eager):
#: ``[task id it locked, whether the run began]``, so that apply() does not
#: lock it again, and an error after the run began is not a failed publish.
eager_calls: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar(
    "celery_unique_eager_calls", default=None
)
# An eager run that retried: Celery's apply() runs the retry right after the
# run ends, under the same id and lock.
_eager_retry: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar(
    "celery_unique_eager_retry", default=None
)
#: What UniqueTask gets for a call that is an eager run's retry.
_EAGER_RETRY = object()


def pending_eager_retry(task_id: str, retries: Any) -> bool:
    """Whether a call of ``task_id`` with ``retries`` is the retry an eager run just left; forget it."""
    pending = _eager_retry.get()
    if pending is None or pending != (task_id, int(retries or 0)):
        return False
    _eager_retry.set(None)
    return True


class Run:
    """One run of one copy of a task that carries a lock."""

    def __init__(self, task: Task, request: Any, carried: Carried, state: _AppState) -> None:
        self.task = task
        self.key = carried.key
        self.until = carried.until
        self.state = state
        self.attempt = Attempt(
            request.id,
            nesting_of(request),
            int(request.retries or 0),
            carried.nonce,
        )
        self.eager = bool(getattr(request, "is_eager", False))
        self.owner = liveness.owner(getattr(request, "hostname", None))
        #: "run" or "stray" once begun; "wait", "skip" or "drop" for a copy that must not run.
        self.verdict = "run"
        #: The marker value this run holds, if it is marked.
        self.marker: str | None = None
        #: Set when this run published its own retry or replacement.
        self.continued = False
        #: The state this run stored itself (``update_state``).
        self.stored: str | None = None
        #: How long the copy that holds the marker would keep it, for a "wait".
        self.wait_ms = 0
        #: Whether the keeper holds a pending mark of this run.
        self._scheduled = False

    @property
    def task_id(self) -> str:
        return self.attempt.task_id

    # -- beginning ------------------------------------------------------------------------------

    def begin(self, request: Any) -> None:
        """Mark the run if a copy of its message may exist, or schedule that; release under "start"."""
        if self.eager:
            if self.until == "start":
                self._release_now()
            return
        if _revoked_here(self.task_id):
            # A revoke this process knows of, for a task Celery runs anyway (a
            # threads pool took it before the revoke came): dropped, its lock freed.
            self.verdict = "drop"
            try:
                if self.state.store.discard(self.key, self.attempt, drop_later=True):
                    events.released(self.task, self.key, self.task_id, "revoked")
            except Exception as exc:
                warn_release_failed(self.task, self.task_id, self.key, exc)
            return
        window = self.state.redelivery_window
        headers = headers_of(request) or {}
        received = headers.get(RECEIVED_KEY)
        age = time.time() - received if isinstance(received, (int, float)) else None
        redelivered = bool((getattr(request, "delivery_info", None) or {}).get("redelivered"))
        acks_late = bool(self.task.acks_late)
        aged = window > 0 and (age is None or age >= window / 2)
        # A replaceable call's run is always marked: the marker is how a later
        # call knows it has begun, and may no longer replace it.
        copied = headers.get(HELD_HEADER) or headers.get(REPLACEABLE_HEADER) or redelivered or aged
        if copied or (acks_late and (window == 0 or self.until == "start")):
            self.mark()
        elif acks_late and isinstance(received, (int, float)):
            self._scheduled = True
            keeper(self.state).schedule(self, received + window / 4, self._mark_late)
        if self.until == "start" and self.marker is None and self.verdict in _RUNS:
            self._release_now()

    def mark(self, evict: str = "") -> None:
        """Take the running marker (BEGIN_SCRIPT); set the verdict."""
        ttl_ms = int(self.state.config.running_ttl * 1000)
        try:
            reply = self.state.store.begin(
                self.key, self.attempt, self.owner, liveness.proof(), ttl_ms,
                release=self.until == "start", evict=evict,
            )
        except Exception as exc:  # a lock store that is down must not stop work
            logger.warning(
                "celery_unique: could not mark task %s[%s] running (%s); it runs unmarked",
                self.task.name, self.task_id, exc,
            )
            self.verdict = "stray"
            return
        verdict = str(reply[0])
        if verdict == "wait" and not evict:
            holder = str(reply[2]).split("|")
            if len(holder) >= 7 and liveness.shown_dead(holder[5], holder[6]):
                logger.info(
                    "celery_unique: task %s[%s]: the copy that ran at %s is dead; this copy runs",
                    self.task.name, self.task_id, holder[5],
                )
                self.mark(evict=str(reply[2]))
                return
        self.verdict = verdict
        if verdict == "run":
            self.marker = str(reply[1])
            keeper(self.state).add(self._marker_key, self.marker)
        elif verdict == "wait":
            self.wait_ms = int(reply[1])

    def _mark_late(self) -> None:
        # From the keeper's thread: the run may have ended meanwhile (cancel()
        # then waited for this), so only a run still under way is marked.
        if self.verdict == "run" and self.marker is None:
            self.mark()
            if self.verdict != "run":
                logger.warning(
                    "celery_unique: task %s[%s] could not be marked running (%s)",
                    self.task.name, self.task_id, self.verdict,
                )
                self.verdict = "stray"

    @property
    def _marker_key(self) -> str:
        return marker_key(self.key, self.task_id)

    def _release_now(self) -> None:
        try:
            if self.state.store.discard(self.key, self.attempt, drop_later=False):
                events.released(self.task, self.key, self.task_id, "start")
        except Exception as exc:
            warn_release_failed(self.task, self.task_id, self.key, exc)

    # -- end ------------------------------------------------------------------------------------

    def end(self, celery_state: str | None, retval: Any) -> None:
        """End the run as Celery's outcome says (see the table above)."""
        if self._scheduled:
            keeper(self.state).cancel(self)
        if self.marker is not None:
            keeper(self.state).discard(self._marker_key)
        if self.verdict not in _RUNS or self.continued:
            return
        outcome = self.outcome(celery_state, retval)
        if self.until == "start" and outcome is not None:
            outcome = KEEP  # released as it began
        if outcome is None or (outcome != RELEASE and self.marker is None):
            # Nothing to write: the lock stays as it is, and no marker exists.
            if outcome is not None:
                events.kept(self.task, self.key, self.task_id, self._why(celery_state, outcome))
            return
        self.finish(outcome, celery_state)

    def finish(self, outcome: Outcome, celery_state: str | None) -> None:
        """Send the run's end to the lock store (END_SCRIPT)."""
        try:
            released = self.state.store.end(
                self.key, self.attempt, self.owner, outcome, leave_done=self.marker is not None
            )
        except Exception as exc:
            events.store_error(self.task)
            warn_release_failed(self.task, self.task_id, self.key, exc)
            return
        why = self._why(celery_state, outcome)
        if released:
            events.released(self.task, self.key, self.task_id, why)
        else:
            events.kept(self.task, self.key, self.task_id, why if outcome != RELEASE else "not its own")

    def _why(self, celery_state: str | None, outcome: Outcome) -> str:
        if outcome == REQUEUE:
            return "the message comes back"
        if self.until == "start":
            return f"{celery_state}, released as it began" if celery_state else "released as it began"
        if self.until == "expiry":
            return f"{celery_state or 'a final failure'}; kept for its TTL under unique_until='expiry'"
        if outcome == KEEP:
            return f"{celery_state or 'a final failure'} under unique_until={self.until!r}"
        return (celery_state or "success").lower()

    def outcome(self, celery_state: str | None, retval: Any) -> Outcome | None:
        """What the lock does at the end of a run that Celery finished with ``celery_state``."""
        if celery_state == states.SUCCESS:
            return settled(self.until, succeeded=True)
        if celery_state == states.RETRY and self.eager and getattr(retval, "sig", None) is not None:
            _eager_retry.set((self.task_id, self.attempt.retries + 1))
            return None  # Celery's apply() runs the retry at once, under this lock
        if celery_state == states.REJECTED:
            if getattr(retval, "requeue", False) and self.task.acks_late and not self.eager:
                return REQUEUE
            return self._failed()
        if celery_state == states.IGNORED:
            if isinstance(retval, Ignore) and str(retval) == _REPLACED:
                return None  # a plain task's Task.replace(): the replacement runs under this id
            # Celery's documented pattern stores a state itself, then ignores:
            # ``update_state(state=FAILURE, ...); raise Ignore()``.
            stored = self.stored if self.stored is not None else stored_state(self.task.backend, self.task_id)
            return settled(self.until, succeeded=stored != states.FAILURE)
        if celery_state is None:
            if isinstance(sys.exc_info()[1], Exception):
                return self._failed()  # eager, with task_eager_propagates: raised to the caller
            # The body raised a BaseException that is not an Exception: the
            # process is on its way out, or a threads pool goes on. The lock
            # stays; a marker goes, so that a copy that comes back runs.
            return REQUEUE if self.marker is not None else None
        return self._failed()  # FAILURE, or RETRY with nothing published

    def _failed(self) -> Outcome:
        return settled(self.until, succeeded=False)


def settled(until: str, *, succeeded: bool) -> Outcome:
    """The lock's outcome for a run that succeeded or failed for good, under ``unique_until``.

    "expiry" is a throttle: the lock lives out its TTL whatever the run did.
    ("start" released the lock as the run began; its end keeps nothing.)
    """
    if until == "expiry":
        return KEEP
    return RELEASE if succeeded or until == "finish" else KEEP




def _revoked_here(task_id: str) -> bool:
    module = sys.modules.get("celery.worker.state")
    revoked = getattr(module, "revoked", None)
    return revoked is not None and task_id in revoked


def begin_run(task: Task, request: Any) -> Run | None:
    """Begin the run of ``request``, or return None if it carries no lock.

    A request is begun once: a task calling itself directly inside its body
    shares its request's run and does not begin another.
    """
    if getattr(request, "called_directly", True) or RUN_ATTR in request.__dict__:
        return None
    carried = carried_by(headers_of(request))
    if carried is None or not getattr(request, "id", None):
        return None
    state = worker_state(task)
    if state is None:
        return None
    run = Run(task, request, carried, state)
    request.__dict__[RUN_ATTR] = run
    if run.eager:
        eager = eager_calls.get()
        if eager is not None and eager[0] == run.task_id:
            eager[1] = True
    run.begin(request)
    return run


def end_run(request: Any, celery_state: str | None, retval: Any) -> None:
    """End the run of ``request``, if it has one."""
    run: Run | None = request.__dict__.pop(RUN_ATTR, None) if request is not None else None
    if run is not None:
        run.end(celery_state, retval)


def worker_state(task: Task) -> _AppState | None:
    """Return the app state of ``task`` for a run, or None if its settings are broken.

    A worker whose lock-store settings are broken logs one error naming the
    setting (see :mod:`celery_unique.worker`), then runs its tasks without
    locks rather than failing every one of them.
    """
    try:
        return app_state(task._get_app())
    except ConfigurationError as exc:
        report_configuration_once(exc)
        return None


_reported: list[bool] = []


def report_configuration_once(exc: ConfigurationError) -> None:
    """Log, once per worker, that its lock-store settings are broken and why."""
    if not _reported:
        _reported.append(True)
        logger.error("celery_unique: this worker cannot release locks: %s", exc)


def warn_release_failed(task: Any, task_id: str, key: str, exc: Exception) -> None:
    """Log that ``task_id``'s lock could not be released, and that its TTL will free it."""
    logger.warning(
        "celery_unique: could not release lock %s of task %s[%s] (%s); its TTL will free it",
        key, getattr(task, "name", task), task_id, exc,
    )


def hold_back(task: Task, run: Run, request: Any, args: Any, kwargs: Any) -> Ignore:
    """Handle a copy that must not run now; return the ``Ignore`` to raise.

    A copy of an attempt another copy runs is published again, with a
    countdown until that copy's marker would expire, and runs then unless
    that copy has ended; its message is then acknowledged, so the task is
    never lost. So is a call that waits for its lock while another holds it
    (``unique_while_running="queue_one"``), after a countdown that grows
    from BEHIND_FIRST to BEHIND_MOST seconds.
    """
    if run.verdict in ("wait", "behind"):
        held = headers_of(request) or {}
        times = held.get(HELD_HEADER)
        times = times if isinstance(times, int) and not isinstance(times, bool) else 0
        if run.verdict == "wait":
            countdown = max(1.0, getattr(run, "wait_ms", 0) / 1000)
            logger.info(
                "celery_unique: task %s[%s] is already running elsewhere; this copy runs again in %gs "
                "if that one has not finished by then", task.name, run.task_id, countdown,
            )
        else:
            # Waiting for the holder's end: soon at first, then less often.
            countdown = min(BEHIND_FIRST * 2 ** min(times, 16), BEHIND_MOST)
            logger.info(
                "celery_unique: task %s[%s] waits for the call that holds its lock; it tries again in %gs",
                task.name, run.task_id, countdown,
            )
        signature = task.signature_from_request(request, args, kwargs, countdown=countdown)
        headers = {**(signature.options.get("headers") or {}), HELD_HEADER: times + 1}
        headers.pop(RECEIVED_KEY, None)
        from celery import Task as CeleryTask

        # Task.apply_async itself: this is the same task, already holding its lock.
        options = {**signature.options, "headers": headers}
        CeleryTask.apply_async(task, signature.args, signature.kwargs, **options)
        if run.verdict == "behind":
            return Ignore("celery_unique: this task waits for the call that holds its lock")
        return Ignore("celery_unique: another copy of this task id is running")
    if run.verdict == "drop":
        logger.info("celery_unique: dropped task %s[%s]: it was revoked or purged", task.name, run.task_id)
        return Ignore("celery_unique: this task was revoked or purged")
    logger.info(
        "celery_unique: dropped a copy of task %s[%s]: this attempt has already run",
        task.name, run.task_id,
    )
    return Ignore("celery_unique: this attempt of the task has already run")
