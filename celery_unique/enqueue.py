"""The enqueue of a unique call: take its lock, then publish or run it, or refuse it.

================================  ==============================================
outcome                           what the caller gets
================================  ==============================================
lock taken (or taken over from    the published task's ``AsyncResult``; a publish
a holder that has finished)       that fails gives the lock back
taken, ``task_always_eager``      the eager run's result; the run ends the lock
refused                           ``DuplicateTaskError``, raised
refused, ``on_duplicate=          the holder's ``AsyncResult``
"existing"`` or from a scheduler
refused, ``"join"``, and awaited  the ``AsyncResult`` of the refused id, which
(a canvas step, callbacks, a      a follow-up fills with the holder's result
chosen id)                        (see :mod:`celery_unique.join`)
refused while a worker hands a    the refused call's ``AsyncResult``
canvas on
refused, run here (``apply()``,   an ``EagerResult`` failed with
eager) with ``"existing"``        ``DuplicateTaskError``
================================  ==============================================

Through the package's transport (see :mod:`celery_unique.atomic`) the lock
is taken by the publish itself, in one script; a refusal is heard once the
publish has returned, and is then handled as here.

A refused call someone may wait on (a chosen id, callbacks, a run here) is
also stored as failed, so that its canvas hears of it (see
:func:`celery_unique.canvas.record_refusal`).
"""

from __future__ import annotations

import contextvars
import secrets
from collections.abc import Mapping
from typing import Any

import redis
from celery import states
from celery.result import AsyncResult, EagerResult

from . import atomic, events
from .call import Call
from .canvas import in_hand_over, record_refusal
from .cleanup import clean_up_later, release_quietly
from .compat import BEAT_HEADER
from .config import UniqueConfig, app_state
from .errors import DuplicateTaskError, LockStoreError
from .execution import eager_calls
from .headers import (
    LOCK_HEADER,
    NONCE_HEADER,
    OWN_HEADERS,
    REPLACEABLE_HEADER,
    TICKET_HEADER,
    UNLOCKED_HEADER,
    UNTIL_HEADER,
)
from .holders import Claim, looks_up_any_task, take_over_any_finished, take_over_if_finished
from .ids import new_task_id
from .join import can_join, send_join
from .keys import lock_key
from .limit import acquire_slot, check_slots, hold_slot
from .lock import AcquireError, LockStore, Replaced, Slots
from .options import (
    ON_DUPLICATE,
    ON_STORE_ERROR,
    OPTION_NAMES,
    UNTIL,
    WHILE_RUNNING,
    UniqueOptions,
    check_choice,
    check_limit,
    check_unique_on,
)
from .signals import in_beat
from .ttl import delay_ms, max_wait_ms, ttl_ms

__all__ = [
    "decide",
    "failed",
    "from_schedule",
    "lock",
    "lock_here",
    "lock_store",
    "prepare",
    "publish",
    "resolve_options",
    "take_unique_options",
]

# Set while UniqueTask.apply() takes its lock: the task runs here and now.
_running_here: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "celery_unique_running_here", default=False
)
# Headers that schedulers put on the tasks they send: Celery beat (5.4+) and
# django-celery-beat (its scheduler and its admin's "Run selected tasks").
_SCHEDULE_HEADERS = (BEAT_HEADER, "periodic_task_name")


def take_unique_options(options: dict[str, Any]) -> dict[str, Any]:
    """Take the unique options out of a call's options: they never reach kombu."""
    return {name: options.pop(name) for name in OPTION_NAMES if name in options}


def from_schedule(task: Any, headers: Any) -> bool:
    """Whether a scheduler sends this call of ``task``.

    Beat's own thread, or a scheduler's header on a call made outside a
    running task: a header forwarded from a task's request never counts.
    """
    if in_beat():
        return True
    return bool(
        isinstance(headers, Mapping)
        and any(headers.get(name) for name in _SCHEDULE_HEADERS)
        and task._get_app().current_worker_task is None
    )


