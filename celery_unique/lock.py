"""The lock store: uniqueness locks in Redis, owned by task ids, and running markers.

A lock is one Redis string: the key says which call it guards (see
:mod:`celery_unique.keys`), the value is the id of the task that holds it, and
the TTL bounds its life.

While a task runs, its worker keeps a *running marker* beside the lock: a key
of its own per task id, ``{<lock key>}:run:<task id>``, in the lock's hash
slot (so a script may touch both on a Redis Cluster). Its value says which
attempt of the task runs and where:

* ``run|<replace nesting>|<retries>|<host>/<pid>`` while a copy runs; its TTL is
  short and a heartbeat renews it, so a worker that dies stops renewing it;
* ``done|<replace nesting>|<retries>`` for a while after that attempt ended;
* ``queued`` after a caller-chosen task id took the lock, until it starts:
  such an id may have run before, so its stored state is not yet its own.

With the marker a second copy of one task id (a message redelivered while
the first still runs) waits instead of running beside it, a copy of an
attempt that already ended is dropped, and the duplicate check can tell a
finished holder from one still running. Every lock operation touches one
slot, so each is valid on a Redis Cluster.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import Any

import redis
from redis.exceptions import NoScriptError
from redis.sentinel import SentinelConnectionPool

__all__ = ["AcquireError", "LockStore", "attempt_of", "marker_says_running", "running_marker_key"]


class AcquireError(Exception):
    """Taking a lock failed with ``error``, a Redis error.

    ``maybe_applied`` is False only when the command certainly never reached
    a server (the connection was refused, the name did not resolve): then no
    lock can exist, and nothing needs cleaning up.
    """

    def __init__(self, error: redis.RedisError, maybe_applied: bool) -> None:
        super().__init__(error, maybe_applied)
        self.error = error
        self.maybe_applied = maybe_applied


def running_marker_key(lock_key: str, task_id: str) -> str:
    """Return the key of the running marker of ``task_id`` under ``lock_key``.

    The lock key inside braces is the marker's Redis Cluster hash tag, so
    marker and lock share a slot. A lock key that already carries a hash tag
    (from a ``unique_key_prefix`` such as ``"{locks}"``) lends it as is.
    """
    if "}" in lock_key:
        return f"{lock_key}:run:{task_id}"
    return f"{{{lock_key}}}:run:{task_id}"


class LockStore:
    """Takes, releases and inspects locks in one Redis (one connection pool)."""

    # Take the lock, or say who has it, in one round trip.
    #
    # KEYS[1] - lock key
    # KEYS[2] - (optional) running marker of ARGV[1], set to "queued" when the
    #           lock is taken: the id was chosen by the caller, and a state it
    #           stored in an earlier run must not pass for this one's
    # ARGV[1] - task id that wants the lock
    # ARGV[2] - time to live in milliseconds
    # return nil if ARGV[1] now holds the lock, otherwise the holder's task id
    #        (ARGV[1] itself when the same task id is enqueued twice)
    ACQUIRE_SCRIPT = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    if KEYS[2] then
        redis.call('SET', KEYS[2], 'queued', 'PX', ARGV[2])
    end
    return false
end
return redis.call('GET', KEYS[1])
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

    # Decide whether this copy of a task may run, and if so mark it running.
    # Attempts are ordered by (replace nesting, retries): a replacement or a
    # retry is newer than the attempt that made it.
    #
    # KEYS[1] - running marker of the task id
    # KEYS[2] - lock key
    # ARGV[1] - this copy's attempt, "<replace nesting>|<retries>"
    # ARGV[2] - this copy's owner, "<host>/<pid>"
    # ARGV[3] - marker TTL in milliseconds
    # ARGV[4] - the task id, to release the lock as the task starts
    #           (unique_until="start"), or "" to keep it
    # return "run" if this copy now holds the marker and may run; "wait" if
    #        another copy of this attempt runs; "skip" if this attempt has
    #        ended or a newer one exists. An older attempt still marked
    #        running has handed over to this one (it published this retry or
    #        replacement, and is only finishing): this copy takes the marker.
    BEGIN_SCRIPT = """
local r, k = string.match(ARGV[1], '^(%d+)|(%d+)$')
r, k = tonumber(r), tonumber(k)
local marker = redis.call('GET', KEYS[1])
if marker == 'revoked' then
    return 'revoked'
