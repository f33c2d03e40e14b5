"""``UniqueTask``: a Celery task base class whose ``apply_async`` takes a lock first."""

from __future__ import annotations

import contextvars
import logging
import secrets
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import redis
from celery import Task, states
from celery.exceptions import Ignore
from celery.result import AsyncResult, EagerResult

from . import events
from .canvas import in_hand_over, record_refusal, replacement_of
from .cleanup import clean_up_later, release_quietly
from .compat import BEAT_HEADER
from .config import UniqueConfig, app_state
from .errors import DuplicateTaskError, LockStoreError
from .execution import _EAGER_RETRY, RUN_ATTR, Run, eager_calls, hold_back, pending_eager_retry
from .headers import LOCK_HEADER, NONCE_HEADER, OWN_HEADERS, REPLACES_HEADER, UNTIL_HEADER, carried_by
from .holders import looks_up_any_task, take_over_if_finished
from .ids import new_task_id
from .keys import call_digest, key_head
from .lock import AcquireError, Attempt, LockStore
from .option_names import check_option_names
from .options import (
    ON_DUPLICATE,
    OPTION_NAMES,
    UNTIL,
    OnDuplicate,
    UniqueOn,
    UniqueOptions,
    Until,
    check_choice,
    check_unique_on,
)
from .signals import in_beat
from .switch import unlock_if_disabled
from .ttl import delay_ms, ttl_ms
from .typed import UniqueSignature, typed_apply_async

__all__ = ["LOCK_HEADER", "UniqueTask"]

logger = logging.getLogger(__name__)

_UNSET: Any = object()
# Set while UniqueTask.apply() takes its lock: the task runs here and now.
_running_here: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "celery_unique_running_here", default=False
)
# Headers that schedulers put on the tasks they send: Celery beat (5.4+) and
# django-celery-beat (its scheduler and its admin's "Run selected tasks").
_SCHEDULE_HEADERS = (BEAT_HEADER, "periodic_task_name")

if TYPE_CHECKING:
    from typing import TypeAlias

    # celery-types makes Task generic in its parameters and result; a
    # UniqueTask takes any arguments and returns anything. Celery 5.5 and
    # older cannot subscript Task at run time.
    _TaskBase: TypeAlias = Task[..., Any]
else:
    _TaskBase = Task