def resolve_options(
    task: Any, ttl: Any, requested: Mapping[str, Any], config: UniqueConfig
) -> UniqueOptions:
    """Resolve and check a call's options: per call, then task attribute, then app setting, then default."""
    until = requested.get("unique_until") or task.unique_until or config.until
    on_duplicate = requested.get("on_duplicate") or task.on_duplicate or config.on_duplicate
    on_store_error = (
        requested.get("unique_on_store_error") or task.unique_on_store_error or config.on_store_error
    )
    max_wait = requested.get("unique_max_wait", task.unique_max_wait)
    if max_wait is None:
        max_wait = config.max_wait
    unique_on = requested.get("unique_on", task.unique_on)
    limit = requested.get("unique_limit", task.unique_limit)
    if limit is None:
        limit = config.limit
    while_running = (
        requested.get("unique_while_running") or task.unique_while_running or config.while_running
    )
    # Checked once per distinct combination: calls repeat a handful of them.
    cache: dict[Any, UniqueOptions] = task.__dict__.setdefault("_unique_options", {})
    try:
        cache_key: Any = (
            ttl, type(ttl), until, on_duplicate, on_store_error, max_wait, type(max_wait),
            unique_on, type(unique_on), limit, type(limit), while_running,
        )
        return cache[cache_key]
    except TypeError:  # an unhashable unique_on (a list): checked every time
        cache_key = None
    except KeyError:
        pass
    name = task.name
    options = UniqueOptions(
        ttl_ms=ttl_ms(name, ttl),
        unique_on=check_unique_on(name, unique_on),
        until=check_choice(name, "unique_until", until, UNTIL),
        on_duplicate=check_choice(name, "on_duplicate", on_duplicate, ON_DUPLICATE),
        on_store_error=check_choice(name, "unique_on_store_error", on_store_error, ON_STORE_ERROR),
        max_wait_ms=max_wait_ms(name, max_wait),
        limit=check_limit(name, limit),
        while_running=check_choice(name, "unique_while_running", while_running, WHILE_RUNNING),
    )
    if options.limit > 1:
        check_slots(name, options, config, task._get_app())
    if cache_key is not None and len(cache) < 256:
        cache[cache_key] = options
    return options


def prepare(call: Call, ttl: Any, requested: Mapping[str, Any]) -> int:
    """Fill in the call's lock fields and put the lock's headers in its options; return the lock's TTL in ms.

    The fields: its resolved options, its key, the task id the lock holds
    (the caller's or a new one) and the nonce of a caller-chosen id.
    """
    task = call.task
    app = task._get_app()
    state = app_state(app)
    unique = call.unique = resolve_options(task, ttl, requested, state.config)
    options = call.options
    key = call.key = lock_key(task, call.args, call.kwargs, options, unique.unique_on, state.config)
    lock_ttl_ms = unique.ttl_ms
    countdown, eta = options.get("countdown"), options.get("eta")
    if countdown or eta:
        lock_ttl_ms += delay_ms(app.now(), countdown, eta)
    # The lock's value is the task id, so the id must exist before the lock.
    # A caller-chosen id may have run before: its incarnation gets a nonce.
    # A replaceable call's marker says so: it gets a nonce too.
    chosen_id = call.task_id
    call.task_id = chosen_id or new_task_id()
    call.chosen = chosen_id is not None
    replaceable = call.replaceable = _replaces(call)
    nonce = call.nonce = secrets.token_urlsafe(6) if chosen_id or replaceable else None
    headers = dict(options.get("headers") or ())
    headers[LOCK_HEADER] = key
    if unique.until != "success":
        headers[UNTIL_HEADER] = unique.until
    if nonce is not None:
        headers[NONCE_HEADER] = nonce
    if replaceable:
        headers[REPLACEABLE_HEADER] = 1
    options["headers"] = headers
    return lock_ttl_ms


def lock(call: Call, ttl: Any, requested: Mapping[str, Any]) -> LockStore | AsyncResult[Any] | None:
    """Take the call's lock: the lock store that holds it, or the duplicate's result.

    None when the lock store failed and the call fails open
    (``unique_on_store_error="enqueue"``): it goes out without a lock.
    """
    lock_ttl_ms = prepare(call, ttl, requested)
    if call.replaceable:
        return _replace(call, lock_ttl_ms)
    if call.unique.limit > 1:
        return _take_slot(call, lock_ttl_ms)
    task = call.task
    app = task._get_app()
    lock_db = None if _running_here.get() or app.conf.task_always_eager else atomic.lock_db(app)
    holder = None
    if lock_db is not None:
        # The package's transport takes the lock as it queues the message.
        holder, published = _enqueue_atomically(call, lock_ttl_ms, lock_db)
        if holder is None:
            events.taken(task, call.key, call.lock_id, lock_ttl_ms)
            return published
    try:
        store = lock_store(call)
        if lock_db is None:
            holder = _acquire(call, store, lock_ttl_ms)
    except LockStoreError as exc:
        failed(call, exc)
        return None
    return decide(call, store, holder, lock_ttl_ms)


