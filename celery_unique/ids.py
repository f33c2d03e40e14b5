"""Task ids made before the lock: the lock's value is the id, so it must exist first.

The ids are time-ordered UUIDs (version 7, RFC 9562): their first 48 bits are
the Unix time in milliseconds at which the call took its lock. The lock
stores nothing but the id, so this is how the lock admin tells a lock's age.
An id chosen by the caller, or one Celery made (a canvas member's, a random
version 4 UUID), has no time in it: its lock's age is unknown.
"""

from __future__ import annotations

import os
import re
import time
from datetime import datetime, timezone

__all__ = ["CLOCK_SKEW", "issued_at", "new_task_id"]

#: How far ahead of this host's clock an id's time may be and still be taken
#: for its issue time (in seconds): the host that made it may run a little ahead.
CLOCK_SKEW = 60.0

#: A hex digit -> the same digit with its two top bits set to RFC 9562's variant (10).
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}
#: A version 7 UUID in its ``8-4-4-4-12`` hex form, any case.
_UUID7 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", re.IGNORECASE)
_time_ns, _urandom = time.time_ns, os.urandom


def new_task_id() -> str:
    """Return a time-ordered (version 7) UUID in Celery's spelling: ``8-4-4-4-12`` lower-case hex.

    48 bits of Unix time in milliseconds, the version, 12 random bits, the
    variant and 62 more random bits. Built straight from the clock and 10
    random bytes instead of through a ``uuid.UUID``, as cheap as a version 4
    id made that way: this runs on every unique enqueue that names no task id.
    """
    digits = ((_time_ns() // 1_000_000).to_bytes(6, "big") + _urandom(10)).hex()
    # The 13th digit becomes the version and the 17th takes the variant bits.
    return (
        f"{digits[:8]}-{digits[8:12]}-7{digits[13:16]}-"
        f"{_VARIANT[digits[16]]}{digits[17:20]}-{digits[20:]}"
    )


def issued_at(task_id: str, now: float | None = None) -> datetime | None:
    """Return when the version 7 UUID ``task_id`` was made (UTC), or None if it tells no time.

    None for any other id (a caller's ``"report-42"``, Celery's random
    version 4 ids), and for a version 7 id whose time is more than
    :data:`CLOCK_SKEW` seconds after ``now`` (a Unix time; default: the
    clock now): that is no issue time.
    """
    if not isinstance(task_id, str) or len(task_id) != 36 or not _UUID7.fullmatch(task_id):
        return None
    seconds = int(task_id[:8] + task_id[9:13], 16) / 1000
    if seconds > (time.time() if now is None else now) + CLOCK_SKEW:
        return None
    return datetime.fromtimestamp(seconds, tz=timezone.utc)