class UniqueTask(_TaskBase):  # type: ignore[misc,unused-ignore]  # Task is Any without celery-types
    """A task that can be enqueued only while the same task is not queued.

    ``apply_async(..., unique=ttl)`` (or ``@app.task(base=UniqueTask,
    unique=ttl)`` for every call) takes a Redis lock named after the task, its
    arguments and its routed queue, held by the new task's id for ``ttl``
    seconds (a number or a ``timedelta``, at least 1 second). While another
    task holds it, or the same task id was already enqueued, the call raises
    :class:`~celery_unique.DuplicateTaskError` and publishes nothing. By
    default the lock is released when the task succeeds, or is revoked or
    expires; otherwise its TTL frees it.

    The other options, per call or as task attributes, are ``unique_on``,
    ``unique_until`` and ``on_duplicate`` (see the README).
    """

    #: Default lock TTL for every call; ``None`` means unique only when asked.
    unique: float | timedelta | None = None
    #: Names of the parameters that make up the key; ``None`` means all.
    unique_on: UniqueOn | None = None
    #: When the lock is released: "success", "finish", "start" or "expiry".
    unique_until: Until | None = None
    #: What a duplicate does: "raise" or "existing" (return the holder's result).
    on_duplicate: OnDuplicate | None = None

    #: The worker's request class: it ends the run of a task whose pool
    #: process died. Derive a request class of your own from it.
    Request = "celery_unique.worker:UniqueRequest"
    #: This class ends its runs in ``__call__``; the signal receivers leave it alone.
    runs_its_own_lock = True

    if TYPE_CHECKING:
        # Task's own, as type checkers should see them on a unique task: the
        # result typed, and signatures whose set() takes the unique options.
        def delay(self, *args: Any, **kwargs: Any) -> AsyncResult[Any]: ...

        def s(self, *args: Any, **kwargs: Any) -> UniqueSignature: ...

        def si(self, *args: Any, **kwargs: Any) -> UniqueSignature: ...

        def signature(
            self,
            args: Sequence[Any] | None = ...,
            kwargs: Mapping[str, Any] | None = ...,
            *,
            unique: float | timedelta | None = ...,
            unique_on: UniqueOn | None = ...,
            unique_until: Until | None = ...,
            on_duplicate: OnDuplicate | None = ...,
            **options: Any,
        ) -> UniqueSignature: ...

    # -- enqueue ----------------------------------------------------------------------------------

    @typed_apply_async  # declares the unique options as typed keywords (typed.py)
    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> AsyncResult[Any]:
        """Take the task's lock, then publish it as ``Task.apply_async`` does.

        ``unique=`` (seconds or ``timedelta``) overrides the task's default
        TTL, and ``unique=None`` turns locking off for this call.
        """
        check_option_names(self.name, options)
        unlock_if_disabled(self, options)
        requested = {name: options.pop(name) for name in OPTION_NAMES if name in options}
        continued = self._continued_run(task_id, options)
        if continued is not None:
            return self._continue(continued, options, lambda: self._publish(
                args, kwargs, task_id, producer, link, link_error, shadow, options
            ))
        ttl = requested.get("unique", self.unique)
        from_schedule = self._from_schedule(options.get("headers"))
        _drop_own_headers(options)
        if ttl is None:
            return self._publish(args, kwargs, task_id, producer, link, link_error, shadow, options)
        locked = self._lock(args, kwargs, task_id, options, ttl, requested, from_schedule, link, link_error)
        if isinstance(locked, AsyncResult):
            return locked
        store, key, task_id = locked
        if self._get_app().conf.task_always_eager:
            return self._run_eagerly(
                store, key, task_id, args, kwargs, producer, link, link_error, shadow, options
            )
        try:
            return self._publish(args, kwargs, task_id, producer, link, link_error, shadow, options)
        except BaseException:
            # No lock without a published task: whatever stopped the publish
            # (broker down, serializer error, Ctrl-C), give the lock back.
            release_quietly(store, key, task_id, _nonce_of(options))
            raise

    def apply(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        link: Any = None,
        link_error: Any = None,
        task_id: str | None = None,
        retries: int | None = None,
        throw: bool | None = None,
        logfile: Any = None,
        loglevel: Any = None,
        headers: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        """Run the task here and now, taking its lock first as ``apply_async`` would.

        Eager canvases (``chain(...).apply()``, or any canvas under
        ``task_always_eager``) run their members with ``apply``: each member
        takes and releases its lock as it would under a worker.
        """
        check_option_names(self.name, options)
        unlock_if_disabled(self, options)
        requested = {name: options.pop(name) for name in OPTION_NAMES if name in options}
        call_options = dict(options, headers=headers, retries=retries)

        def run_here(run_headers: Any) -> Any:
            return super(UniqueTask, self).apply(
                args, kwargs, link, link_error, task_id, retries, throw, logfile, loglevel,
                run_headers, **options,
            )

        eager = eager_calls.get()
        if eager is not None and eager[0] == task_id:
            return run_here(headers)
        continued = self._continued_run(task_id, call_options)
        if continued is not None:
            return self._continue(continued, call_options, lambda: run_here(headers))
        ttl = requested.get("unique", self.unique)
        from_schedule = self._from_schedule(headers)
        _drop_own_headers(call_options)
        if ttl is None:
            return run_here(call_options["headers"])
        token = _running_here.set(True)
        try:
            locked = self._lock(
                args, kwargs, task_id, call_options, ttl, requested, from_schedule, link, link_error
            )
        finally:
            _running_here.reset(token)
        if isinstance(locked, AsyncResult):
            return locked
        _, _, task_id = locked
        return run_here(call_options["headers"])

    def lock_key(
        self,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        options: Mapping[str, Any],
        unique_on: Sequence[str] | None = _UNSET,
    ) -> str:
        """Return the lock key for a call: task name, routed queue and arguments.

        ``unique_on`` defaults to the task's; pass ``None`` for all arguments.
        """
        if unique_on is _UNSET:
            unique_on = check_unique_on(self.name, self.unique_on)
        config = app_state(self._get_app()).config
        return self._lock_key(args, kwargs, options, unique_on, config)

    def unique_identity(self, arguments: dict[str, Any]) -> Any:
        """Return what identifies a call among calls of this task.

        ``arguments`` maps parameter names to the values the call passes
        (pydantic models dumped as Celery sends them), leaving out every
        parameter left at its default or passed a value equal to it, after
        ``unique_on`` kept the named ones: read a parameter that has a default
        with ``arguments.get(name, default)``. The result is encoded
        canonically as the task's serializer sends it, and hashed into the
        lock key. Override it to compute the identity yourself, e.g.
        ``return arguments["url"].lower()``.
        """
        return arguments

    # -- run --------------------------------------------------------------------------------------

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        """Hold back or drop a copy of this task that must not run now (see :mod:`celery_unique.execution`).

        Its run began at ``task_prerun``; a subclass that overrides this
        method calls ``super().before_start(...)`` first.
        """
        run: Run | None = self.request.__dict__.get(RUN_ATTR)
        if run is not None and run.verdict not in ("run", "stray"):
            raise hold_back(self, run, self.request, args, kwargs)

    def update_state(self, task_id: str | None = None, state: str | None = None, meta: Any = None,
                     **kwargs: Any) -> None:
        """Store a state as Celery does, and remember it for the run's end (``Ignore`` after it)."""
        super().update_state(task_id, state, meta, **kwargs)
        run: Run | None = self.request.__dict__.get(RUN_ATTR)
        if run is not None and (task_id is None or task_id == run.task_id):
            run.stored = state

    def on_replace(self, sig: Any) -> Any:
        """Hand this task's lock to the replacement, which runs under the same task id."""
        run: Run | None = self.request.__dict__.get(RUN_ATTR)
        if run is None:
            return super().on_replace(sig)
        headers = {LOCK_HEADER: run.key, REPLACES_HEADER: run.task_id}
        if run.until != "success":
            headers[UNTIL_HEADER] = run.until
        if run.attempt.nonce:
            headers[NONCE_HEADER] = run.attempt.nonce
        final = replacement_of(sig, run.task_id)
        if final is not None:
            final.set(headers={**(final.options.get("headers") or {}), **headers})
        attempt = run.attempt._replace(nesting=run.attempt.nesting + 1, retries=0)
        return self._continue(run, {"_attempt": attempt}, lambda: super(UniqueTask, self).on_replace(sig))

    # -- internals --------------------------------------------------------------------------------

    def _continued_run(self, task_id: str | None, options: Mapping[str, Any]) -> Any:
        """The run this call continues, or None: only a task's own retry or replacement does.

        A retry re-enqueues the task under its own id, from inside its run,
        with one more retry; a ``Task.replace()`` replacement is published
        from inside the replaced task's run under its id. As in Asynq, either
        keeps the lock and is never checked again. Any other call that names
        a task id holding a lock is a duplicate, whatever options it passes.
        """
        if not task_id:
            return None
        retries = options.get("retries")
        headers = options.get("headers")
        replaces = isinstance(headers, Mapping) and headers.get(REPLACES_HEADER) == task_id
        if not (retries or replaces):
            return None
        if pending_eager_retry(task_id, retries):
            return _EAGER_RETRY
        current = self._get_app().current_task
        request = current.request if current is not None else None
        run = request.__dict__.get(RUN_ATTR) if request is not None and request.id == task_id else None
        if run is not None:
            return run if replaces or int(retries or 0) == run.attempt.retries + 1 else None
        from .worker import failing_request

        failing = failing_request()  # the main process retries a task whose process was lost
        return failing if failing is not None and failing.id == task_id and retries else None

    def _continue(self, run: Any, options: Mapping[str, Any], publish: Any) -> Any:
        """Publish a retry or replacement of ``run`` with ``publish()``; then say so to the lock store."""
        if run is _EAGER_RETRY:
            return publish()
        run.continued = True
        try:
            result = publish()
        except Ignore:  # Task.on_replace published the replacement, then ignores the replaced task
            self._mark_continued(run, options)
            raise
        except BaseException:
            run.continued = False
            raise
        self._mark_continued(run, options)
        return result

    def _mark_continued(self, run: Any, options: Mapping[str, Any]) -> None:
        # Sent after the publish (see CONTINUE_SCRIPT): a state the task
        # stores from now on (a retry with throw=False stores SUCCESS) is not
        # taken for the new attempt's, and copies of this attempt are dropped.
        if isinstance(run, Run):
            if run.eager:
                return
            key, nonce, state = run.key, run.attempt.nonce, run.state
        else:
            carried = carried_by(run.request_dict)
            if carried is None:
                return
            key, nonce, state = carried.key, carried.nonce, app_state(self._get_app())
        attempt = options.get("_attempt") or Attempt(
            run.id if not isinstance(run, Run) else run.task_id,
            int(options.get("replaced_task_nesting") or 0),
            int(options.get("retries") or 0),
            nonce,
        )
        try:
            state.store.continue_(key, attempt)
        except Exception as exc:
            logger.warning(
                "celery_unique: could not record the retry of task %s[%s] under lock %s (%s)",
                self.name, attempt.task_id, key, exc,
            )

    def _from_schedule(self, headers: Any) -> bool:
        # Beat's own thread, or a scheduler's header on a call made outside a
        # running task: a header forwarded from a task's request never counts.
        if in_beat():
            return True
        return bool(
            isinstance(headers, Mapping)
            and any(headers.get(name) for name in _SCHEDULE_HEADERS)
            and self._get_app().current_worker_task is None
        )

    def _lock(
        self,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        task_id: str | None,
        options: dict[str, Any],
        ttl: Any,
        requested: Mapping[str, Any],
        from_schedule: bool,
        link: Any,
        link_error: Any,
    ) -> tuple[LockStore, str, str] | AsyncResult[Any]:
        """Take the call's lock: ``(store, key, task id)``, or the duplicate's result."""
        app = self._get_app()
        state = app_state(app)
        unique = self._resolve_options(ttl, requested, state.config)
        key = self._lock_key(args, kwargs, options, unique.unique_on, state.config)
        lock_ttl_ms = unique.ttl_ms
        countdown, eta = options.get("countdown"), options.get("eta")
        if countdown or eta:
            lock_ttl_ms += delay_ms(app.now(), countdown, eta)
        # The lock's value is the task id, so the id must exist before the lock.
        # A caller-chosen id may have run before: its incarnation gets a nonce.
        chosen_id = task_id
        task_id = task_id or new_task_id()
        nonce = secrets.token_urlsafe(6) if chosen_id else None
        headers = dict(options.get("headers") or ())
        headers[LOCK_HEADER] = key
        if unique.until != "success":
            headers[UNTIL_HEADER] = unique.until
        if nonce is not None:
            headers[NONCE_HEADER] = nonce
        options["headers"] = headers

        try:
            store = state.store
        except redis.RedisError as exc:  # a Redis Cluster client connects as it is built
            raise LockStoreError.from_error(self.name, key, exc) from exc
        holder = self._acquire(store, key, task_id, lock_ttl_ms, nonce)
        # A throttle's holder stands for the whole TTL: no state to read.
        checks = state.config.check_holder and unique.until != "expiry"
        if holder is not None and holder != task_id and checks:
            backend = self.backend
            if looks_up_any_task(backend) and not _eager_without_results(app):
                holder = take_over_if_finished(
                    self, store, backend, key, holder, task_id, lock_ttl_ms, unique.until, nonce
                )
        if holder is None:
            events.taken(self, key, task_id, lock_ttl_ms)
            return store, key, task_id
        # A refused call someone may wait on: its id was chosen before the call
        # (a chain link, a group or chord member, a chord body, a frozen
        # signature), it carries callbacks that would otherwise be dropped, or
        # apply() runs it here and now.
        awaited = chosen_id is not None or bool(link or link_error) or _running_here.get()
        return self._on_duplicate(
            unique, holder, key, args, kwargs, from_schedule,
            task_id if awaited else None, options, link, link_error,
        )

    def _lock_key(
        self,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        options: Mapping[str, Any],
        unique_on: Sequence[str] | None,
        config: UniqueConfig,
    ) -> str:
        digest = call_digest(self, args, kwargs, unique_on, options)
        queue = self._routed_queue(args, kwargs, options, config.default_queue)
        # The escaped head of the key, per prefix and queue, is worked out once.
        heads: dict[tuple[str, str], str] = self.__dict__.setdefault("_unique_key_heads", {})
        head = heads.get((config.key_prefix, queue))
        if head is None:
            head = heads[(config.key_prefix, queue)] = key_head(config.key_prefix, queue, self.name)
        return head + digest

    def _publish(
        self,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        task_id: str | None,
        producer: Any,
        link: Any,
        link_error: Any,
        shadow: str | None,
        options: dict[str, Any],
    ) -> AsyncResult[Any]:
        return super().apply_async(
            args, kwargs, task_id, producer, link, link_error, shadow, **options
        )

    def _run_eagerly(
        self,
        store: LockStore,
        key: str,
        task_id: str,
        args: Any,
        kwargs: Any,
        producer: Any,
        link: Any,
        link_error: Any,
        shadow: Any,
        options: dict[str, Any],
    ) -> AsyncResult[Any]:
        # task_always_eager: the task runs inside this call, and its run ends
        # as a worker's would (a final failure keeps the lock under "success",
        # even when task_eager_propagates raises it here). Only an error
        # before the run began is a failed "publish".
        eager = [task_id, False]
        token = eager_calls.set(eager)
        try:
            return self._publish(args, kwargs, task_id, producer, link, link_error, shadow, options)
        except BaseException:
            if not eager[1]:
                release_quietly(store, key, task_id, _nonce_of(options))
            raise
        finally:
            eager_calls.reset(token)

    def _resolve_options(
        self, ttl: Any, requested: Mapping[str, Any], config: UniqueConfig
    ) -> UniqueOptions:
        # Per call, then task attribute, then app setting, then default.
        until = requested.get("unique_until") or self.unique_until or config.until
        on_duplicate = requested.get("on_duplicate") or self.on_duplicate or config.on_duplicate
        unique_on = requested.get("unique_on", self.unique_on)
        # Checked once per distinct combination: calls repeat a handful of them.
        cache: dict[Any, UniqueOptions] = self.__dict__.setdefault("_unique_options", {})
        try:
            cache_key: Any = (ttl, type(ttl), until, on_duplicate, unique_on, type(unique_on))
            return cache[cache_key]
        except TypeError:  # an unhashable unique_on (a list): checked every time
            cache_key = None
        except KeyError:
            pass
        options = self._check_options(ttl, until, on_duplicate, unique_on)
        if cache_key is not None and len(cache) < 256:
            cache[cache_key] = options
        return options

    def _check_options(self, ttl: Any, until: Any, on_duplicate: Any, unique_on: Any) -> UniqueOptions:
        return UniqueOptions(
            ttl_ms=ttl_ms(self.name, ttl),
            unique_on=check_unique_on(self.name, unique_on),
            until=check_choice(self.name, "unique_until", until, UNTIL),
            on_duplicate=check_choice(self.name, "on_duplicate", on_duplicate, ON_DUPLICATE),
        )

    def _on_duplicate(
        self,
        unique: UniqueOptions,
        holder: str,
        key: str,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        from_schedule: bool,
        refused_id: str | None,
        options: Mapping[str, Any],
        link: Any,
        link_error: Any,
    ) -> AsyncResult[Any]:
        events.refused(self, key, holder, args, kwargs)
        if refused_id is not None and refused_id != holder:
            # Record the refused call as failed, as Celery records a failed
            # task, so later chain steps, the chord and the errbacks hear of
            # it now instead of waiting for ever.
            error = DuplicateTaskError(self.name, holder, key)
            record_refusal(self, refused_id, error, args, kwargs, options, link, link_error)
        if in_hand_over(self._get_app()):
            # A worker sending the next step of a canvas after a step ran: the
            # refused step's own result says why, and the step that ran keeps
            # its result. Raising here would make Celery store that step as
            # failed, and send a chord down its failure path.
            return self.AsyncResult(refused_id or holder)
        # Beat would log a duplicate as a scheduling ERROR with a traceback on
        # every tick; for a scheduler a duplicate is expected, so it is only logged.
        if unique.on_duplicate == "existing" or from_schedule:
            if refused_id is not None and (_running_here.get() or self._get_app().conf.task_always_eager):
                # An eager canvas waits on each member's result here and now:
                # the refused member's is its failure, never the holder's
                # result, which a worker may take hours to produce.
                return EagerResult(refused_id, DuplicateTaskError(self.name, holder, key), states.FAILURE)
            return self.AsyncResult(holder)
        # Raised as it is made: an exception held in a local of this frame
        # would, through its traceback, form a cycle kept until a full GC.
        raise DuplicateTaskError(self.name, holder, key)

    def _routed_queue(
        self,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        options: Mapping[str, Any],
        default_queue: str,
    ) -> str:
        # The queue Celery will publish to: the queue option, then the task's
        # queue attribute, then task_routes, then task_default_queue. route()
        # pops from the dict it is given, so it gets a fresh one.
        app = self._get_app()
        router = app.amqp.router
        if not router.routes:
            # Without task_routes the router would only pick the first of
            # these; skipping it saves a third of the key's cost.
            queue = (
                options.get("queue")
                or self._get_exec_options().get("queue")
                or default_queue
            )
            return str(getattr(queue, "name", queue))
        route = router.route(
            dict(self._get_exec_options(), **options), self.name, args, kwargs, self
        )
        queue = route.get("queue")
        if queue is not None:
            return str(queue.name)
        return str(route.get("routing_key") or "")

    def _acquire(
        self, store: LockStore, key: str, task_id: str, ttl: int, nonce: str | None
    ) -> str | None:
        try:
            return store.acquire(key, task_id, ttl, nonce)
        except AcquireError as failure:
            events.store_error(self)
            exc = failure.error
            if failure.maybe_applied:
                # A timed-out SET may still be applied once the server catches
                # up; this id is never published, so an owner-checked release
                # is always safe. It runs in the background: against a stalled
                # server it would wait out a second timeout first.
                clean_up_later(store, key, task_id, nonce or "")
            raise LockStoreError.from_error(self.name, key, exc) from exc


def _drop_own_headers(options: dict[str, Any]) -> None:
    headers = options.get("headers")
    if isinstance(headers, Mapping) and any(name in headers for name in OWN_HEADERS):
        options["headers"] = {k: v for k, v in headers.items() if k not in OWN_HEADERS}


def _eager_without_results(app: Any) -> bool:
    # Eager runs store no result unless task_store_eager_result is set.
    conf = app.conf
    return bool(conf.task_always_eager and not conf.task_store_eager_result)


def _nonce_of(options: Mapping[str, Any]) -> str:
    headers = options.get("headers")
    nonce = headers.get(NONCE_HEADER) if isinstance(headers, Mapping) else None
    return nonce if isinstance(nonce, str) else ""


