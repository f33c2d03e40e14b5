"""``UniqueLocks``: list, inspect and release the locks of an app.

The admin works in batches, so its cost grows with the number of batches, not
of locks: one SCAN (never KEYS) finds up to a batch of keys, one Lua call
reads their holders and TTLs, and to clear them one more compare-and-deletes
them. Task name and queue come from the key itself (there is no payload).
To describe the locks, a second call reads them again with their holders'
running markers, and one ``mget`` of the result backend their states.

On a Redis Cluster each primary is scanned in turn, and a batch's script runs
once per hash slot (a script may only touch one slot), in one pipeline. The
admin needs the whole cluster: when a primary does not answer it raises
``LockStoreError`` naming it, and ``clear`` makes sure every primary answers
before it releases anything.
"""

from __future__ import annotations

import builtins
import logging
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from operator import itemgetter
from typing import TYPE_CHECKING, Any, NamedTuple

import redis
from celery.backends.base import DisabledBackend
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from .config import app_state
from .errors import ConfigurationError, LockStoreError
from .holders import Claim, stored_states, take_over_if_finished
from .ids import issued_at
from .keys import escape, unescape
from .lock import marker_says_running, running_marker_key
from .purge import PurgeResult, purge_queues, queue_names

if TYPE_CHECKING:
    from datetime import datetime

    from celery import Celery
    from redis.commands.core import Script

    from .task import UniqueTask

__all__ = ["LockInfo", "LockStatus", "UniqueLocks"]

logger = logging.getLogger(__name__)

#: What redis-py raises when the store fails; a cluster client adds its own.
_STORE_ERRORS = (redis.RedisError, RedisClusterException)
_GLOB = re.compile(r"([*?\[\]\\])")
#: Attribute of the Celery app that holds the admin's registered scripts.
_SCRIPTS_ATTR = "_celery_unique_admin_scripts"
#: Held locks: key -> (holder as Redis stores it, remaining life in ms).
_Holders = dict[str, tuple[Any, int]]
#: The same read again with the holder's running marker: key -> (holder,
#: remaining life in ms, the marker as stored or None; None too if the lock
#: changed hands since the first read, for the marker read is the old holder's).
_Marked = dict[str, tuple[Any, int, Any]]
#: LockInfo's task name, queue and key, the order of list().
_BY_TASK_QUEUE_KEY = itemgetter(1, 2, 0)


class LockInfo(NamedTuple):
    """A held lock, as the admin sees it."""

    key: str
    task_name: str
    queue: str
    task_id: str
    #: Remaining life in seconds (``None`` if the key has no TTL).
    ttl: float | None


class LockStatus(NamedTuple):
    """A held lock and what its holder is doing: a :class:`LockInfo`'s fields, then four more.

    Each of the four is None when it is unknown.
    """

    key: str
    task_name: str
    queue: str
    task_id: str
    #: Remaining life in seconds (``None`` if the key has no TTL).
    ttl: float | None
    #: When the holder's id was made, i.e. when the lock was taken, for an id
    #: celery_unique made (see :func:`celery_unique.ids.issued_at`).
    issued_at: datetime | None = None
    #: Seconds since ``issued_at``, as the lock was read.
    age: float | None = None
    #: The holder's state in the result backend (PENDING, STARTED, SUCCESS, ...).
    state: str | None = None
    #: Whether the holder's running marker says a copy of it runs.
    running: bool | None = None