#: Options of a call that is a step of a canvas: dropping it would drop the rest.
_CANVAS_OPTIONS = ("chain", "chord", "group_id")


def _replaces(call: Call) -> bool:
    # A debounce replaces a queued holder. Run here or eagerly, a call
    # refuses as "raise" would (the holder it finds has run already); so
    # does a canvas step or a call with callbacks, whose replacement would
    # leave the rest of its canvas waiting for ever: it is never replaceable.
    if call.unique.on_duplicate != "replace" or _running_here.get() or call.link or call.link_error:
        return False
    options = call.options
    if any(options.get(name) for name in _CANVAS_OPTIONS):
        return False
    return not call.task._get_app().conf.task_always_eager


def _replace(call: Call, lock_ttl_ms: int) -> LockStore | AsyncResult[Any] | None:
    # on_duplicate="replace": REPLACE_SCRIPT takes the lock, dropping a
    # holder that has not begun; a holder that has begun refuses the call,
    # after the holder check, as "raise" does, unless the call waits for it
    # (unique_while_running="queue_one"): it is then published at once, and
    # held back as it begins until the lock is free.
    task = call.task
    try:
        store = lock_store(call)
        try:
            queue_one = call.unique.while_running == "queue_one"
            answer = store.replace(call.key, call.lock_id, lock_ttl_ms, call.nonce or "", queue_one=queue_one)
        except redis.RedisError as exc:
            events.store_error(task)
            clean_up_later(store, call.key, call.lock_id, call.nonce or "")
            raise LockStoreError.from_error(task.name, call.key, exc) from exc
    except LockStoreError as exc:
        failed(call, exc)
        return None
    if answer.holder is not None:
        return decide(call, store, answer.holder, lock_ttl_ms)
    if answer.replaced is not None:
        _dropped(call, answer.replaced)
    _cap_delay(call, answer)
    events.taken(task, call.key, call.lock_id, lock_ttl_ms)
    return store


def _dropped(call: Call, replaced: str) -> None:
    # The replaced call never runs (its marker says "revoked"): its result
    # says so at once, so that nobody waits on it for ever.
    task = call.task
    events.replaced(task, call.key, replaced, call.lock_id)
    backend = task.backend
    if looks_up_any_task(backend):
        try:
            backend.mark_as_revoked(replaced, reason=f"replaced by {call.lock_id}")
        except Exception as exc:  # the result backend is down: the replaced call stays PENDING
            events.replaced_not_stored(task, replaced, exc)


def _cap_delay(call: Call, answer: Replaced) -> None:
    # unique_max_wait: the run comes no later than the first replaced
    # call's time plus the cap (Redis time, as the script saw it).
    cap = call.unique.max_wait_ms
    if cap is None:
        return
    options = call.options
    countdown, eta = options.get("countdown"), options.get("eta")
    if not (countdown or eta):
        return
    left_ms = max(0, answer.since_ms + cap - answer.now_ms)
    if delay_ms(call.task._get_app().now(), countdown, eta) > left_ms:
        options.pop("eta", None)
        options["countdown"] = left_ms / 1000


def lock_store(call: Call) -> LockStore:
    """The lock store of the call's app; ``LockStoreError`` if its client cannot be built."""
    try:
        return app_state(call.task._get_app()).store
    except redis.RedisError as exc:  # a Redis Cluster client connects as it is built
        raise LockStoreError.from_error(call.task.name, call.key, exc) from exc


def failed(call: Call, error: LockStoreError) -> None:
    """A lock-store failure: raise it, or (``unique_on_store_error="enqueue"``) send the call unlocked."""
    if call.unique.on_store_error != "enqueue":
        raise error
    _fail_open(call, error)


def decide(
    call: Call, store: LockStore, holder: str | None, lock_ttl_ms: int
) -> LockStore | AsyncResult[Any] | None:
    """After the acquire: the lock store if the call holds (or takes over) the lock, else the refusal."""
    task = call.task
    task_id = call.lock_id
    # A throttle's holder stands for the whole TTL: no state to read.
    checks = app_state(task._get_app()).config.check_holder and call.unique.until != "expiry"
    if holder is not None and holder != task_id and checks:
        backend = task.backend
        if looks_up_any_task(backend) and not _eager_without_results(task._get_app()):
            claim = Claim(call.key, holder, task_id, lock_ttl_ms, call.unique.until, call.nonce,
                          call.replaceable)
            try:
                holder = take_over_if_finished(task, store, backend, claim)
            except redis.RedisError as exc:
                # The take-over may have been applied, for an id that goes
                # out unlocked or not at all: given back, owner-checked.
                clean_up_later(store, call.key, task_id, call.nonce or "")
                events.store_error(task)
                error = LockStoreError.from_error(task.name, call.key, exc)
                error.__cause__ = exc
                failed(call, error)
                return None
    if holder is None:
        events.taken(task, call.key, task_id, lock_ttl_ms)
        return store
    return _refuse(call, holder)


