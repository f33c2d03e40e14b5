"""``UniqueLocks``: list, inspect and release the locks of an app."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from .config import app_state
from .keys import escape, parse_key

if TYPE_CHECKING:
    from celery import Celery

    from .task import UniqueTask

__all__ = ["LockInfo", "UniqueLocks"]

_GLOB = re.compile(r"([*?\[\]\\])")


class LockInfo(NamedTuple):
    """A held lock, as the admin sees it."""

    key: str
    task_name: str
    queue: str
    task_id: str
    #: Remaining life in seconds (``None`` if the key has no TTL).
    ttl: float | None


class UniqueLocks:
    """The locks of one Celery app: ``UniqueLocks(app).list()`` and friends.

    Listing uses SCAN, never KEYS, and reads task name and queue from the key
    itself, never from a payload (there is none in Redis).
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._state = app_state(app)

    def list(self, task_name: str | None = None, queue: str | None = None) -> list[LockInfo]:
        """Return the held locks, optionally of one task and/or one queue."""
        keys = list(self._keys(task_name, queue))
        if not keys:
            return []
        pipe = self._state.store.client.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
            pipe.pttl(key)
        replies = pipe.execute()
        locks = []
        for key, holder, pttl in zip(keys, replies[::2], replies[1::2], strict=True):
            if holder is None:  # released between SCAN and GET
                continue
            parts = parse_key(key)
            locks.append(
                LockInfo(
                    key=key,
                    task_name=parts.task_name,
                    queue=parts.queue,
                    task_id=holder.decode() if isinstance(holder, bytes) else str(holder),
                    ttl=None if pttl < 0 else pttl / 1000,
                )
            )
        return sorted(locks, key=lambda lock: (lock.task_name, lock.queue, lock.key))

    def release(self, key: str) -> bool:
        """Release the lock at ``key`` whoever holds it; return whether one was deleted."""
        store = self._state.store
        holder = store.holder(key)
        # Owner-checked even here: if the lock changed hands since it was read,
        # the new holder keeps it.
        return holder is not None and store.release(key, holder)

    def clear(self, task_name: str | None = None, queue: str | None = None) -> int:
        """Release every lock (of one task and/or queue); return how many were deleted."""
        return sum(self.release(lock.key) for lock in self.list(task_name, queue))

    def is_locked(
        self,
        task: UniqueTask,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        queue: str | None = None,
    ) -> str | None:
        """Return the id of the task holding the lock of this call, or None."""
        options = {"queue": queue} if queue else {}
        return self._state.store.holder(task.lock_key(args, kwargs, options))

    def _keys(self, task_name: str | None, queue: str | None) -> Iterator[str]:
        prefix = _GLOB.sub(r"\\\1", self._state.config.key_prefix)
        pattern = f"{prefix}:{_part(queue)}:{_part(task_name)}:*"
        yield from self._state.store.scan(pattern)


def _part(name: str | None) -> str:
    # Escaped names hold no glob characters, so they match literally.
    return "*" if name is None else escape(name)
