"""The ``unique`` option: a lock's time to live, checked before any Redis call."""

from __future__ import annotations

import math
import numbers
from datetime import datetime, timedelta
from typing import Any

from celery.utils.time import maybe_make_aware

from .errors import UniqueTypeError, UniqueValueError

__all__ = ["MAX_TTL_SECONDS", "MIN_TTL_SECONDS", "delay_ms", "max_wait_ms", "ttl_ms"]

#: Asynq refuses shorter locks ("Unique TTL cannot be less than 1s").
MIN_TTL_SECONDS = 1.0
#: About 68 years: longer is certainly a unit mistake, and Redis refuses
#: expiry times that overflow its clock.
MAX_TTL_SECONDS = float(2**31)


def max_wait_ms(task_name: str, value: Any) -> int | None:
    """Return ``unique_max_wait`` (seconds or a timedelta, at least 0) in whole ms; None stays None."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise UniqueTypeError(
            f"{task_name}: unique_max_wait must be a number of seconds or a datetime.timedelta, "
            f"not {type(value).__name__} {value!r}"
        )
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_TTL_SECONDS:
        raise UniqueValueError(
            f"{task_name}: unique_max_wait must be at least 0 and at most {MAX_TTL_SECONDS:g} seconds, "
            f"not {value!r}"
        )
    return math.ceil(seconds * 1000)


def ttl_ms(task_name: str, value: Any) -> int:
    """Return ``value`` (seconds or a timedelta) in whole milliseconds.

    Raises ``TypeError`` for anything but a real number or a timedelta (bools
    included) and ``ValueError`` for NaN, infinities and values under 1 second
    or over :data:`MAX_TTL_SECONDS`. The message names the task and the value.
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
    else:
        raise UniqueTypeError(
            f"{task_name}: unique must be a number of seconds or a datetime.timedelta, "
            f"not {type(value).__name__} {value!r}"
        )
    if not math.isfinite(seconds) or not MIN_TTL_SECONDS <= seconds <= MAX_TTL_SECONDS:
        raise UniqueValueError(
            f"{task_name}: unique must be at least {MIN_TTL_SECONDS:g} second and at most "
            f"{MAX_TTL_SECONDS:g} seconds, not {value!r}"
        )
    return math.ceil(seconds * 1000)


def delay_ms(now: datetime, countdown: Any, eta: Any) -> int:
    """Return how long, in milliseconds, until a task with this countdown or eta runs.

    As Asynq does for ProcessIn/ProcessAt, the lock lasts until the task's
    processing time plus its TTL. ``countdown`` wins over ``eta``, as in Celery.
    A naive ``eta`` is read in the timezone of ``now`` (the app's).
    """
    if countdown:
        seconds = float(countdown)
    elif eta:
        when = datetime.fromisoformat(eta) if isinstance(eta, str) else eta
        if not isinstance(when, datetime):
            return 0
        when = maybe_make_aware(when, now.tzinfo)
        seconds = (when - now).total_seconds()
    else:
        return 0
    return max(0, math.ceil(seconds * 1000))