def _take_slot(call: Call, lock_ttl_ms: int) -> LockStore | AsyncResult[Any] | None:
    # unique_limit=N: one of N slots (see celery_unique.limit), through
    # the lock-first path always, the transport's included.
    try:
        store = lock_store(call)
        answer = acquire_slot(call, store, lock_ttl_ms)
    except LockStoreError as exc:
        failed(call, exc)
        return None
    return decide_slots(call, store, answer, lock_ttl_ms)


def decide_slots(
    call: Call, store: LockStore, answer: Slots, lock_ttl_ms: int
) -> LockStore | AsyncResult[Any] | None:
    """:func:`decide` under ``unique_limit``: the holder check over every slot's holder, or the refusal."""
    task = call.task
    if answer.key is not None:
        hold_slot(call, answer.key)
        events.taken(task, call.key, call.lock_id, lock_ttl_ms)
        return store
    slot, holder = answer.holders[0]
    checks = app_state(task._get_app()).config.check_holder and call.unique.until != "expiry"
    if holder != call.lock_id and checks:
        backend = task.backend
        if looks_up_any_task(backend) and not _eager_without_results(task._get_app()):
            slots = [key for key, _ in answer.holders]
            claims = [
                Claim(key, held_by, call.lock_id, lock_ttl_ms, call.unique.until, call.nonce,
                      others=tuple(other for other in slots if other != key) if call.chosen else ())
                for key, held_by in answer.holders
            ]
            try:
                taken = take_over_any_finished(task, store, backend, claims)
            except redis.RedisError as exc:
                for key in slots:  # as in decide(): any of them may have been taken over
                    clean_up_later(store, key, call.lock_id, call.nonce or "")
                events.store_error(task)
                error = LockStoreError.from_error(task.name, call.key, exc)
                error.__cause__ = exc
                failed(call, error)
                return None
            if taken is not None:
                hold_slot(call, taken.key)
                events.taken(task, call.key, call.lock_id, lock_ttl_ms)
                return store
    hold_slot(call, slot)
    return _refuse(call, holder)


def lock_here(call: Call, ttl: Any, requested: Mapping[str, Any]) -> LockStore | AsyncResult[Any] | None:
    """:func:`lock` for a call ``apply()`` runs here and now: a refusal is awaited here."""
    token = _running_here.set(True)
    try:
        return lock(call, ttl, requested)
    finally:
        _running_here.reset(token)


def publish(call: Call, store: LockStore) -> AsyncResult[Any]:
    """Publish a locked call (under ``task_always_eager``, run it); give the lock back if that fails."""
    if call.task._get_app().conf.task_always_eager:
        return _run_eagerly(call, store)
    try:
        return call.task._publish(call)
    except BaseException:
        # No lock without a published task: whatever stopped the publish
        # (broker down, serializer error, Ctrl-C), give the lock back.
        _give_back(call, store)
        raise


def _run_eagerly(call: Call, store: LockStore) -> AsyncResult[Any]:
    # task_always_eager: the task runs inside this call, and its run ends
    # as a worker's would (a final failure keeps the lock under "success",
    # even when task_eager_propagates raises it here). Only an error
    # before the run began is a failed "publish".
    eager = [call.task_id, False]
    token = eager_calls.set(eager)
    try:
        return call.task._publish(call)
    except BaseException:
        if not eager[1]:
            _give_back(call, store)
        raise
    finally:
        eager_calls.reset(token)