class UniqueLocks:
    """The locks of one Celery app: ``UniqueLocks(app).list()`` and friends.

    Every method raises ``LockStoreError`` when the lock store fails, and the
    constructor ``ConfigurationError`` when the app's ``unique_*`` settings
    are wrong.
    """

    #: SCAN's COUNT, and so about how many locks each round trip handles.
    BATCH = 2000

    # Read the holder and remaining life of a batch of locks and, if given
    # their keys, the running marker of each lock's holder as read before.
    #
    # KEYS[1..n]    - lock keys
    # KEYS[n+1..2n] - (optional) the running marker of ARGV[i] under KEYS[i]
    # ARGV[1..n]    - (with markers) the holder read before at KEYS[i]
    # return {holder 1, ttl 1, holder 2, ttl 2, ...}, TTLs in milliseconds;
    #        for a key that is gone or is not a string, nil and -2. With
    #        markers, {holder 1, ttl 1, marker 1, ...}: the marker's value
    #        while KEYS[i] is still held by ARGV[i], else nil
    READ_SCRIPT = """
local n = #KEYS - #ARGV
local width = #ARGV > 0 and 3 or 2
local result = {}
for i = 1, n do
    local key = KEYS[i]
    local holder = redis.pcall('GET', key)
    if type(holder) == 'table' then holder = false end
    local at = width * (i - 1)
    result[at + 1] = holder
    result[at + 2] = holder and redis.call('PTTL', key) or -2
    if width == 3 then
        local marker = false
        if holder == ARGV[i] then
            marker = redis.pcall('GET', KEYS[n + i])
            if type(marker) == 'table' then marker = false end
        end
        result[at + 3] = marker
    end
end
return result
"""

    # Release a batch of locks, each only if the task id read for it still
    # holds it: a lock that changed hands since it was read is left alone.
    #
    # KEYS[1..n] - lock keys
    # ARGV[1..n] - the task id read as the holder of each key
    # return how many locks were released
    RELEASE_SCRIPT = """
local released = 0
for i, key in ipairs(KEYS) do
    if redis.pcall('GET', key) == ARGV[i] then
        released = released + redis.call('DEL', key)
    end
end
return released
"""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._state = app_state(app)
        self._prefix = self._state.config.key_prefix
        self._redis: Any = None
        # Escaped (queue, task name) parts of keys seen, mapped to the names:
        # an app has few, and sharing the strings keeps a long list small.
        self._names_seen: dict[tuple[str, str], tuple[str, str]] = {}

    def iter_locks(self, task_name: str | None = None, queue: str | None = None) -> Iterator[LockInfo]:
        """Yield the held locks batch by batch, unsorted, in constant memory.

        As with SCAN, a lock may come twice if Redis resizes its keyspace meanwhile.
        """
        pattern = self._pattern(task_name, queue)
        with self._errors(task_name, pattern):
            client = self._client()
            scripts = self._scripts(client)
            for batch in self._scan(client, pattern):
                yield from self._locks(batch, self._holders(client, scripts, batch))

    def list(self, task_name: str | None = None, queue: str | None = None) -> builtins.list[LockInfo]:
        """Return the held locks, optionally of one task and/or one queue.

        They come sorted by task name, queue and key. For very many locks,
        :meth:`iter_locks` keeps only one batch in memory.
        """
        unique = {lock.key: lock for lock in self.iter_locks(task_name, queue)}
        return sorted(unique.values(), key=_BY_TASK_QUEUE_KEY)

    def describe(self, task_name: str | None = None, queue: str | None = None) -> builtins.list[LockStatus]:
        """Return the held locks as :meth:`list` does, each with its age and its holder's state.

        Age comes from the holder's id (see :func:`celery_unique.ids.issued_at`),
        the state from the app's result backend, in one read per batch where
        the backend allows it, and whether a copy of the holder runs from its
        running marker, read with the lock. With no result backend the states
        are unknown; a backend that fails leaves them unknown too, with one
        warning logged: only the lock store's errors raise.
        """
        pattern = self._pattern(task_name, queue)
        states = _States(self.app)
        unique: dict[str, LockStatus] = {}
        with self._errors(task_name, pattern):
            client = self._client()
            scripts = self._scripts(client)
            for batch in self._scan(client, pattern):
                holders = self._holders(client, scripts, batch)
                if holders:
                    marked = self._with_markers(client, scripts, holders)
                    for status in self._statuses(batch, holders, marked, states):
                        unique[status.key] = status
        return sorted(unique.values(), key=_BY_TASK_QUEUE_KEY)

    def count(self, task_name: str | None = None, queue: str | None = None) -> int:
        """Return how many locks there are (a SCAN only: no holder is read)."""
        pattern = self._pattern(task_name, queue)
        with self._errors(task_name, pattern):
            return sum(len(batch) for batch in self._scan(self._client(), pattern))

    def release(self, key: str) -> bool:
        """Release the lock at ``key`` whoever holds it; return whether one was deleted.

        Raises ``ValueError`` naming ``key`` if it is not a lock key of this app.
        """
        self._check_key(key)
        with self._errors(None, key):
            client = self._client()
            scripts = self._scripts(client)
            # Owner-checked even here: if the lock changes hands after it was
            # read, the new holder keeps it.
            return self._release(client, scripts, self._holders(client, scripts, [key])) == 1

    def clear(self, task_name: str | None = None, queue: str | None = None) -> int:
        """Release every lock (of one task and/or queue); return how many were deleted.

        Each lock is released only if it is still held by the task id read
        for it a moment before, in the same batch.
        """
        pattern = self._pattern(task_name, queue)
        released = 0
        try:
            client = self._client()
            scripts = self._scripts(client)
            if _is_cluster(client):
                for node in client.get_primaries():  # all there, or release nothing
                    client.ping(target_nodes=node)
            for batch in self._scan(client, pattern):
                released += self._release(client, scripts, self._holders(client, scripts, batch))
        except _STORE_ERRORS as exc:
            done = f" ({released} released before the error)" if released else ""
            raise self._error(exc, task_name, pattern, done) from exc
        return released

    def reap(self, task_name: str | None = None, queue: str | None = None) -> int:
        """Release the locks whose holders have finished; return how many were released.

        A holder has finished when the result backend says so for its task's
        ``unique_until`` (SUCCESS or REVOKED; FAILURE too under "finish" or
        "start") and no copy of it runs (see ``celery_unique.holders``):
        its release was missed, e.g. it ran on a worker that does not import
        celery_unique. Each release is atomic and owner-checked. Needs a
        result backend.
        """
        backend = self.app.backend
        if isinstance(backend, DisabledBackend):
            raise ConfigurationError(
                "reap needs a result backend to tell finished tasks from queued ones: set result_backend"
            )
        pattern = self._pattern(task_name, queue)
        store = self._state.store
        reaped = 0
        with self._errors(task_name, pattern):
            for lock in self.iter_locks(task_name, queue):
                until = self._until(lock.task_name)
                claim = Claim(lock.key, lock.task_id, "", 0, until)
                finished = take_over_if_finished(lock.task_name, store, backend, claim)
                if finished is None:
                    reaped += 1
        return reaped

    def purge(self, queues: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> PurgeResult:
        """Remove the queued messages, as ``celery purge`` does, and release exactly their locks.

        ``queues`` defaults to every task queue the app knows. Messages a worker
        has received (running, reserved, or waiting for an eta) are not in the
        queues, so their locks stay (see ``celery_unique.purge``).
        """
        names = queue_names(self.app, queues, exclude)
        with self._errors(None, ", ".join(names)):
            return purge_queues(self.app, self._state.store, names)

    def is_locked(
        self,
        task: UniqueTask,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        queue: str | None = None,
    ) -> str | None:
        """Return the id of the task holding the lock of this call, or None."""
        options = {"queue": queue} if queue else {}
        key = task.lock_key(args, kwargs, options)
        with self._errors(task.name, key):
            client = self._client()
            holders = self._holders(client, self._scripts(client), [key])
        return _text(holders[key][0]) if holders else None

    # -- keys ---------------------------------------------------------------

    def _until(self, task_name: str) -> str:
        """The ``unique_until`` a lock of ``task_name`` follows: the task's, else the app's."""
        task = self.app.tasks.get(task_name)
        return getattr(task, "unique_until", None) or self._state.config.until

    def _pattern(self, task_name: str | None, queue: str | None) -> str:
        prefix = _GLOB.sub(r"\\\1", self._prefix)
        return f"{prefix}:{_part(queue)}:{_part(task_name)}:*"

    def _names(self, key: str) -> tuple[str, str] | None:
        """Return the queue and task name of one of this app's lock keys, or None.

        A key is one only if :func:`~celery_unique.keys.format_key` could
        have made it with this app's prefix.
        """
        head = self._prefix + ":"
        if not key.startswith(head):
            return None
        parts = key[len(head):].split(":")
        if len(parts) != 3 or not parts[2]:
            return None
        escaped = (parts[0], parts[1])
        names = self._names_seen.get(escaped)
        if names is None:
            queue, task_name = unescape(parts[0]), unescape(parts[1])
            if not (queue and task_name) or (escape(queue), escape(task_name)) != escaped:
                return None
            names = self._names_seen[escaped] = (queue, task_name)
        return names

    def _check_key(self, key: str) -> None:
        if not isinstance(key, str):
            raise TypeError(f"a lock key is a string, not {type(key).__name__} {key!r}")
        if self._names(key) is None:
            raise ValueError(
                f"{key!r} is not a lock key of this app: expected "
                f"'{self._prefix}:<queue>:<task name>:<digest>'"
            )

    # -- the store ----------------------------------------------------------

    def _client(self) -> Any:
        if self._redis is None:
            self._redis = self._state.store.client
        return self._redis

    def _scripts(self, client: Any) -> tuple[Script, Script]:
        """The read and release scripts, registered once per app and client."""
        registered = self.app.__dict__.get(_SCRIPTS_ATTR)
        if registered is None or registered[0] is not client:
            registered = (
                client,
                client.register_script(self.READ_SCRIPT),
                client.register_script(self.RELEASE_SCRIPT),
            )
            setattr(self.app, _SCRIPTS_ATTR, registered)
        if _is_cluster(client):
            # A cluster pipeline sends EVALSHA as it is, with no reload on
            # NOSCRIPT: load both on every primary (a no-op once they are there).
            for script in registered[1:]:
                client.script_load(script.script)
        return registered[1], registered[2]

    def _scan(self, client: Any, pattern: str) -> Iterator[dict[str, tuple[str, str]]]:
        """Yield batches of this app's lock keys that match ``pattern``, with their names."""
        for found in _scan(client, pattern, self.BATCH):
            # The pattern's last '*' also matches keys of a longer prefix
            # ('unique:eu:...' under 'unique'): keep only this app's.
            batch = {key: names for key in map(_text, found) if (names := self._names(key))}
            if batch:
                yield batch

    def _holders(
        self, client: Any, scripts: tuple[Script, Script], keys: Iterable[str]
    ) -> _Holders:
        """Map each of ``keys`` that is held to its holder, as stored, and its TTL in ms."""
        groups = _slot_groups(client, builtins.list(keys))
        held: _Holders = {}
        for group, reply in zip(groups, _run(client, scripts[0], [(g, []) for g in groups]), strict=True):
            for key, holder, pttl in zip(group, reply[::2], reply[1::2], strict=True):
                if holder is not None:  # else released since the SCAN
                    held[key] = (holder, pttl)
        return held

    def _with_markers(self, client: Any, scripts: tuple[Script, Script], holders: _Holders) -> _Marked:
        """Read ``holders`` again, each with the running marker of the holder read before."""
        groups = _slot_groups(client, builtins.list(holders))
        calls = []
        for group in groups:
            ids = [holders[key][0] for key in group]
            # A marker shares its lock's hash slot: still one call per slot.
            markers = [running_marker_key(key, _text(holder)) for key, holder in zip(group, ids, strict=True)]
            calls.append(([*group, *markers], ids))
        marked: _Marked = {}
        for group, reply in zip(groups, _run(client, scripts[0], calls), strict=True):
            for key, holder, pttl, marker in zip(group, reply[::3], reply[1::3], reply[2::3], strict=True):
                if holder is not None:  # else released since the first read
                    marked[key] = (holder, pttl, marker)
        return marked

    @staticmethod
    def _statuses(
        batch: dict[str, tuple[str, str]], holders: _Holders, marked: _Marked, states: _States
    ) -> Iterator[LockStatus]:
        ids = {key: _text(holder) for key, (holder, _, _) in marked.items()}
        state_of = states.read(ids.values())
        now = time.time()
        for key, (holder, pttl, marker) in marked.items():
            queue, task_name = batch[key]
            task_id = ids[key]
            born = issued_at(task_id, now)
            # The marker read is the holder's read before; a lock that changed
            # hands in between has a holder whose marker was not read.
            running = marker_says_running(marker) if holder == holders[key][0] else None
            yield LockStatus(
                key, task_name, queue, task_id, None if pttl < 0 else pttl / 1000,
                born, None if born is None else max(0.0, now - born.timestamp()),
                state_of.get(task_id), running,
            )

    @staticmethod
    def _locks(
        batch: dict[str, tuple[str, str]], holders: _Holders
    ) -> Iterator[LockInfo]:
        for key, (holder, pttl) in holders.items():
            queue, task_name = batch[key]
            yield LockInfo(key, task_name, queue, _text(holder), None if pttl < 0 else pttl / 1000)

    def _release(self, client: Any, scripts: tuple[Script, Script], holders: _Holders) -> int:
        """Release each lock of ``holders`` that its holder, as read, still holds."""
        if not holders:
            return 0
        calls = [(group, [holders[key][0] for key in group]) for group in _slot_groups(client, list(holders))]
        return sum(int(n) for n in _run(client, scripts[1], calls))

    @contextmanager
    def _errors(self, task_name: str | None, key: str) -> Iterator[None]:
        try:
            yield
        except _STORE_ERRORS as exc:
            raise self._error(exc, task_name, key) from exc

    def _error(self, exc: Exception, task_name: str | None, key: str, note: str = "") -> LockStoreError:
        """The ``LockStoreError`` for ``exc``, naming the primaries that do not answer."""
        reason, node = f"{type(exc).__name__}: {exc}", None
        if _is_cluster(self._redis):
            # The failing command may have gone to a node that is up and
            # answered CLUSTERDOWN: the useful name is that of the one down.
            down = _unreachable(self._redis)
            if down:
                node = ", ".join(down)
                reason = next(iter(down.values()))
        return LockStoreError(task_name or "", key, reason + note, node=node)


class _States:
    """Reads holders' states from an app's result backend, until the backend fails once.

    After a failure the states stay unknown for the rest of the call: a
    backend that is down would otherwise cost a timeout per batch.
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.failed = False

    def read(self, task_ids: Iterable[str]) -> dict[str, str]:
        if self.failed:
            return {}
        try:
            return stored_states(self.app.backend, task_ids)
        except Exception as exc:  # any backend, any failure: the states are unknown
            self.failed = True
            logger.warning(
                "the result backend failed (%s: %s): holder states are unknown",
                type(exc).__name__, exc,
            )
            return {}


def _part(name: str | None) -> str:
    # Escaped names hold no glob characters, so they match literally.
    return "*" if name is None else escape(name)


def _is_cluster(client: Any) -> bool:
    # A function, so that the client stays ``Any`` for mypy: redis-py's
    # cluster methods are untyped.
    return isinstance(client, RedisCluster)


def _text(value: Any) -> str:
    # A holder that is not UTF-8 was not written by a task: show it, escaped.
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


def _scan(client: Any, pattern: str, count: int) -> Iterator[list[Any]]:
    """Yield what each SCAN call returns, primary by primary on a cluster."""
    if not _is_cluster(client):
        cursor = 0
        while True:
            cursor, found = client.scan(cursor, match=pattern, count=count, _type="string")
            yield found
            if cursor == 0:
                return
    for node in client.get_primaries():
        cursor = 0
        while True:
            cursors, found = client.scan(
                cursor, match=pattern, count=count, _type="string", target_nodes=node
            )
            yield found
            cursor = cursors[node.name]
            if cursor == 0:
                break


def _slot_groups(client: Any, keys: list[str]) -> list[list[str]]:
    """Split ``keys`` into what one script call may touch: all, or one hash slot each."""
    if not _is_cluster(client):
        return [keys]
    by_slot: dict[int, list[str]] = {}
    for key in keys:
        by_slot.setdefault(client.keyslot(key), []).append(key)
    return list(by_slot.values())


def _run(client: Any, script: Script, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
    """Run ``script`` once per ``(keys, args)``: one call, or one cluster pipeline."""
    if not _is_cluster(client):
        return [script(keys=keys, args=args, client=client) for keys, args in calls]
    pipe = client.pipeline()
    for keys, args in calls:
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
    return list(pipe.execute())


def _unreachable(client: Any) -> dict[str, str]:
    """Map the name of each primary that does not answer PING to its error."""
    down = {}
    for node in client.get_primaries():
        try:
            client.ping(target_nodes=node)
        except _STORE_ERRORS as exc:
            down[node.name] = f"{type(exc).__name__}: {exc}"
    return down
