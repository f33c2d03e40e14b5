"""Which terminate signals a task cannot survive: those release its lock with the revoke."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from celery_unique.signals import _is_fatal


@pytest.mark.parametrize(("signum", "fatal"), [
    (signal.SIGTERM, True),
    (signal.SIGKILL, True),
    (int(signal.SIGTERM), True),
    ("SIGTERM", True),
    ("TERM", True),
    ("9", True),
    # billiard reports a job it terminated itself as Terminated(-signum), and
    # Celery announces the revoke with str() of that exception.
    ("-15", True),
    ("-9", True),
    (signal.SIGUSR1, False),
    ("SIGUSR1", False),
    ("USR1", False),
    ("10", False),
    ("-10", False),
    ("SIGNOTHING", True),
    (None, True),
    ("", True),
])
def test_fatal_signals(signum: Any, fatal: bool) -> None:
    """SIGTERM and SIGKILL in any spelling are fatal, SIGUSR1 is not, and anything unknown is a kill."""
    assert _is_fatal(signum) is fatal
