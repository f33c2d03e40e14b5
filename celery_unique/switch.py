"""The switch that turns locking off: ``unique_enabled = False``, for tests and emergencies.

With the switch off, every unique call is made as with ``unique=None``: it
publishes (or runs) as plain Celery would, with no Redis call and no refusal,
and its message carries no lock header, so the worker does nothing either.
The call's options are still checked, as with the switch on, so that a bad
``unique`` or ``unique_until`` fails in the tests that run without locks.

What decides, first to last: a testing helper's block
(:func:`celery_unique.testing.locking_disabled`), the ``CELERY_UNIQUE_ENABLED``
environment variable, the ``unique_enabled`` setting, the default (on).
"""

from __future__ import annotations

from typing import Any

from .config import app_state
from .enqueue import resolve_options
from .options import OPTION_NAMES

__all__ = ["unlock_if_disabled"]


def unlock_if_disabled(task: Any, options: dict[str, Any]) -> None:
    """With locking off for ``task``'s app, check the call's unique options, then set ``unique=None``."""
    state = app_state(task._get_app())
    if state.config.enabled:
        return
    requested = {name: options[name] for name in OPTION_NAMES if name in options}
    ttl = requested.get("unique", task.unique)
    if ttl is not None:
        # The checks of a locked call, which need no Redis: TTL, unique_on's
        # type, unique_until and on_duplicate as the call, the task and the
        # app's settings resolve them.
        resolve_options(task, ttl, requested, state.config)
    options["unique"] = None