end
if marker then
    local state, mr, mk = string.match(marker, '^(%a+)|(%d+)|(%d+)')
    if state then
        mr, mk = tonumber(mr), tonumber(mk)
        local newer = mr > r or (mr == r and mk > k)
        if newer then
            return 'skip'
        end
        if mr == r and mk == k then
            if state == 'run' then
                return 'wait'
            end
            return 'skip'
        end
    end
end
redis.call('SET', KEYS[1], 'run|' .. ARGV[1] .. '|' .. ARGV[2], 'PX', ARGV[3])
if ARGV[4] ~= '' and redis.call('GET', KEYS[2]) == ARGV[4] then
    redis.call('DEL', KEYS[2])
end
return 'run'
"""

    # End this copy's run: leave its marker as said, then release the lock if
    # asked and no other copy of the task id runs.
    #
    # KEYS[1] - running marker of the task id
    # KEYS[2] - lock key
    # ARGV[1] - the marker value this copy set
    # ARGV[2] - what to leave: "done|<attempt>" to keep copies of this attempt
    #           from running again, or "" to delete it (the message is requeued)
    # ARGV[3] - TTL of a "done" marker in milliseconds
    # ARGV[4] - the task id, to release its lock, or "" to keep the lock
    # return 1 if the lock was released, otherwise 0
    END_SCRIPT = """
local marker = redis.call('GET', KEYS[1])
if marker == ARGV[1] then
    if ARGV[2] == '' then
        redis.call('DEL', KEYS[1])
    else
        redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
    end
elseif marker and string.sub(marker, 1, 4) == 'run|' then
    return 0
end
if ARGV[4] ~= '' and redis.call('GET', KEYS[2]) == ARGV[4] then
    return redis.call('DEL', KEYS[2])
end
return 0
"""

    # Renew a running marker, only if this copy still holds it, and put it
    # back if it vanished (a restarted or flushed Redis, a pause longer than
    # its TTL) while no other copy took it.
    #
    # KEYS[1] - running marker
    # ARGV[1] - the marker value this copy set
    # ARGV[2] - marker TTL in milliseconds
    # return 1 if renewed or put back, otherwise 0
    HEARTBEAT_SCRIPT = """
