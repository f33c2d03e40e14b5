"""Objects made once per process: a forked pool process makes its own."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["per_process"]

_T = TypeVar("_T")
_lock = threading.Lock()


def per_process(owner: Any, name: str, make: Callable[[Any], _T]) -> _T:
    """Return ``owner``'s object ``name`` of this process, made by ``make(owner)`` once.

    Kept on ``owner`` with the pid that made it: a forked pool process makes
    one of its own instead of trusting one (a thread, a socket) that did not
    survive the fork.
    """
    pid = os.getpid()
    made: tuple[int, _T] | None = owner.__dict__.get(f"_per_process_{name}")
    if made is None or made[0] != pid:
        with _lock:
            made = owner.__dict__.get(f"_per_process_{name}")
            if made is None or made[0] != pid:
                made = owner.__dict__[f"_per_process_{name}"] = (pid, make(owner))
    return made[1]
