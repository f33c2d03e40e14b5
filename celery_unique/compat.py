"""Where supported versions of redis-py and Celery differ, in one place."""

from __future__ import annotations

from typing import Any

import redis

__all__ = ["get_connection"]


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


# redis-py before 5.3 requires a command name; later versions deprecate it.
_POOL_WANTS_COMMAND_NAME = _version(redis.__version__) < (5, 3)


def get_connection(pool: Any) -> Any:
    """Check out a connected connection from a redis-py connection pool."""
    if _POOL_WANTS_COMMAND_NAME:
        return pool.get_connection("EVALSHA")
    return pool.get_connection()
