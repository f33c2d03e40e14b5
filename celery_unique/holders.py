"""Is a lock's holder finished? Its stored state and its marker say.

A lock outlives its task when the release never happened: the task ran on a
worker that does not import celery_unique, or the lock store blinked as it
ended. Such a holder is *finished for its mode* when the result backend says
so:

==============  ==============================
unique_until    finished states
==============  ==============================
success         SUCCESS
finish, start   SUCCESS, FAILURE
expiry          none: a throttle's holder stands until its TTL
==============  ==============================

REVOKED is not among them: Celery stores it for a task that another worker
still runs (a revoke without terminate reaching a worker that does not run
it, or a terminate signal the task survives), and a revoked task that has
not run releases its lock when a worker discards it. The stored state alone
is not enough either: a caller-chosen task id, or a task that retried, may
have stored a state before its current attempt was queued. So the lock goes
only if, atomically, it still belongs to that holder, no copy of it runs and
no newer attempt of it is queued (see ``TAKE_OVER_SCRIPT`` in
:mod:`celery_unique.lock`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from celery import states
from celery.backends.base import BaseKeyValueStoreBackend, DisabledBackend

from . import events
from .lock import LockStore, marker_says_running

__all__ = [
    "FINISHED",
    "Claim",
    "finished",
    "looks_up_any_task",
    "stored_state",
    "stored_states",
    "take_over_any_finished",
    "take_over_if_finished",
]

# How long a refused call waits, in all, for a marked holder that stored its
# result to end its run: about half a second, doubling from 2 ms. An end
# normally follows its stored result within milliseconds; the tail covers a
# worker that a busy machine does not schedule for a while.
_ENDING_PAUSES = (0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.25)

#: unique_until -> the stored states of a holder that has finished.
FINISHED: dict[str, frozenset[str]] = {
    "success": frozenset({states.SUCCESS}),
    "finish": frozenset({states.SUCCESS, states.FAILURE}),
    "start": frozenset({states.SUCCESS, states.FAILURE}),
    # A throttle: the lock lives out its TTL whatever its holder did.
    "expiry": frozenset(),
}


def looks_up_any_task(backend: Any) -> bool:
    """Whether ``backend`` can read the state of a task this process did not send.

    Not ``rpc://``: it reads results from the caller's own reply queue (and
    would consume another caller's), nor a disabled backend.
    """
    return backend is not None and not type(backend).__name__.lower().startswith(("rpc", "disabled"))


def stored_state(backend: Any, task_id: str) -> str | None:
    """Return the state the result backend holds for ``task_id``, or None if unknown."""
    if not looks_up_any_task(backend):
        return None
    try:
        meta = backend.get_task_meta(task_id, cache=False)
    except Exception:  # a backend that is down: the holder stands
        return None
    state = meta.get("status") if isinstance(meta, dict) else None
    return str(state) if state else None


def stored_states(backend: Any, task_ids: Iterable[str]) -> dict[str, str]:
    """Return the state the result backend holds for each of ``task_ids`` whose state it can tell.

    A key-value backend (Redis, memcached, ...) reads them all in one
    ``mget``; any other backend one by one. An id with nothing stored is
    PENDING, as Celery reports it. With no result backend, or results that
    only the caller that sent a task can read (``rpc://``), no state is
    known: the answer is empty. Raises what the backend raises when it fails.
    """
    from celery.backends.rpc import RPCBackend  # not imported on the enqueue path

    ids = [task_id for task_id in dict.fromkeys(task_ids) if task_id]
    if not ids or isinstance(backend, (DisabledBackend, RPCBackend)):
        return {}
    if isinstance(backend, BaseKeyValueStoreBackend):
        keys = [backend.get_key_for_task(task_id) for task_id in ids]
        try:
            values = backend.mget(keys)
        except NotImplementedError:  # a key-value backend without mget
            pass
        else:
            if isinstance(values, Mapping):  # memcached answers by key
                values = [values.get(key) for key in keys]
            read = zip(ids, (_status(backend, value) for value in values), strict=True)
            return {task_id: state for task_id, state in read if state}
    found = {}
    for task_id in ids:
        state = backend.get_task_meta(task_id, cache=False).get("status")
        if state:
            found[task_id] = str(state)
    return found


def _status(backend: Any, payload: Any) -> str | None:
    """The state in a stored result: PENDING if none is stored, None if it cannot be read."""
    if not payload:
        return str(states.PENDING)
    try:
        # decode, not decode_result: the state is all that is needed, and
        # rebuilding a FAILURE's exception may fail in this process.
        meta = backend.decode(payload)
    except Exception:  # not a result this app can decode
        return None
    state = meta.get("status") if isinstance(meta, dict) else None
    return str(state) if state else None


def finished(state: str | None, until: str) -> bool:
    """Whether a holder whose stored state is ``state`` has finished under ``until``."""
    return state is not None and state in FINISHED.get(until, FINISHED["success"])


class Claim(NamedTuple):
    """A call's claim on a lock that ``holder`` holds: what a take-over needs."""

    key: str
    holder: str
    #: The claimant's id; empty for the reaper, which only releases.
    task_id: str
    ttl_ms: int
    #: The holder's ``unique_until``: what counts as finished.
    until: str
    nonce: str | None = None
    #: The claimant is a debounce's call (on_duplicate="replace"): it stays replaceable.
    replaceable: bool = False
    #: Under ``unique_limit``: the key's other slots, where a caller-chosen
    #: claimant must not already hold one (one id, one slot).
    others: tuple[str, ...] = ()


def take_over_if_finished(task: Any, store: LockStore, backend: Any, claim: Claim) -> str | None:
    """Take ``claim``'s lock over if its holder has finished; None if taken, else the holder that stands.

    An empty ``claim.task_id`` deletes the lock instead (the reaper's use).
    ``task`` (or a task name) names the call for the log line and the
    ``lock_taken_over`` signal.
    """
    state = stored_state(backend, claim.holder)
    if not finished(state, claim.until):
        return claim.holder
    taken, answer = _take_over_first(task, store, [(claim, state)])
    return None if taken is not None else answer


def take_over_any_finished(
    task: Any, store: LockStore, backend: Any, claims: Sequence[Claim]
) -> Claim | None:
    """Take over the slot of the first finished holder among ``claims`` (``unique_limit``); return its claim.

    One claim per held slot, slot 1 first; their states are read at once
    (:func:`stored_states`). Each finished holder's slot is taken over as
    :func:`take_over_if_finished` takes a lock over, and holders that are
    ending share one wait. None while every holder stands.
    """
    try:
        found = stored_states(backend, [claim.holder for claim in claims])
    except Exception:  # a backend that is down: the holders stand
        return None
    candidates = [(claim, found.get(claim.holder)) for claim in claims]
    taken, _ = _take_over_first(task, store, [c for c in candidates if finished(c[1], c[0].until)])
    return taken


def _take_over_first(
    task: Any, store: LockStore, candidates: list[tuple[Claim, str | None]]
) -> tuple[Claim | None, str | None]:
    # Take over the first candidate (a claim whose holder's state says
    # finished) that TAKE_OVER gives: return it, or None and the first
    # candidate's last answer. A marked copy that stored its result is
    # ending: its end follows within moments. Its marker is waited on for
    # a bounded while, one wait shared by every such holder (only here,
    # where a finished state and a running marker meet), never taken over:
    # the state might be an earlier attempt's (a retry with throw=False).
    answers: dict[int, str | None] = {}

    def take(index: int) -> bool:
        claim, state = candidates[index]
        answers[index] = _take(store, claim)
        if answers[index] is None:
            events.taken_over(task, claim.key, claim.holder, claim.task_id, state)
        return answers[index] is None

    for index in range(len(candidates)):
        if take(index):
            return candidates[index][0], None
    ending = [i for i in range(len(candidates)) if answers[i] == candidates[i][0].holder]
    for pause in _ENDING_PAUSES:
        running = []
        for index in ending:
            claim = candidates[index][0]
            if marker_says_running(store.marker(claim.key, claim.holder)):
                running.append(index)
            elif take(index):  # its end came between the refusal and the read
                return claim, None
        if not running:
            break
        time.sleep(pause)
        for index in running:
            if take(index):
                return candidates[index][0], None
        ending = [i for i in running if answers[i] == candidates[i][0].holder]
    return None, answers.get(0)


def _take(store: LockStore, claim: Claim) -> str | None:
    return store.take_over(claim.key, claim.holder, claim.task_id, claim.ttl_ms, claim.nonce,
                           replaceable=claim.replaceable, others=claim.others)
