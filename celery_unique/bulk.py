"""``apply_many``: enqueue many unique calls with all their locks taken in one round trip.

Each signature is enqueued as its task's ``apply_async`` would enqueue it
(the same key, TTL, headers, policy and refusal), except that the locks of
the whole batch are taken by one script call (ACQUIRE_MANY_SCRIPT in
:mod:`celery_unique.lock`; one per hash slot on a Cluster) before any
message is published. Each call then gets its own outcome, in order:

================================  ==============================================
a call whose lock it took         its published ``AsyncResult`` (a publish that
                                  fails gives that call's lock back, and the
                                  error is its outcome)
a refused call                    a ``DuplicateTaskError`` instance, or the
                                  holder's ``AsyncResult`` under
                                  ``on_duplicate="existing"``
a lock store that fails           a ``LockStoreError`` instance; a call that
                                  fails open is published without its lock
a call of a plain task, with      published as ``apply_async`` publishes it
``unique=None`` or
``on_duplicate="replace"``
================================  ==============================================

Errors are returned, not raised, so that one refusal does not hide what
became of the others (as ``asyncio.gather(..., return_exceptions=True)``).
An interruption (``KeyboardInterrupt``, a time limit) propagates, after the
locks of the calls not published yet are given back.
A signature whose options are wrong (a misspelt or bad unique option)
raises before anything is locked or published.

``fan_out()`` does the same for the canvases sent inside a block: the
unique calls they make with their ids chosen (group and chord-header
members, a chain's first step) are deferred (:mod:`celery_unique.fanout`)
and go through ``apply_many`` at the block's end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from billiard.exceptions import TimeLimitExceeded
from celery.app.task import Context
from celery.backends.base import DisabledBackend
from celery.canvas import Signature
from celery.exceptions import SoftTimeLimitExceeded
from celery.result import AsyncResult

from . import enqueue, events
from .call import Call
from .cleanup import clean_up_later, release_quietly
from .errors import InvalidCallError, LockStoreError, UniqueTaskError
from .fanout import Batch, deferred
from .headers import drop_own_headers
from .lock import AcquireError
from .option_names import check_option_names
from .switch import unlock_if_disabled
from .task import UniqueTask

__all__ = ["apply_many", "fan_out"]

if TYPE_CHECKING:
    from typing import TypeAlias

    #: What one call of the batch became.
    Outcome: TypeAlias = "AsyncResult[Any] | Exception"

#: Exceptions that stop a batch, though they are Exceptions: a worker's time limits.
_INTERRUPTIONS = (SoftTimeLimitExceeded, TimeLimitExceeded)

# Options apply_async takes as parameters of its own, not as Celery options.
_PARAMETERS = ("task_id", "producer", "link", "link_error", "shadow")


def apply_many(signatures: Iterable[Signature[Any]]) -> list[Outcome]:
    """Enqueue each signature; take the locks of its unique calls in one round trip.

    Returns one outcome per signature, in order: its ``AsyncResult``, or the
    exception that stopped it (a ``DuplicateTaskError``, a
    ``LockStoreError``, a failed publish's error), returned, not raised. A
    signature with a misspelt or invalid unique option raises before
    anything is locked or published.
    """
    sigs = list(signatures)
    calls: list[tuple[Call, int] | None] = []
    for sig in sigs:
        calls.append(_prepared(sig))
    locked = [entry for entry in calls if entry is not None]
    try:
        holders = _acquire_all(locked)
    except BaseException:
        # Interrupted while the script ran (Ctrl-C): any lock may be taken,
        # and no message is published; owner-checked releases are safe.
        for call, _ in locked:
            with contextlib.suppress(Exception):
                release_quietly(enqueue.lock_store(call), call.key, call.lock_id, call.nonce or "")
        raise
    outcomes: list[Outcome] = []
    try:
        for sig, entry in zip(sigs, calls, strict=True):
            if entry is None:
                outcomes.append(_plain(sig))
                continue
            outcomes.append(_settle(entry, holders.pop(id(entry[0]))))
    except BaseException:
        # Interrupted (Ctrl-C, a worker's time limit): the calls not settled
        # yet hold locks for messages that will never be published.
        for call, _ in locked:
            if holders.get(id(call), "") is None:
                with contextlib.suppress(Exception):
                    release_quietly(enqueue.lock_store(call), call.key, call.lock_id, call.nonce or "")
        raise
    return outcomes


@contextlib.contextmanager
def fan_out() -> Iterator[None]:
    """Within the block, the unique members of groups, chords and chains take their locks together.

    Each unique call made in the block with its task id already chosen (a
    group or chord-header member, a chain's first step, a frozen signature)
    is deferred; at the block's end all of them go through
    :func:`apply_many`: one script call for their locks, then each is
    published or refused as ``apply_async`` would. The first error among
    their outcomes (a ``DuplicateTaskError`` under ``on_duplicate="raise"``,
    a ``LockStoreError``, a failed publish) is then raised; every refused
    member's own result already says why. An exception inside the block
    sends none of the calls it deferred, and stores each one's result as
    REVOKED, so that nothing waits on it. A block inside another adds its
    calls to the outer one's (and drops them if it raises).
    """
    outer = deferred.get()
    if outer is not None and outer.open:
        start = len(outer.calls)
        try:
            yield
        except BaseException:
            dropped = outer.calls[start:]
            del outer.calls[start:]
            _revoke(dropped)
            raise
        return
    batch = Batch()
    token = deferred.set(batch)
    try:
        yield
    except BaseException:
        _revoke(batch.calls)
        raise
    finally:
        batch.open = False
        deferred.reset(token)
    try:
        outcomes = apply_many(batch.calls)
    except InvalidCallError:
        _revoke(batch.calls)  # a bad option: raised before any of them was locked or sent
        raise
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome


def _revoke(dropped: list[Signature[Any]]) -> None:
    # Calls a block dropped were never sent: their results say REVOKED, as
    # Celery stores a revoked task's, so that a chord counts them (and fails)
    # and a group's result is ready, instead of waiting for ever.
    for sig in dropped:
        task = sig.type
        with contextlib.suppress(Exception):  # a backend that is down must not hide the block's error
            if isinstance(task.backend, DisabledBackend):
                continue
            options = sig.options
            request = Context(
                id=options["task_id"], task=task.name, args=list(sig.args or ()),
                kwargs=dict(sig.kwargs or {}), chord=options.get("chord"), group=options.get("group_id"),
                group_index=options.get("group_index"), root_id=options.get("root_id"),
                parent_id=options.get("parent_id"), headers=options.get("headers"),
                reply_to=options.get("reply_to") or task._get_app().thread_oid,
                correlation_id=options["task_id"],
            )
            task.backend.mark_as_revoked(options["task_id"], "a fan_out() block raised", request=request)


def _prepared(sig: Signature[Any]) -> tuple[Call, int] | None:
    # The call as UniqueTask.apply_async builds it, its lock fields filled
    # in, with the lock's TTL; None for a call that takes no lock.
    task = sig.type
    if not isinstance(task, UniqueTask):
        return None
    options = dict(sig.options)
    parameters = {name: options.pop(name, None) for name in _PARAMETERS}
    check_option_names(task.name, options)
    unlock_if_disabled(task, options)
    requested = enqueue.take_unique_options(options)
    ttl = requested.get("unique", task.unique)
    if ttl is None:
        return None
    drop_own_headers(options)
    call = Call(
        task, sig.args, sig.kwargs, options, parameters["task_id"], parameters["link"],
        parameters["link_error"], parameters["producer"], parameters["shadow"],
        enqueue.from_schedule(task, options.get("headers")),
    )
    lock_ttl_ms = enqueue.prepare(call, ttl, requested)
    if call.unique.on_duplicate == "replace" or call.unique.limit > 1:
        # A debounce replaces its holder on its own, and a call under
        # unique_limit takes one of its slots: apply_async's path.
        return None
    return call, lock_ttl_ms


def _acquire_all(locked: list[tuple[Call, int]]) -> dict[int, str | LockStoreError | None]:
    # One ACQUIRE_MANY per lock store (an app's); each call's answer by id(call).
    by_store: dict[int, tuple[Any, list[tuple[Call, int]]]] = {}
    answers: dict[int, str | LockStoreError | None] = {}
    for entry in locked:
        try:
            store = enqueue.lock_store(entry[0])
        except LockStoreError as exc:
            answers[id(entry[0])] = exc
            continue
        by_store.setdefault(id(store), (store, []))[1].append(entry)
    for store, entries in by_store.values():
        claims = [(call.key, call.lock_id, ttl_ms, call.nonce) for call, ttl_ms in entries]
        holders = store.acquire_many(claims)
        for (call, _), holder in zip(entries, holders, strict=True):
            if isinstance(holder, AcquireError):
                # Its slot's script call failed (on a Cluster, the others'
                # stand): its lock may have been taken; it is not published,
                # so an owner-checked release is always safe.
                events.store_error(call.task)
                clean_up_later(store, call.key, call.lock_id, call.nonce or "")
                error = LockStoreError.from_error(call.task.name, call.key, holder.error)
                error.__cause__ = holder.error
                answers[id(call)] = error
                continue
            answers[id(call)] = holder
    return answers


def _settle(entry: tuple[Call, int], holder: str | LockStoreError | None) -> Outcome:
    call, ttl_ms = entry
    try:
        if isinstance(holder, LockStoreError):
            enqueue.failed(call, holder)
            published: AsyncResult[Any] = call.task._publish(call)  # failed open: sent without its lock
            return published
        store = enqueue.lock_store(call)
        locked = enqueue.decide(call, store, holder, ttl_ms)
        if locked is None:
            unlocked: AsyncResult[Any] = call.task._publish(call)
            return unlocked
        if isinstance(locked, AsyncResult):
            return locked
        return enqueue.publish(call, locked)
    except UniqueTaskError as exc:
        return exc
    except _INTERRUPTIONS:
        raise  # a worker's time limit stops the batch (apply_many gives back the rest)
    except Exception as exc:  # the publish failed; its lock was given back
        return exc


def _plain(sig: Signature[Any]) -> Outcome:
    try:
        result: AsyncResult[Any] = sig.apply_async()
    except _INTERRUPTIONS:
        raise
    except Exception as exc:
        return exc
    return result