local marker = redis.call('GET', KEYS[1])
if marker == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if not marker then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
end
return 0
"""

    # Give a finished holder's lock to a new task id, or delete it. The caller
    # has read the holder's stored state and judged it finished; this checks,
    # atomically, that the lock still belongs to that holder and that no copy
    # of it runs (a task revoked with a signal it survives has a stored state
    # of REVOKED but still runs).
    #
    # KEYS[1] - lock key
    # KEYS[2] - running marker of the holder
    # KEYS[3] - (optional) running marker of ARGV[2], set to "queued"
    # ARGV[1] - the holder's task id
    # ARGV[2] - the new holder's task id, or "" to delete the lock
    # ARGV[3] - time to live in milliseconds of the new holder's lock
    # ARGV[4] - "1" if the stored state may be stale when the holder has not
    #           started ("queued" marker): a revoke is never stale, a result is
    # ARGV[5] - "1" if the holder was revoked before it ran: its marker
    #           becomes "revoked", so that no copy of it runs later
    # return nil if the lock was taken over (or deleted), otherwise the
    #        holder's task id
    TAKE_OVER_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
    return holder
end
if holder then
    local marker = redis.call('GET', KEYS[2])
    if marker and (string.sub(marker, 1, 4) == 'run|' or (marker == 'queued' and ARGV[4] == '1')) then
        return holder
    end
end
if holder and ARGV[5] == '1' then
    -- Revoked before it ran: a copy that comes back (a worker restarted
    -- without its revokes) is dropped for as long as the lock would have lived.
    local left = redis.call('PTTL', KEYS[1])
    redis.call('SET', KEYS[2], 'revoked', 'PX', math.max(left, 1000))
end
if ARGV[2] == '' then
    redis.call('DEL', KEYS[1])
    return false
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if KEYS[3] then
    redis.call('SET', KEYS[3], 'queued', 'PX', ARGV[3])
end
return false
"""

    def __init__(self, client: redis.Redis | redis.RedisCluster) -> None:
        self.client = client
        # Registered once; each reloads itself on NOSCRIPT, so a SCRIPT FLUSH
        # or a restarted server costs one extra round trip, no error.
        self._acquire = client.register_script(self.ACQUIRE_SCRIPT)
        self._release = client.register_script(self.RELEASE_SCRIPT)
        self._begin = client.register_script(self.BEGIN_SCRIPT)
        self._end = client.register_script(self.END_SCRIPT)
        self._heartbeat = client.register_script(self.HEARTBEAT_SCRIPT)
        self._take_over = client.register_script(self.TAKE_OVER_SCRIPT)
        # One server behind a plain pool: the acquire has connections of its
        # own. Sentinel and Cluster clients take redis-py's generic path.
        pool = getattr(client, "connection_pool", None)
        plain = pool is not None and not isinstance(pool, SentinelConnectionPool)
        self._own = _OwnConnections(pool) if plain else None
        self._acquire_heads = {keys: _head(self._acquire.sha, keys, 2) for keys in (1, 2)}

    def acquire(self, key: str, task_id: str, ttl_ms: int, marker: str | None = None) -> str | None:
        """Take the lock for ``task_id``; return None if taken, else the holder.

        ``marker``, the running marker key of ``task_id``, is set to "queued"
        with the lock: pass it when the caller chose the task id. Raises
        :class:`AcquireError` if Redis fails.
        """
        keys = (key,) if marker is None else (key, marker)
        if self._own is None:
            try:
                holder = self.client.execute_command(  # type: ignore[no-untyped-call]
                    "EVALSHA", self._acquire.sha, len(keys), *keys, task_id, ttl_ms
                )
            except NoScriptError:
                try:
                    holder = self._acquire(keys=keys, args=[task_id, ttl_ms])  # loads, then retries
                except redis.RedisError as exc:
                    raise AcquireError(exc, maybe_applied=True) from exc
            except redis.RedisError as exc:
                raise AcquireError(exc, maybe_applied=True) from exc
            return _text(holder)
        parts = (*(k.encode() for k in keys), task_id.encode(), b"%d" % ttl_ms)
        command = [_packed(self._acquire_heads[len(keys)], parts)]
        reply, resent = _evalsha_on_own_connection(self._own, self._acquire, command)
        holder = _text(reply)
        # Sent again after the connection dropped: if the id holds the lock,
        # the first attempt was applied, and this call holds it.
        return None if resent and holder == task_id else holder

    def release(self, key: str, task_id: str) -> bool:
        """Delete the lock if ``task_id`` holds it; return whether it did."""
        return bool(self._release(keys=[key], args=[task_id]))

    def begin(
        self, key: str, marker: str, attempt: str, owner: str, ttl_ms: int, release_id: str = ""
    ) -> str:
        """Mark a copy of a task running; return "run", "wait" or "skip" (see BEGIN_SCRIPT)."""
        return _text(self._begin(keys=[marker, key], args=[attempt, owner, ttl_ms, release_id])) or ""

    def end(
        self, key: str, marker: str, running: str, leave: str, done_ttl_ms: int, release_id: str = ""
    ) -> bool:
        """End a copy's run (see END_SCRIPT); return whether the lock was released."""
        return bool(self._end(keys=[marker, key], args=[running, leave, done_ttl_ms, release_id]))

    def heartbeat(self, markers: Iterable[tuple[str, str]], ttl_ms: int) -> None:
        """Renew each ``(marker key, value)`` this process still holds, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for marker, value in markers:
            self._heartbeat(keys=[marker], args=[value, ttl_ms], client=pipe)
        pipe.execute()

    def take_over(
        self,
        key: str,
        holder: str,
        task_id: str,
        ttl_ms: int,
        *,
        result_may_be_stale: bool,
        marker: str | None = None,
        revoked: bool = False,
    ) -> str | None:
        """Give ``holder``'s lock to ``task_id`` if no copy of it runs; None if done, else the holder.

        An empty ``task_id`` deletes the lock instead. ``marker`` is the running
        marker of ``task_id``, set to "queued" as in :meth:`acquire`. With
        ``revoked``, the holder was revoked before it ran: no copy of it may
        run later (see TAKE_OVER_SCRIPT).
        """
        keys = [key, running_marker_key(key, holder)]
        if marker is not None:
            keys.append(marker)
        args: list[str | int] = [
            holder, task_id, ttl_ms, "1" if result_may_be_stale else "0", "1" if revoked else "0"
        ]
        return _text(self._take_over(keys=keys, args=args))

    def release_unless_running(self, key: str, task_id: str, *, revoked: bool = False) -> None:
        """Delete the lock if ``task_id`` holds it and no copy of it runs (its running marker says so).

        ``revoked``: as for :meth:`take_over`.
        """
        self.take_over(key, task_id, "", 0, result_may_be_stale=False, revoked=revoked)

    def holder(self, key: str) -> str | None:
        """Return the id of the task holding the lock, or None."""
        return _text(self.client.get(key))

    def marker(self, key: str, task_id: str) -> str | None:
        """Return the running marker of ``task_id`` under ``key``, or None."""
        return _text(self.client.get(running_marker_key(key, task_id)))

    def ttl_ms(self, key: str) -> int | None:
        """Return the lock's remaining life in milliseconds, or None if it is gone."""
        ttl = int(self.client.pttl(key))
        return None if ttl == -2 else ttl


