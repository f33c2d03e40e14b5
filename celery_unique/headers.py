"""What a message carries for its lock: the package's own headers, read back on the worker.

==========================  ===============================================
header                      value
==========================  ===============================================
``celery_unique_lock``      the lock key (every locked message)
``celery_unique_until``     when to release, if not on success
``celery_unique_nonce``     the incarnation of a caller-chosen task id
``celery_unique_replaces``  on a replacement: the task id it continues
``celery_unique_nesting``   on a replacement: its replace nesting, which
                            Celery before 5.4 does not carry in a message
``celery_unique_held``      on a copy held back while another copy ran
``celery_unique_replaceable``  on a call a later one may replace
                            (``on_duplicate="replace"``): its runs are marked
``celery_unique_ticket``    the lock for the package's transport to take as
                            it queues the message; it takes it out first
==========================  ===============================================

A worker stamps ``celery_unique_received`` (when it received the message)
on the request it hands to its pool, so a run can tell whether the broker
may have delivered a copy of its message meanwhile.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from .options import UNTIL

__all__ = [
    "HELD_HEADER",
    "LOCK_HEADER",
    "NESTING_HEADER",
    "NONCE_HEADER",
    "OWN_HEADERS",
    "RECEIVED_KEY",
    "REPLACEABLE_HEADER",
    "REPLACES_HEADER",
    "TICKET_HEADER",
    "UNLOCKED_HEADER",
    "UNTIL_HEADER",
    "Carried",
    "carried_by",
    "drop_own_headers",
    "headers_of",
    "nesting_of",
]

#: The message header that carries a task's lock key to the worker.
LOCK_HEADER = "celery_unique_lock"
#: The message header that says when to release, if not on success.
UNTIL_HEADER = "celery_unique_until"
#: The incarnation of a caller-chosen task id (see :class:`celery_unique.lock.Attempt`).
NONCE_HEADER = "celery_unique_nonce"
#: Set on a replacement's message: the task id whose lock it continues.
REPLACES_HEADER = "celery_unique_replaces"
#: Set on a replacement's message: its replace nesting. Celery 5.4+ carries
#: ``replaced_task_nesting`` in the message; Celery 5.3 sets it on the
#: signature and drops it, so its replacement would run as nesting 0.
NESTING_HEADER = "celery_unique_nesting"
#: Set on a call that a later call may replace (``on_duplicate="replace"``):
#: its runs are marked, so that the lock store knows when one has begun.
REPLACEABLE_HEADER = "celery_unique_replaceable"
#: Set on a copy published again because another copy of its attempt ran.
HELD_HEADER = "celery_unique_held"
#: On a call that went out without its lock (the lock store failed, and the
#: call fails open): the key it would have taken.
UNLOCKED_HEADER = "celery_unique_unlocked"
#: The lock the package's transport takes as it queues the message (see
#: :mod:`celery_unique.atomic`): a :class:`celery_unique.lock.Ticket` as a list.
TICKET_HEADER = "celery_unique_ticket"
#: The worker's stamp: when it received the message (seconds since the epoch).
RECEIVED_KEY = "celery_unique_received"

#: The package's own headers: never taken from a caller's headers, which are
#: often forwarded from another task's request.
OWN_HEADERS = (
    LOCK_HEADER, UNTIL_HEADER, NONCE_HEADER, REPLACES_HEADER, NESTING_HEADER, HELD_HEADER, RECEIVED_KEY,
    UNLOCKED_HEADER, TICKET_HEADER, REPLACEABLE_HEADER,
)


class Carried(NamedTuple):
    """The lock a message carries, as its headers say."""

    key: str
    until: str
    nonce: str


def headers_of(request: Any) -> Mapping[str, Any] | None:
    """The custom headers of a request (Celery's ``Context``), if they are a mapping."""
    headers = getattr(request, "headers", None)
    return headers if isinstance(headers, Mapping) else None


def carried_by(headers: Mapping[str, Any] | None) -> Carried | None:
    """Return the lock that message headers carry, or None."""
    if not headers:
        return None
    key = headers.get(LOCK_HEADER)
    if not isinstance(key, str):
        return None
    until = headers.get(UNTIL_HEADER)
    nonce = headers.get(NONCE_HEADER)
    return Carried(key, until if until in UNTIL else "success", nonce if isinstance(nonce, str) else "")


def nesting_of(fields: Any) -> int:
    """The replace nesting of a message or request with ``fields`` (anything with ``.get``).

    The package's own header first (see :data:`NESTING_HEADER`), then
    Celery's ``replaced_task_nesting``.
    """
    nesting = fields.get(NESTING_HEADER)
    if nesting is None:
        nesting = fields.get("replaced_task_nesting")
    try:
        return int(nesting or 0)
    except (TypeError, ValueError):
        return 0


def drop_own_headers(options: dict[str, Any]) -> None:
    """Leave the package's own headers out of a call's ``headers`` option (a copy without them)."""
    headers = options.get("headers")
    if isinstance(headers, Mapping) and any(name in headers for name in OWN_HEADERS):
        options["headers"] = {k: v for k, v in headers.items() if k not in OWN_HEADERS}
