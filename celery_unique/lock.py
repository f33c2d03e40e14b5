"""The lock store: uniqueness locks in Redis, owned by task ids.

A lock is one Redis string: the key says which call it guards (see
:mod:`celery_unique.keys`), the value is the id of the task that holds it, and
the TTL bounds its life. Every operation touches exactly one key, so each one
is also valid on a Redis Cluster.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import redis
from redis.exceptions import NoScriptError

__all__ = ["LockStore"]


class LockStore:
    """Takes, releases and inspects locks in one Redis (one connection pool)."""

    # Take the lock, or say who has it, in one round trip.
    #
    # KEYS[1] - lock key
    # ARGV[1] - task id that wants the lock
    # ARGV[2] - time to live in milliseconds
    # return nil if ARGV[1] now holds the lock (just taken, or already held by
    #        the same task id, as when Task.retry() re-enqueues), otherwise the
    #        task id of the holder
    ACQUIRE_SCRIPT = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return false
end
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
    return false
end
return holder
"""

    # Delete the lock only if the task id still holds it, so a task whose lock
    # expired while it ran cannot delete a newer holder's lock.
    #
    # KEYS[1] - lock key
    # ARGV[1] - task id that should hold the lock
    # return 1 if the lock was released, otherwise 0
    RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

    def __init__(self, client: redis.Redis | redis.RedisCluster) -> None:
        self.client = client
        # Registered once; redis-py's Script reloads itself on NOSCRIPT, so a
        # SCRIPT FLUSH or a restarted server costs one extra round trip, no error.
        self._acquire = client.register_script(self.ACQUIRE_SCRIPT)
        self._release = client.register_script(self.RELEASE_SCRIPT)

    def acquire(self, key: str, task_id: str, ttl_ms: int) -> str | None:
        """Take the lock for ``task_id``; return None if it holds it, else the holder."""
        try:
            # EVALSHA straight away: the enqueue path's one round trip, without
            # the Script wrapper's per-call work (a tenth of a refused call).
            holder = self.client.execute_command(  # type: ignore[no-untyped-call]
                "EVALSHA", self._acquire.sha, 1, key, task_id, ttl_ms
            )
        except NoScriptError:
            holder = self._acquire(keys=[key], args=[task_id, ttl_ms])  # loads, then retries
        return _text(holder)

    def release(self, key: str, task_id: str) -> bool:
        """Delete the lock if ``task_id`` holds it; return whether it did."""
        return bool(self._release(keys=[key], args=[task_id]))

    def holder(self, key: str) -> str | None:
        """Return the id of the task holding the lock, or None."""
        return _text(self.client.get(key))

    def ttl_ms(self, key: str) -> int | None:
        """Return the lock's remaining life in milliseconds, or None if it is gone."""
        ttl = int(self.client.pttl(key))
        return None if ttl == -2 else ttl

    def scan(self, match: str, count: int = 1000) -> Iterator[str]:
        """Yield the keys matching the glob ``match`` (SCAN, never KEYS)."""
        for key in self.client.scan_iter(match=match, count=count, _type="string"):
            yield key.decode() if isinstance(key, bytes) else str(key)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
