"""Is a lock's holder finished? Its stored state and its running marker say.

A lock outlives its task when the release never happened: the task ran on a
worker that does not import celery_unique, the lock store blinked as it
ended, or anything else went wrong. Such a holder is *finished for its mode*
when the result backend says so:

==============  ==============================
unique_until    finished states
==============  ==============================
success         SUCCESS, REVOKED
finish, start   SUCCESS, REVOKED, FAILURE
==============  ==============================

The stored state alone is not enough: Celery stores REVOKED as soon as it
sends a terminate signal, even one the task survives (``SIGUSR1``), and a
caller-chosen task id may have stored a state in an earlier run. So the lock
goes only if, atomically, it still belongs to that holder and no copy of the
holder runs (see ``TAKE_OVER_SCRIPT`` in :mod:`celery_unique.lock`).
"""

from __future__ import annotations

from typing import Any

from celery import states

from .lock import LockStore

__all__ = ["FINISHED", "finished", "stored_state", "take_over_if_finished"]

#: unique_until -> the stored states of a holder that has finished.
FINISHED: dict[str, frozenset[str]] = {
    "success": frozenset({states.SUCCESS, states.REVOKED}),
    "finish": frozenset(states.READY_STATES),
    "start": frozenset(states.READY_STATES),
}


def stored_state(backend: Any, task_id: str) -> str | None:
    """Return the state the result backend holds for ``task_id``, or None if unknown."""
    try:
        meta = backend.get_task_meta(task_id, cache=False)
    except Exception:  # a backend that is down: the holder stands
        return None
    state = meta.get("status") if isinstance(meta, dict) else None
    return str(state) if state else None


def finished(state: str | None, until: str) -> bool:
    """Whether a holder whose stored state is ``state`` has finished under ``until``."""
    return state is not None and state in FINISHED.get(until, FINISHED["success"])


def take_over_if_finished(
    store: LockStore,
    backend: Any,
    key: str,
    holder: str,
    task_id: str,
    ttl_ms: int,
    until: str,
    marker: str | None = None,
) -> str | None:
    """Give ``holder``'s lock to ``task_id`` if the holder has finished; None if given.

    Returns the holder's id while it stands. An empty ``task_id`` releases
    the lock instead (the reaper's use).
    """
    state = stored_state(backend, holder)
    if not finished(state, until):
        return holder
    revoked = state == states.REVOKED
    return store.take_over(
        key, holder, task_id, ttl_ms, result_may_be_stale=not revoked, marker=marker, revoked=revoked
    )
