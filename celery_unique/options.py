"""The per-call options of a unique enqueue, resolved and checked.

Each option can be given per call (``apply_async(..., opt=...)`` or
``.set(opt=...)`` on a signature), as a task attribute
(``@app.task(base=UniqueTask, opt=...)``) or, for ``unique_until``,
``on_duplicate``, ``unique_on_store_error``, ``unique_max_wait``,
``unique_while_running`` and ``unique_limit``, as an app setting. Per
call wins over the task attribute, which wins over the app setting, which
wins over the built-in default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

from .errors import UniqueTypeError, UniqueValueError

__all__ = [
    "MAX_LIMIT", "ON_DUPLICATE", "ON_STORE_ERROR", "OPTION_NAMES", "UNSET", "UNTIL", "WHILE_RUNNING",
    "UniqueOptions",
    "check_choice", "check_limit", "check_unique_on",
]

Until = Literal["success", "finish", "start", "expiry"]
OnDuplicate = Literal["raise", "existing", "replace", "join"]
OnStoreError = Literal["raise", "enqueue"]
WhileRunning = Literal["refuse", "queue_one"]
#: Names of the parameters that make up the key (a lone string is one name):
#: the types check_unique_on takes, no other sequence or set.
UniqueOn = str | list[str] | tuple[str, ...] | set[str] | frozenset[str]

#: When a lock is released: on success (Asynq), on success or final failure,
#: as the task starts running, or never before its TTL (a throttle).
UNTIL: tuple[Until, ...] = ("success", "finish", "start", "expiry")
#: What a duplicate enqueue does: raise DuplicateTaskError, return the
#: holder's AsyncResult, or replace a holder that has not begun (a debounce).
ON_DUPLICATE: tuple[OnDuplicate, ...] = ("raise", "existing", "replace", "join")
#: What a call does when the lock store fails: raise LockStoreError, or
#: publish the task without a lock (fail-open).
ON_STORE_ERROR: tuple[OnStoreError, ...] = ("raise", "enqueue")
#: Under on_duplicate="replace", what a call does when the holder has begun:
#: refuse as "raise" does, or wait as the one call to run after it.
WHILE_RUNNING: tuple[WhileRunning, ...] = ("refuse", "queue_one")

#: Options a caller may pass to apply_async; they never reach kombu.
OPTION_NAMES = (
    "unique", "unique_on", "unique_until", "on_duplicate", "unique_on_store_error", "unique_max_wait",
    "unique_limit", "unique_while_running",
)

#: The largest ``unique_limit``: one script reads every slot of a key.
MAX_LIMIT = 1000

#: The default of an option left out, where ``None`` says something (``unique_on=None``: all arguments).
UNSET: Any = object()


class UniqueOptions(NamedTuple):
    """The resolved options of one unique enqueue."""

    ttl_ms: int
    unique_on: tuple[str, ...] | None
    until: Until
    on_duplicate: OnDuplicate
    on_store_error: OnStoreError = "raise"
    #: Under ``on_duplicate="replace"``: how long, in ms, the first replaced
    #: call may be postponed in all (``unique_max_wait``); None for no cap.
    max_wait_ms: int | None = None
    #: ``unique_limit``: how many calls with the key may be queued or running at once.
    limit: int = 1
    #: Under ``on_duplicate="replace"``: what a call does when the holder has
    #: begun (``unique_while_running``).
    while_running: WhileRunning = "refuse"


def check_choice(task_name: str, option: str, value: Any, choices: Sequence[str]) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError``."""
    if isinstance(value, str) and value in choices:
        return value
    raise UniqueValueError(
        f"{task_name}: {option} must be one of {', '.join(map(repr, choices))}, not {value!r}"
    )


def check_unique_on(task_name: str, value: Any) -> tuple[str, ...] | None:
    """Return ``unique_on`` as a tuple of names (a lone string is one name)."""
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
    raise UniqueTypeError(
        f"{task_name}: unique_on must be a sequence of parameter names, not {value!r}"
    )


def check_limit(task_name: str, value: Any) -> int:
    """Return ``unique_limit`` if it is a whole number from 1 to :data:`MAX_LIMIT`, else raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UniqueTypeError(
            f"{task_name}: unique_limit must be a whole number of calls, at least 1, not {value!r}"
        )
    if not 1 <= value <= MAX_LIMIT:
        raise UniqueValueError(
            f"{task_name}: unique_limit must be at least 1 and at most {MAX_LIMIT}, not {value!r}"
        )
    return value