class _OwnConnections:
    """The acquire's own connection, one per thread (and per process after a fork).

    The enqueue path's one round trip writes a pre-packed ``EVALSHA`` and
    reads the reply on a connection nothing else uses, so it needs neither
    the pool's checkout (which polls the socket) nor its bookkeeping, and it
    knows whether a failed command could have reached the server. The
    connection is built from the pool's own class and settings (TLS, unix
    socket, ACL user, database, timeouts), but lives outside the pool's
    ``max_connections``: each thread that enqueues holds one more. It closes
    with its thread.
    """

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._local = threading.local()

    def get(self) -> Any:
        local = self._local
        connection = getattr(local, "connection", None)
        if connection is None or local.pid != os.getpid():
            # A forked child never writes on its parent's socket.
            connection = self._pool.connection_class(**self._pool.connection_kwargs)
            local.connection, local.pid = connection, os.getpid()
        return connection


def _packed(head: bytes, parts: tuple[bytes, ...]) -> bytes:
    # RESP bulk strings after a pre-packed head: the command, its script's
    # sha and its key count never change.
    return head + b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)


def _head(sha: str, keys: int, args: int) -> bytes:
    return b"*%d\r\n$7\r\nEVALSHA\r\n$%d\r\n%s\r\n$%d\r\n%d\r\n" % (
        3 + keys + args, len(sha), sha.encode(), len(str(keys)), keys
    )


def _evalsha_on_own_connection(
    connections: _OwnConnections, script: Any, command: list[bytes]
) -> tuple[Any, bool]:
    # A connection dropped after the command was sent (a restarted server, a
    # socket closed by a proxy or by the server's idle timeout) is retried
    # once on a fresh one; a timeout is not retried, and its socket is
    # closed so that a late reply is never read as another command's.
    connection = connections.get()
    for attempt in (1, 2):
        try:
            connection.connect()  # at once if connected
        except redis.RedisError as exc:
            # Refused, unresolvable, timed out connecting or refused
            # authentication: nothing was sent on this attempt, and a first
            # attempt that was sent ended in a retry.
            connection.disconnect()
            raise AcquireError(exc, maybe_applied=attempt > 1) from exc
        try:
            try:
                connection.send_packed_command(command, check_health=False)
                return connection.read_response(), attempt > 1
            except NoScriptError:
                # A restarted server or a SCRIPT FLUSH: load it, run it again.
                connection.send_command("SCRIPT", "LOAD", script.script, check_health=False)
                connection.read_response()
                connection.send_packed_command(command, check_health=False)
                return connection.read_response(), attempt > 1
        except redis.ConnectionError as exc:
            connection.disconnect()
            if attempt == 1 and not isinstance(exc, redis.AuthenticationError):
                continue
            raise AcquireError(exc, maybe_applied=True) from exc
        except redis.ResponseError as exc:
            raise AcquireError(exc, maybe_applied=True) from exc
        except BaseException as exc:
            connection.disconnect()
            if isinstance(exc, redis.RedisError):
                raise AcquireError(exc, maybe_applied=True) from exc
            raise
    raise AcquireError(redis.ConnectionError("no attempt left"), maybe_applied=True)  # pragma: no cover


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def attempt_of(retries: Any, nesting: Any) -> str:
    """Return the attempt string of a request: ``"<replace nesting>|<retries>"``."""
    return f"{int(nesting or 0)}|{int(retries or 0)}"


def marker_says_running(marker: Any) -> bool:
    """Whether the running marker value ``marker`` (as stored, or None) says a copy of its task runs."""
    if isinstance(marker, bytes):
        return marker.startswith(b"run|")
    return isinstance(marker, str) and marker.startswith("run|")