def _enqueue_atomically(call: Call, lock_ttl_ms: int, lock_db: int) -> tuple[str | None, AsyncResult[Any]]:
    # Publish with a ticket for the transport, and hear what its script did:
    # (None, the published result) if the message is queued under the lock,
    # else (the holder, the result Celery made for nothing, now forgotten).
    options = call.options
    headers = options["headers"]
    options["headers"] = {
        **headers, TICKET_HEADER: [call.key, call.lock_id, lock_ttl_ms, call.nonce or "", lock_db],
    }
    asking = atomic.Waiting(call.lock_id)
    token = atomic.waiting.set(asking)
    try:
        result = call.task._publish(call)
    finally:
        atomic.waiting.reset(token)
        options["headers"] = headers
    if not asking.answered:  # pragma: no cover - only a transport that lost the ticket
        raise RuntimeError(f"celery_unique: the broker transport did not answer for {call.lock_id}")
    if asking.holder is not None:
        atomic.forget_refused(call.task, result, asking.holder)
    return asking.holder, result


def _give_back(call: Call, store: LockStore) -> None:
    release_quietly(store, call.key, call.lock_id, call.nonce or "")


def _acquire(call: Call, store: LockStore, lock_ttl_ms: int) -> str | None:
    task_id = call.lock_id
    try:
        return store.acquire(call.key, task_id, lock_ttl_ms, call.nonce)
    except AcquireError as failure:
        events.store_error(call.task)
        exc = failure.error
        if failure.maybe_applied:
            # A timed-out SET may still be applied once the server catches
            # up; this id is never published, so an owner-checked release
            # is always safe. It runs in the background: against a stalled
            # server it would wait out a second timeout first.
            clean_up_later(store, call.key, task_id, call.nonce or "")
        raise LockStoreError.from_error(call.task.name, call.key, exc) from exc
    except BaseException:
        # Interrupted between the script and its reply (Ctrl-C, a worker's
        # time limit): the lock may be taken, for an id never published.
        release_quietly(store, call.key, task_id, call.nonce or "")
        raise


def _fail_open(call: Call, error: LockStoreError) -> None:
    # The call goes out as a plain task: no lock header, so that no worker
    # ends a lock that does not exist; a header of its own says why. An
    # acquire that may still be applied was queued for a background release.
    headers = {k: v for k, v in call.options["headers"].items() if k not in OWN_HEADERS}
    headers[UNLOCKED_HEADER] = call.key
    call.options["headers"] = headers
    events.unlocked(call.task, call.key, error)


#: Policies under which a refused call nothing waits on gets the holder's result.
_RETURNS_HOLDER = ("existing", "join")


def _refuse(call: Call, holder: str) -> AsyncResult[Any]:
    task, key = call.task, call.key
    # A refused call someone may wait on: its id was chosen before the call
    # (a chain link, a group or chord member, a chord body, a frozen
    # signature), it carries callbacks that would otherwise be dropped, or
    # apply() runs it here and now.
    awaited = call.chosen or bool(call.link or call.link_error) or _running_here.get()
    refused_id = call.task_id if awaited else None
    events.refused(task, key, holder, call.args, call.kwargs)
    if (call.unique.on_duplicate == "join" and refused_id is not None and refused_id != holder
            and not _running_here.get() and not task._get_app().conf.task_always_eager and can_join(call)):
        # Its canvas goes on with the holder's result, under the refused id.
        return send_join(call, holder)
    if refused_id is not None and refused_id != holder:
        # Record the refused call as failed, as Celery records a failed
        # task, so later chain steps, the chord and the errbacks hear of
        # it now instead of waiting for ever.
        record_refusal(call, DuplicateTaskError(task.name, holder, key))
    if in_hand_over(task._get_app()):
        # A worker sending the next step of a canvas after a step ran: the
        # refused step's own result says why, and the step that ran keeps
        # its result. Raising here would make Celery store that step as
        # failed, and send a chord down its failure path.
        return task.AsyncResult(refused_id or holder)
    # Beat would log a duplicate as a scheduling ERROR with a traceback on
    # every tick; for a scheduler a duplicate is expected, so it is only logged.
    if call.unique.on_duplicate in _RETURNS_HOLDER or call.from_schedule:
        if refused_id is not None and (_running_here.get() or task._get_app().conf.task_always_eager):
            # An eager canvas waits on each member's result here and now:
            # the refused member's is its failure, never the holder's
            # result, which a worker may take hours to produce.
            return EagerResult(refused_id, DuplicateTaskError(task.name, holder, key), states.FAILURE)
        return task.AsyncResult(holder)
    # Raised as it is made: an exception held in a local of this frame
    # would, through its traceback, form a cycle kept until a full GC.
    raise DuplicateTaskError(task.name, holder, key)


def _eager_without_results(app: Any) -> bool:
    # Eager runs store no result unless task_store_eager_result is set.
    conf = app.conf
    return bool(conf.task_always_eager and not conf.task_store_eager_result)
