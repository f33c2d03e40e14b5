"""``UniqueTask``: a Celery task base class whose ``apply_async`` takes a lock first.

The class is the entry point and nothing more: :mod:`celery_unique.enqueue`
takes the lock, refuses a duplicate and publishes, over one
:class:`~celery_unique.call.Call` per call; :mod:`celery_unique.keys` derives
the key; :mod:`celery_unique.continuation` lets a retry keep its lock;
:mod:`celery_unique.execution` governs the run on the worker.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from celery import Task
from celery.result import AsyncResult

from . import keys
from .call import Call
from .config import app_state
from .continuation import continue_run, continued_run, hand_over
from .enqueue import from_schedule, lock, lock_here, publish, take_unique_options
from .execution import RUN_ATTR, Run, eager_calls, hold_back
from .fanout import defer_call, deferred, outside_block
from .headers import LOCK_HEADER, drop_own_headers
from .option_names import check_option_names
from .options import UNSET, OnDuplicate, OnStoreError, UniqueOn, Until, WhileRunning, check_unique_on
from .switch import unlock_if_disabled
from .typed import UniqueSignature, typed_apply_async

__all__ = ["LOCK_HEADER", "UniqueTask"]

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

    The other options, per call or as task attributes, are below (see the README).
    """

    #: Default lock TTL for every call; ``None`` means unique only when asked.
    unique: float | timedelta | None = None
    #: Names of the parameters that make up the key; ``None`` means all.
    unique_on: UniqueOn | None = None
    #: When the lock is released: "success", "finish", "start" or "expiry".
    unique_until: Until | None = None
    #: What a duplicate does: "raise", "existing" (the holder's result), "replace" (a debounce), "join".
    on_duplicate: OnDuplicate | None = None
    #: What a lock-store error does: "raise" (LockStoreError) or "enqueue" (publish unlocked).
    unique_on_store_error: OnStoreError | None = None
    #: Under on_duplicate="replace": at most how long (seconds or timedelta) a debounce postpones.
    unique_max_wait: float | timedelta | None = None
    #: How many calls with one key may be queued or running at once (default 1).
    unique_limit: int | None = None
    #: Under on_duplicate="replace", once the holder has begun: "refuse" or "queue_one" (run after it).
    unique_while_running: WhileRunning | None = None

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
            unique_on_store_error: OnStoreError | None = ...,
            unique_max_wait: float | timedelta | None = ...,
            unique_limit: int | None = ...,
            unique_while_running: WhileRunning | None = ...,
            **options: Any,
        ) -> UniqueSignature: ...

    # -- enqueue ----------------------------------------------------------------------------------
    # apply_async and apply keep the signatures Celery gives them: they are
    # Celery's API, which callers and canvases call positionally.

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
        if deferred.get() is not None and defer_call(
            self, args, kwargs, task_id, {"link": link, "link_error": link_error, "shadow": shadow}, options
        ):
            return self.AsyncResult(task_id)  # a fan_out() block locks and publishes it at its end
        unlock_if_disabled(self, options)
        requested = take_unique_options(options)
        call = Call(self, args, kwargs, options, task_id, link, link_error, producer, shadow,
                    from_schedule(self, options.get("headers")))
        continued = continued_run(self, task_id, options)
        if continued is not None:
            return continue_run(self, continued, options, lambda: self._publish(call))
        ttl = requested.get("unique", self.unique)
        drop_own_headers(options)
        if ttl is None:
            return self._publish(call)
        locked = lock(call, ttl, requested)
        if locked is None:  # failed open: no lock to give back
            return self._publish(call)
        if isinstance(locked, AsyncResult):
            return locked
        return publish(call, locked)

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
        requested = take_unique_options(options)
        call_options = dict(options, headers=headers, retries=retries)
        call = Call(self, args, kwargs, call_options, task_id, link, link_error,
                    from_schedule=from_schedule(self, headers))

        def run_here(run_headers: Any) -> Any:
            # Under the lock's task id, once lock_here() has given the call one.
            return super(UniqueTask, self).apply(
                args, kwargs, link, link_error, call.task_id, retries, throw, logfile, loglevel,
                run_headers, **options,
            )

        eager = eager_calls.get()
        if eager is not None and eager[0] == task_id:
            return run_here(headers)
        continued = continued_run(self, task_id, call_options)
        if continued is not None:
            return continue_run(self, continued, call_options, lambda: run_here(headers))
        ttl = requested.get("unique", self.unique)
        drop_own_headers(call_options)
        if ttl is not None:
            locked = lock_here(call, ttl, requested)
            if isinstance(locked, AsyncResult):
                return locked
        return run_here(call_options["headers"])

    def lock_key(
        self,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        options: Mapping[str, Any],
        unique_on: Sequence[str] | None = UNSET,
    ) -> str:
        """Return the lock key for a call: task name, routed queue and arguments.

        ``unique_on`` defaults to the task's; pass ``None`` for all arguments.
        """
        if unique_on is UNSET:
            unique_on = check_unique_on(self.name, self.unique_on)
        config = app_state(self._get_app()).config
        return keys.lock_key(self, args, kwargs, options, unique_on, config)

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
        """Hand this task's lock to the replacement, sent at once (even in a ``fan_out()`` block)."""
        run: Run | None = self.request.__dict__.get(RUN_ATTR)
        if run is None:
            return outside_block(super().on_replace, sig)
        return outside_block(hand_over, self, run, sig, lambda: super(UniqueTask, self).on_replace(sig))

    # -- internals --------------------------------------------------------------------------------

    def _publish(self, call: Call) -> AsyncResult[Any]:
        """Publish ``call`` as ``Task.apply_async`` does (a stand-in task sends it by name)."""
        return super().apply_async(
            call.args, call.kwargs, call.task_id, call.producer, call.link, call.link_error,
            call.shadow, **call.options,
        )
