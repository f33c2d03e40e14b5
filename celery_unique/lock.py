"""The lock store: every Redis script of the lock protocol, and the store's I/O.

Two kinds of key (see :mod:`celery_unique.keys` and docs/protocol.md):

* the **lock** ``L``, a string whose value is the id of the task holding it,
  with the lock's TTL;
* the **marker** ``M(T)`` of a task id ``T``, beside its lock in the same hash
  slot, which says what became of ``T`` when that is not plain from the lock:

  ==================================  ========================================
  value                               meaning
  ==================================  ========================================
  ``q|n|k|nonce|dl``                  attempt ``(n, k)`` is queued: a caller
                                      chose the id, or a retry or replacement
                                      of it was published
  ``r|n|k|nonce|dl|owner|proof``      a copy of attempt ``(n, k)`` runs at
                                      ``owner`` (renewed by its heartbeat)
  ``d|n|k|nonce|dl``                  attempt ``(n, k)`` has ended
  ``x|n|k|nonce|dl``                  the id was revoked or purged: no copy
                                      of it may run
  ==================================  ========================================

  ``n`` is the replace nesting and ``k`` the retries of an attempt, so that a
  retry or replacement is newer than the attempt that sent it; ``nonce`` names
  the incarnation of a caller-chosen id (empty for an id this package made);
  ``dl`` is the lock's deadline in milliseconds (Redis time). No marker ever
  outlives ``dl``: every key the package writes dies with its lock.

Under ``unique_limit=N`` a key has N slots, each a lock as above (``L``, then
``L~2`` ... ``L~N``); ACQUIRE_SLOT_SCRIPT takes one, and every other script
works on the one slot a message carries as it works on a lock.

Every script below is the only place its rule lives, and every one is safe
to send twice: a client that resends a command after its reply was lost
gets the answer the first one earned, so a resend never refuses its own
caller and never releases twice.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import redis
from redis.exceptions import NoScriptError
from redis.sentinel import SentinelConnectionPool

from .headers import nesting_of
from .keys import former_marker_key, marker_key, slot_keys, waiting_key

__all__ = [
    "AcquireError",
    "Attempt",
    "LockStore",
    "Outcome",
    "Replaced",
    "Slots",
    "Ticket",
    "attempt_of",
    "enqueue_locked",
    "marker_says_running",
    "running_marker_key",
]

#: The key of ``task_id``'s marker under ``lock_key`` (see :func:`celery_unique.keys.marker_key`).
running_marker_key = marker_key


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


class Attempt(NamedTuple):
    """Which attempt of which incarnation of a task id a message carries."""

    task_id: str
    #: Replace nesting: a replacement is one deeper than the task it replaced.
    nesting: int = 0
    #: Retries: a retry is one more than the attempt that sent it.
    retries: int = 0
    #: The incarnation of a caller-chosen id; empty for an id this package made.
    nonce: str = ""

    def args(self) -> list[str | int]:
        return [self.task_id, self.nesting, self.retries, self.nonce]


def attempt_of(task_id: str, headers: Any, nonce: str) -> Attempt:
    """The attempt of a message with ``headers``: its replace nesting and Celery's ``retries``."""
    return Attempt(task_id, nesting_of(headers), int(headers.get("retries") or 0), nonce)


class Ticket(NamedTuple):
    """The lock a message asks the transport to take as it queues the message (ENQUEUE_SCRIPT)."""

    key: str
    task_id: str
    ttl_ms: int
    #: The incarnation of a caller-chosen id; empty for an id this package made.
    nonce: str
    #: The lock store's database, on the broker's server.
    db: int


class Replaced(NamedTuple):
    """What REPLACE_SCRIPT did for a call (see :meth:`LockStore.replace`)."""

    #: The holder that refused the call, or None if the call holds the lock.
    holder: str | None
    #: When the first call of this debounce took the lock (ms, Redis time).
    since_ms: int
    #: The holder the call replaced, if any.
    replaced: str | None
    #: Redis time as the script ran (ms).
    now_ms: int
    #: Whether the call waits for the lock, behind a holder that has begun
    #: (``unique_while_running="queue_one"``), rather than holds it.
    waits: bool = False


class Slots(NamedTuple):
    """What ACQUIRE_SLOT_SCRIPT did for a call under ``unique_limit`` (see :meth:`LockStore.acquire_slot`)."""

    #: The slot key the call now holds, or None if it was refused.
    key: str | None
    #: If refused, ``(slot key, holder)`` of each slot held, slot 1 first:
    #: every slot, or only the one the same caller-chosen id already holds.
    holders: tuple[tuple[str, str], ...] = ()


#: How a run ends, as the lock store sees it (see END_SCRIPT).
Outcome = str
RELEASE: Outcome = "release"
KEEP: Outcome = "keep"
REQUEUE: Outcome = "requeue"

# Shared by the scripts that read or write markers.
_PRELUDE = """
local function now_ms()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function parse(value)
    if not value then return nil end
    local f = {}
    for part in string.gmatch(value .. '|', '([^|]*)|') do f[#f + 1] = part end
    return {s = f[1], n = tonumber(f[2]) or 0, k = tonumber(f[3]) or 0, nonce = f[4] or '',
            dl = tonumber(f[5]), owner = f[6] or '', proof = f[7] or ''}
end
local function newer(f, n, k)
    return f.n > n or (f.n == n and f.k > k)
end
local function same(f, n, k)
    return f.n == n and f.k == k
end
local function state(s, n, k, nonce, dl)
    return s .. '|' .. n .. '|' .. k .. '|' .. nonce .. '|' .. dl
end
-- Write key = value until the lock's deadline (and for at most cap ms); a
-- deadline already passed deletes the key instead.
local function until_deadline(key, value, dl, now, cap)
    local ttl = dl - now
    if cap and cap < ttl then ttl = cap end
    if ttl > 0 then
        redis.call('SET', key, value, 'PX', ttl)
    else
        redis.call('DEL', key)
    end
end
-- A new incarnation of a chosen id takes the marker's place: an "ended" or
-- "revoked" marker of another incarnation moves to the former key, until
-- its own deadline, so that late copies of that incarnation stay dropped.
local function set_aside(marker, former, nonce, now)
    local value = redis.call('GET', marker)
    local f = parse(value)
    if f and f.nonce ~= nonce and (f.s == 'd' or f.s == 'x') and f.dl then
        until_deadline(former, value, f.dl, now, nil)
    end
end
local function deadline(lock, task_id, f, now)
    if f and f.dl then return f.dl end
    if redis.call('GET', lock) == task_id then
        return now + redis.call('PTTL', lock)
    end
    return nil
end
"""


# The acquire rule, shared by ACQUIRE_SCRIPT and ENQUEUE_SCRIPT: take
# ``lock`` for ``id`` (with its marker and former-incarnation key for a
# caller-chosen id, else nil). Returns (nil, true) when it took the lock now,
# (nil, false) when ``id`` already held it (a resend of the same call), or
# (holder, false) when another id holds it or the same chosen id was
# enqueued again by another call.
_ACQUIRE = """
local function acquire(lock, marker, former, id, ttl, nonce)
    if redis.call('SET', lock, id, 'NX', 'PX', ttl) then
        if marker then
            local t = redis.call('TIME')
            local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
            local old = redis.call('GET', marker)
            if old and string.sub(old, 1, 1) ~= 'q' and string.sub(old, 1, 1) ~= 'r' then
                -- an ended or revoked former incarnation: kept aside until its deadline
                local dl = tonumber(string.match(old, '^%a|%d+|%d+|[^|]*|(%d+)'))
                if dl and dl > now then
                    redis.call('SET', former, old, 'PX', dl - now)
                end
            end
            redis.call('SET', marker, 'q|0|0|' .. nonce .. '|' .. (now + tonumber(ttl)), 'PX', ttl)
        end
        return false, true
    end
    local holder = redis.call('GET', lock)
    if holder == id then
        if not marker then
            return false, false
        end
        local m = redis.call('GET', marker)
        local mine = 'q|0|0|' .. nonce .. '|'
        if m and string.sub(m, 1, #mine) == mine then
            return false, false
        end
    end
    return holder, false
end
"""


class LockStore:
    """Takes, ends and inspects locks in one Redis (one client: a server, Sentinel or a Cluster)."""

    # Take the lock, or say who has it (the rule lives in _ACQUIRE, shared
    # with ENQUEUE_SCRIPT).
    #
    # KEYS[1] - lock key
    # KEYS[2] - (caller-chosen id only) marker of ARGV[1], set to "queued":
    #           the id may have run before, and what it stored then is not
    #           this incarnation's
    # KEYS[3] - (caller-chosen id only) former-incarnation key of ARGV[1],
    #           where an ended or revoked marker of another incarnation moves
    # ARGV[1] - task id that wants the lock
    # ARGV[2] - time to live in milliseconds
    # ARGV[3] - (caller-chosen id only) the incarnation's nonce
    # return nil if ARGV[1] now holds the lock, otherwise the holder's id
    #        (ARGV[1] itself when the same chosen id is enqueued twice). A
    #        resend finds its own first attempt: the id it generated, or the
    #        chosen id with its nonce's queued marker, holds the lock.
    ACQUIRE_SCRIPT = _ACQUIRE + """
return (acquire(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3]))
"""

    # Take the lock and push the task's message in one step (the opt-in
    # transport, celery_unique.transport): a message is queued exactly when
    # its lock is taken. Sent on the broker's connection, whose database
    # holds the queue; the lock's database may be another one of the same
    # server, which the script selects for the lock's part alone.
    #
    # KEYS[1] - the queue's list (for the message's priority), in the broker's database
    # KEYS[2] - lock key
    # KEYS[3] - (caller-chosen id only) marker of ARGV[2] (see ACQUIRE_SCRIPT)
    # KEYS[4] - (caller-chosen id only) former-incarnation key of ARGV[2]
    # KEYS[5 or 3...] - the queue's lists to PEXPIRE (a queue with x-expires), if any
    # ARGV[1] - the message, as kombu serializes it
    # ARGV[2] - task id that wants the lock
    # ARGV[3] - time to live in milliseconds
    # ARGV[4] - the incarnation's nonce for a caller-chosen id, "" otherwise
    # ARGV[5] - the lock's database, "" if it is the broker's
    # ARGV[6] - the broker's database
    # ARGV[7] - the queue's expiry in milliseconds, "" if it has none
    # return nil if the message is queued under ARGV[2]'s lock, otherwise
    #        the holder's id, and nothing is written. A resend after a lost
    #        reply finds the lock its first attempt took, which pushed the
    #        message then: it pushes nothing and answers nil.
    ENQUEUE_SCRIPT = _ACQUIRE + """
local chosen = ARGV[4] ~= ''
if ARGV[5] ~= '' then redis.call('SELECT', ARGV[5]) end
local holder, fresh
if chosen then
    holder, fresh = acquire(KEYS[2], KEYS[3], KEYS[4], ARGV[2], ARGV[3], ARGV[4])
else
    holder, fresh = acquire(KEYS[2], nil, nil, ARGV[2], ARGV[3], nil)
end
if holder then return holder end
if not fresh then return false end
if ARGV[5] ~= '' then redis.call('SELECT', ARGV[6]) end
redis.call('LPUSH', KEYS[1], ARGV[1])
if ARGV[7] ~= '' then
    for i = (chosen and 5 or 3), #KEYS do
        redis.call('PEXPIRE', KEYS[i], ARGV[7])
    end
end
return false
"""

    # Take many locks in one step, each as ACQUIRE_SCRIPT takes one (the
    # bulk enqueue, celery_unique.bulk): one round trip for a batch on one
    # server, one per hash slot on a Cluster.
    #
    # KEYS - per call, in order: its lock key, and for a caller-chosen id
    #        also its marker and former-incarnation key (see ACQUIRE_SCRIPT)
    # ARGV - per call, three: task id, time to live in milliseconds, and the
    #        nonce of a caller-chosen id ("" for an id this package made)
    # return per call, in order: "" if its id now holds its lock (a resend
    #        finds its own first attempt, as ACQUIRE_SCRIPT's does), else
    #        the holder's id. A later call of the batch with the same key as
    #        an earlier one is refused by it.
    ACQUIRE_MANY_SCRIPT = _ACQUIRE + """
local out = {}
local k = 1
for i = 1, #ARGV, 3 do
    local holder
    if ARGV[i + 2] ~= '' then
        holder = acquire(KEYS[k], KEYS[k + 1], KEYS[k + 2], ARGV[i], ARGV[i + 1], ARGV[i + 2])
        k = k + 3
    else
        holder = acquire(KEYS[k], nil, nil, ARGV[i], ARGV[i + 1], nil)
        k = k + 1
    end
    out[#out + 1] = holder or ''
end
return out
"""

    # Take a slot of a key under unique_limit=N (celery_unique.limit): the
    # first free one of N locks, each taken as ACQUIRE_SCRIPT takes one (the
    # rule lives in _ACQUIRE). One id holds at most one slot: a slot this id
    # already holds answers as ACQUIRE_SCRIPT would for it, so a resend
    # after a lost reply finds its first attempt's slot, and the same chosen
    # id enqueued again by another call is refused by itself.
    #
    # KEYS - per slot, 1 to N in order: its slot key (slot 1 is the lock key
    #        itself, slot i the lock key + "~i"), and for a caller-chosen id
    #        also that slot's marker and former-incarnation key of ARGV[1]
    # ARGV[1] - task id that wants a slot
    # ARGV[2] - time to live in milliseconds
    # ARGV[3] - the incarnation's nonce for a caller-chosen id, "" otherwise
    # return {i, ""} if ARGV[1] now holds slot i (a resend finds it there);
    #        {i, ARGV[1]} if the same chosen id holds slot i for another
    #        call; {0, holder of slot 1, ..., holder of slot N} if other ids
    #        hold every slot.
    ACQUIRE_SLOT_SCRIPT = _ACQUIRE + """
local chosen = ARGV[3] ~= ''
local step = chosen and 3 or 1
local n = #KEYS / step
local function take(i)
    local k = (i - 1) * step + 1
    if chosen then
        return (acquire(KEYS[k], KEYS[k + 1], KEYS[k + 2], ARGV[1], ARGV[2], ARGV[3]))
    end
    return (acquire(KEYS[k], nil, nil, ARGV[1], ARGV[2], nil))
end
for i = 1, n do
    if redis.call('GET', KEYS[(i - 1) * step + 1]) == ARGV[1] then
        return {i, take(i) or ''}
    end
end
local holders = {0}
for i = 1, n do
    local holder = take(i)
    if not holder then return {i, ''} end
    holders[#holders + 1] = holder
end
return holders
"""

    # Take the lock for a call that replaces a holder not begun yet
    # (on_duplicate="replace", a debounce), or take it if it is free. Such
    # calls always carry a nonce: their "queued" marker says the holder may
    # be replaced, and since when the calls it replaced were waiting. Under
    # unique_while_running="queue_one" a holder that cannot be replaced (it
    # began) does not refuse the call: the call waits in the waiting key,
    # replacing the call that waited there, and takes the lock as it begins
    # once the lock is free (BEGIN_SCRIPT).
    #
    # KEYS[1] - lock key
    # KEYS[2] - marker of ARGV[1]
    # KEYS[3] - former-incarnation key of ARGV[1] (see ACQUIRE_SCRIPT)
    # KEYS[4] - (after a first try) marker of ARGV[4], the holder read before
    # KEYS[5] - (queue_one only) the lock's waiting key
    # KEYS[6] - (queue_one only) marker of ARGV[6], the waiting call read before
    # ARGV[1] - task id that wants the lock
    # ARGV[2] - time to live in milliseconds
    # ARGV[3] - the incarnation's nonce
    # ARGV[4] - the holder an earlier try read, or ""
    # ARGV[5] - "1" for unique_while_running="queue_one"
    # ARGV[6] - (queue_one only) the waiting call an earlier try read, or ""
    # return {"took", since, replaced, now, waits} if ARGV[1] now holds the
    #        lock, or (``waits`` "w") the waiting key: ``since`` is when the
    #        first call of this debounce took it (ms, Redis time),
    #        ``replaced`` the holder or waiting call it dropped or "",
    #        ``now`` Redis time; {"again", holder, waiting} if the holder (or
    #        the waiting call) is not the one an earlier try read: try again
    #        with their markers; {"held", holder} if the holder began,
    #        ended, retried or was not sent to be replaced (its runs may be
    #        unmarked, and nothing would show it began), and the call does
    #        not wait. A replaced call's marker says "revoked": every copy of
    #        it is dropped as it begins. A resend finds its own first attempt
    #        by its nonce, and the call that attempt replaced in its marker.
    REPLACE_SCRIPT = _PRELUDE + """
local now = now_ms()
local ttl = tonumber(ARGV[2])
local queue_one = ARGV[5] == '1'
local holder = redis.call('GET', KEYS[1])
local waiting = queue_one and redis.call('GET', KEYS[5])
if holder == ARGV[1] or (waiting and waiting == ARGV[1]) then
    local m = parse(redis.call('GET', KEYS[2]))
    if m and m.s == 'q' and m.nonce == ARGV[3] and string.sub(m.owner, 1, 1) == 's' then
        local waits = holder == ARGV[1] and '' or 'w'
        return {'took', tonumber(string.sub(m.owner, 2)) or now, m.proof, now, waits}
    end
    return {'held', ARGV[1]}
end
if (holder or '') ~= ARGV[4] or (queue_one and (waiting or '') ~= ARGV[6]) then
    return {'again', holder or '', waiting or ''}
end
-- Drop a call that has not begun: its marker says revoked until its deadline.
local function drop(marker, f, pttl)
    local dl = (f and f.dl) or (now + pttl)
    until_deadline(marker, state('x', 0, 0, f and f.nonce or '', dl), dl, now, nil)
end
local function since_of(f)
    return tonumber(string.sub(f and f.owner or '', 2)) or now
end
local since = now
local replaced = ''
local waits = ''
if holder then
    local f = parse(redis.call('GET', KEYS[4]))
    if f and f.s == 'q' and f.n == 0 and f.k == 0 and string.sub(f.owner, 1, 1) == 's' then
        since = since_of(f)
        drop(KEYS[4], f, 0)
        replaced = holder
    elseif not queue_one then
        return {'held', holder}
    else
        -- The holder began (or cannot be replaced): this call waits for it,
        -- in place of the call that waited before.
        waits = 'w'
    end
end
if queue_one and waiting and replaced == '' then
    -- Only the latest call waits; one that waited while the lock went free
    -- gives way too: it has not begun, or it would hold the lock.
    local w = parse(redis.call('GET', KEYS[6]))
    since = since_of(w)
    drop(KEYS[6], w, redis.call('PTTL', KEYS[5]))
    redis.call('DEL', KEYS[5])
    replaced = waiting
end
redis.call('SET', waits == 'w' and KEYS[5] or KEYS[1], ARGV[1], 'PX', ttl)
set_aside(KEYS[2], KEYS[3], ARGV[3], now)
local mine = state('q', 0, 0, ARGV[3], now + ttl) .. '|s' .. since .. '|' .. replaced
redis.call('SET', KEYS[2], mine, 'PX', ttl)
return {'took', since, replaced, now, waits}
"""

    # Mark a copy of a task running, or say why it must not run now.
    #
    # KEYS[1] - lock key
    # KEYS[2] - marker of the task id
    # KEYS[3] - former-incarnation key of the task id (see ACQUIRE_SCRIPT)
    # KEYS[4] - the lock's waiting key (see REPLACE_SCRIPT)
    # ARGV[1..4] - task id, nesting, retries, nonce (the copy's attempt)
    # ARGV[5] - owner: "<worker node>/<pid>[.<thread>]"
    # ARGV[6] - proof of the owner's life: "<machine>:<process start>"
    # ARGV[7] - marker TTL in milliseconds (renewed by the heartbeat)
    # ARGV[8] - "1" to release the lock as the run begins (unique_until="start")
    # ARGV[9] - a marker value whose owner was shown dead, to take it over, or ""
    # return {"run", marker} if this copy now holds the marker; {"wait",
    #        ms, marker} if another live copy of this attempt runs; {"skip"}
    #        if this attempt has ended or a newer one exists; {"drop"} if the
    #        id was revoked or purged; {"behind"} if the id waits for the
    #        lock (the waiting key holds it) and another id holds the lock;
    #        {"stray"} if the lock is gone and no marker says why (it
    #        expired, or another incarnation of the id holds it): the copy
    #        runs unmarked. A waiting id takes the lock once it is free, as
    #        it begins. A resend finds its own marker.
    BEGIN_SCRIPT = _PRELUDE + """
local n, k = tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
local marker = redis.call('GET', KEYS[2])
local f = parse(marker)
if f and f.nonce ~= ARGV[4] then
    -- Another incarnation of the id holds the marker: this copy's own may
    -- have ended or been revoked (see ACQUIRE_SCRIPT), else it runs unmarked.
    local w = parse(redis.call('GET', KEYS[3]))
    if w and w.nonce == ARGV[4] then
        if w.s == 'x' then return {'drop'} end
        if w.s == 'd' and (newer(w, n, k) or same(w, n, k)) then return {'skip'} end
    end
    return {'stray'}
end
if f then
    if f.s == 'x' then return {'drop'} end
    if newer(f, n, k) then return {'skip'} end
    if same(f, n, k) then
        if f.s == 'd' then return {'skip'} end
        if f.s == 'r' and f.owner ~= ARGV[5] and marker ~= ARGV[9] then
            return {'wait', redis.call('PTTL', KEYS[2]), marker}
        end
    end
end
if KEYS[4] and redis.call('GET', KEYS[4]) == ARGV[1] then
    -- This id waits for the lock: until it is free, then it takes it.
    if redis.call('GET', KEYS[1]) then return {'behind'} end
    local dl = (f and f.dl) or (now + redis.call('PTTL', KEYS[4]))
    if dl > now then redis.call('SET', KEYS[1], ARGV[1], 'PX', dl - now) end
    redis.call('DEL', KEYS[4])
end
local dl = deadline(KEYS[1], ARGV[1], f, now)
if not dl or dl <= now then
    return {'stray'}
end
local value = 'r|' .. n .. '|' .. k .. '|' .. ARGV[4] .. '|' .. dl .. '|' .. ARGV[5] .. '|' .. ARGV[6]
until_deadline(KEYS[2], value, dl, now, tonumber(ARGV[7]))
if ARGV[8] == '1' and redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
end
return {'run', value}
"""

    # End a copy's run: release the lock or keep it as the outcome says, and
    # leave the marker that keeps later copies of this attempt from running.
    #
    # KEYS[1] - lock key
    # KEYS[2] - marker of the task id
    # ARGV[1..4] - task id, nesting, retries, nonce (the run's attempt)
    # ARGV[5] - the run's owner (a marked run's marker names it)
    # ARGV[6] - "release" (the mode lets go), "keep" (a final failure the
    #           mode keeps) or "requeue" (the message comes back and runs
    #           again: the marker says the attempt is queued)
    # ARGV[7] - "1" to leave a "done" marker until the lock's deadline (a copy
    #           of the message may exist), "" to leave none unless the
    #           attempt's queued marker says copies of an older one may
    #           come back (CONTINUE_SCRIPT's "|c")
    # return 1 if the lock was released, otherwise 0. Nothing is touched
    #        while another copy of this attempt runs, a newer attempt is
    #        pending, or another incarnation of the id holds it; the older
    #        attempt that published this one (a retry) is only finishing.
    END_SCRIPT = _PRELUDE + """
local n, k = tonumber(ARGV[2]), tonumber(ARGV[3])
local marker = redis.call('GET', KEYS[2])
local f = parse(marker)
local older = false
if f then
    if f.nonce ~= ARGV[4] or newer(f, n, k) then return 0 end
    -- A copy of this attempt that runs elsewhere keeps the lock; the older
    -- attempt that published this one is only finishing.
    if f.s == 'r' and same(f, n, k) and f.owner ~= ARGV[5] then return 0 end
    if f.s == 'x' then return 0 end
    older = not same(f, n, k)
end
local now = now_ms()
local dl = deadline(KEYS[1], ARGV[1], f, now)
if ARGV[6] == 'requeue' then
    -- The attempt is queued again: a state it stored is stale until it runs.
    if dl then
        until_deadline(KEYS[2], state('q', n, k, ARGV[4], dl), dl, now, nil)
    elseif f then
        redis.call('DEL', KEYS[2])
    end
    return 0
end
local released = 0
if ARGV[6] == 'release' and redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
    released = 1
end
local copies = f and not older and f.s == 'q' and f.owner == 'c'
if (ARGV[7] == '1' or copies) and dl then
    until_deadline(KEYS[2], state('d', n, k, ARGV[4], dl), dl, now, nil)
elseif f and not older then
    redis.call('DEL', KEYS[2])
end
return released
"""

    # Renew this copy's marker, and put it back if it vanished (a restarted or
    # flushed Redis) while no other copy took it; never past the deadline.
    #
    # KEYS[1] - marker
    # ARGV[1] - the marker value this copy holds
    # ARGV[2] - marker TTL in milliseconds
    # return 1 if renewed or put back, otherwise 0
    HEARTBEAT_SCRIPT = _PRELUDE + """
local marker = redis.call('GET', KEYS[1])
if marker and marker ~= ARGV[1] then return 0 end
local f = parse(ARGV[1])
until_deadline(KEYS[1], ARGV[1], f.dl, now_ms(), tonumber(ARGV[2]))
return 1
"""

    # Release the lock of a copy that will not run (revoked, expired, purged,
    # or a lock taken for a message that was never published), unless a copy
    # of its attempt runs or a newer attempt of it is pending.
    #
    # KEYS[1] - lock key
    # KEYS[2] - marker of the task id
    # KEYS[3] - the lock's waiting key (see REPLACE_SCRIPT): an id that
    #           waits there gives its place up, owner-checked
    # ARGV[1..4] - task id, nesting, retries, nonce (the discarded attempt)
    # ARGV[5] - "x" to leave a marker that drops every later copy of the id
    #           until the lock's deadline, "" to leave none
    # return 1 if the lock (or the waiting place) was released, otherwise 0
    DISCARD_SCRIPT = _PRELUDE + """
local n, k = tonumber(ARGV[2]), tonumber(ARGV[3])
local f = parse(redis.call('GET', KEYS[2]))
if f and (f.nonce ~= ARGV[4] or newer(f, n, k) or (f.s == 'r' and same(f, n, k))) then
    return 0
end
local now = now_ms()
local dl = deadline(KEYS[1], ARGV[1], f, now)
if ARGV[5] == 'x' and dl then
    until_deadline(KEYS[2], state('x', n, k, ARGV[4], dl), dl, now, nil)
elseif f then
    redis.call('DEL', KEYS[2])
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
    return 1
end
if KEYS[3] and redis.call('GET', KEYS[3]) == ARGV[1] then
    redis.call('DEL', KEYS[3])
    return 1
end
return 0
"""

    # Say that a retry or replacement of a running task id was published: its
    # attempt is queued, so the state the id stored so far is stale, copies of
    # the older attempt are dropped, and the lock is not released by it. Sent
    # after the publish; a new attempt that has begun already is left alone.
    # When the attempt that published it was marked (copies of its message
    # may still come back), the queued marker says so ("|c"), and the new
    # attempt's end leaves an "ended" marker even if it ran unmarked.
    #
    # KEYS[1] - lock key
    # KEYS[2] - marker of the task id
    # ARGV[1..4] - task id, nesting, retries, nonce (the new attempt)
    # return 1 if the marker now says the new attempt is queued, otherwise 0
    CONTINUE_SCRIPT = _PRELUDE + """
local now = now_ms()
local n, k = tonumber(ARGV[2]), tonumber(ARGV[3])
local f = parse(redis.call('GET', KEYS[2]))
if f and (f.nonce ~= ARGV[4] or newer(f, n, k) or (same(f, n, k) and f.s ~= 'q')) then
    return 0
end
local dl = deadline(KEYS[1], ARGV[1], f, now)
if not dl or redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local value = state('q', ARGV[2], ARGV[3], ARGV[4], dl)
if f and (f.s == 'r' or f.owner == 'c') then value = value .. '|c' end
until_deadline(KEYS[2], value, dl, now, nil)
return 1
"""

    # Give a finished holder's lock to a new task id, or delete it (the reaper).
    # The caller read the holder's stored state and judged it finished; this
    # checks, atomically, that the lock is still the holder's, that no copy of
    # it runs and that no newer attempt of it is queued (a state stored
    # before a retry or a reuse of the id is stale).
    #
    # KEYS[1] - lock key
    # KEYS[2] - marker of the holder
    # KEYS[3] - (caller-chosen new id only) marker of ARGV[2], set to "queued"
    # KEYS[4] - (caller-chosen new id only) former-incarnation key of ARGV[2]
    # ARGV[1] - the holder's task id
    # ARGV[2] - the new holder's task id, or "" to delete the lock
    # ARGV[3] - time to live in milliseconds of the new holder's lock
    # ARGV[4] - (caller-chosen new id only) the new incarnation's nonce
    # KEYS[5..] - (caller-chosen new id under unique_limit only) the key's
    #           other slots: one that ARGV[2] holds already refuses the call
    # ARGV[5] - (caller-chosen new id only) "1" if the new holder is
    #           replaceable (on_duplicate="replace"): its marker says so, with
    #           now as the debounce's first call, as REPLACE_SCRIPT writes it
    # return nil if the lock was taken over (or deleted), otherwise the
    #        holder's id (ARGV[2] itself if it holds another slot). A resend
    #        finds the lock its first attempt took.
    TAKE_OVER_SCRIPT = _PRELUDE + """
local holder = redis.call('GET', KEYS[1])
if holder and holder == ARGV[2] then
    if not KEYS[3] then return false end
    local marker = redis.call('GET', KEYS[3])
    local mine = 'q|0|0|' .. ARGV[4] .. '|'
    if marker and string.sub(marker, 1, #mine) == mine then return false end
    return holder
end
-- One id, one slot: the same chosen id holds another slot of the key.
for i = 5, #KEYS do
    if redis.call('GET', KEYS[i]) == ARGV[2] then return ARGV[2] end
end
if holder ~= ARGV[1] then
    if holder then return holder end
    if ARGV[2] == '' then return false end
else
    local f = parse(redis.call('GET', KEYS[2]))
    if f and (f.s == 'r' or f.s == 'q') then return holder end
    if ARGV[2] == '' then
        redis.call('DEL', KEYS[1])
        return false
    end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if KEYS[3] then
    local now = now_ms()
    set_aside(KEYS[3], KEYS[4], ARGV[4], now)
    local mine = 'q|0|0|' .. ARGV[4] .. '|' .. (now + tonumber(ARGV[3]))
    if ARGV[5] == '1' then mine = mine .. '|s' .. now .. '|' end
    redis.call('SET', KEYS[3], mine, 'PX', ARGV[3])
end
return false
"""

    def __init__(self, client: redis.Redis | redis.RedisCluster) -> None:
        self.client = client
        # Registered once; each reloads itself on NOSCRIPT, so a SCRIPT FLUSH
        # or a restarted server costs one extra round trip, no error.
        self._acquire = client.register_script(self.ACQUIRE_SCRIPT)
        self._begin = client.register_script(self.BEGIN_SCRIPT)
        self._end = client.register_script(self.END_SCRIPT)
        self._heartbeat = client.register_script(self.HEARTBEAT_SCRIPT)
        self._discard = client.register_script(self.DISCARD_SCRIPT)
        self._continue = client.register_script(self.CONTINUE_SCRIPT)
        self._take_over = client.register_script(self.TAKE_OVER_SCRIPT)
        self._enqueue = client.register_script(self.ENQUEUE_SCRIPT)
        self._acquire_many = client.register_script(self.ACQUIRE_MANY_SCRIPT)
        self._replace = client.register_script(self.REPLACE_SCRIPT)
        self._acquire_slot = client.register_script(self.ACQUIRE_SLOT_SCRIPT)
        # One server behind a plain pool: the hot paths (the producer's
        # acquire, the worker's end) write pre-packed commands on connections
        # of their own. Sentinel and Cluster clients take redis-py's path.
        pool = getattr(client, "connection_pool", None)
        plain = pool is not None and not isinstance(pool, SentinelConnectionPool)
        self._own = _OwnConnections(pool) if plain else None
        self.cluster = isinstance(client, redis.RedisCluster)
        #: Pre-packed heads of the hot paths' commands, by (script sha, keys, args).
        self._heads: dict[tuple[str, int, int], bytes] = {}

    # -- the producer ---------------------------------------------------------------------------

    def acquire(self, key: str, task_id: str, ttl_ms: int, nonce: str | None = None) -> str | None:
        """Take the lock for ``task_id``; return None if taken, else the holder.

        ``nonce`` is given when the caller chose the task id: the id's marker
        then says "queued" with it (see ACQUIRE_SCRIPT). Raises
        :class:`AcquireError` if Redis fails.
        """
        if nonce is None:
            keys: tuple[str, ...] = (key,)
            args: tuple[str | int, ...] = (task_id, ttl_ms)
        else:
            keys = (key, marker_key(key, task_id), former_marker_key(key, task_id))
            args = (task_id, ttl_ms, nonce)
        if self._own is None:
            try:
                return _text(self._call(self._acquire, keys, args))
            except redis.RedisError as exc:
                raise AcquireError(exc, maybe_applied=True) from exc
        return _text(self._own_call(self._acquire, keys, args))

    def acquire_slot(
        self, key: str, limit: int, task_id: str, ttl_ms: int, nonce: str | None = None
    ) -> Slots:
        """Take the first free of the ``limit`` slots of ``key`` for ``task_id`` (see ACQUIRE_SLOT_SCRIPT).

        ``nonce``: as for :meth:`acquire`. All the slots must be in one hash
        slot on a Cluster (a hash tag in the prefix). Raises
        :class:`AcquireError` if Redis fails; a slot may then have been taken.
        """
        slots = slot_keys(key, limit)
        keys: list[str] = []
        for slot in slots:
            keys.append(slot)
            if nonce is not None:
                keys += [marker_key(slot, task_id), former_marker_key(slot, task_id)]
        args = (task_id, ttl_ms, nonce or "")
        if self._own is None:
            try:
                reply = self._call(self._acquire_slot, keys, args)
            except redis.RedisError as exc:
                raise AcquireError(exc, maybe_applied=True) from exc
        else:
            reply = self._own_call(self._acquire_slot, keys, args)
        taken = int(reply[0])
        if taken:
            holder = _text(reply[1])
            return Slots(None, ((slots[taken - 1], holder),)) if holder else Slots(slots[taken - 1])
        return Slots(None, tuple((slot, str(_text(h))) for slot, h in zip(slots, reply[1:], strict=True)))

    def replace(
        self, key: str, task_id: str, ttl_ms: int, nonce: str, *, queue_one: bool = False
    ) -> Replaced:
        """Take the lock for ``task_id``, replacing a holder that has not begun (see REPLACE_SCRIPT).

        ``queue_one``: a holder that has begun does not refuse the call,
        which waits for the lock in its waiting key instead, replacing the
        call that waited there. A first try learns the holder (and the
        waiting call), the next replaces it if it still holds the lock and
        has not begun; a third is for a lock that changed hands in between.
        """
        keys = [key, marker_key(key, task_id), former_marker_key(key, task_id)]
        args: list[str | int] = [task_id, ttl_ms, nonce, ""]
        if queue_one:
            keys += [marker_key(key, ""), waiting_key(key), marker_key(key, "")]
            args += ["1", ""]
        refuser = ""
        for _ in range(3):
            reply: list[Any] = list(self._replace_call(keys, args))
            verdict = _text(reply[0])
            if verdict == "took":
                replaced = _text(reply[2]) or None
                return Replaced(None, int(reply[1]), replaced, int(reply[3]), waits=bool(_text(reply[4])))
            holder = _text(reply[1]) or ""
            if verdict == "held":
                return Replaced(holder, 0, None, 0)
            waiting = _text(reply[2]) or ""
            # Refused after the last try, the call names who stood in its way.
            refuser = holder or waiting or refuser
            keys[3:4], args[3] = [marker_key(key, holder)], holder
            if queue_one:
                keys[5], args[5] = marker_key(key, waiting), waiting
        return Replaced(refuser, 0, None, 0)

    def _replace_call(self, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        # On one server, the hot path's own connections, as acquire() uses them.
        if self._own is None:
            return self._call(self._replace, keys, args)
        try:
            return self._own_call(self._replace, keys, args)
        except AcquireError as failure:
            raise failure.error from None

    def acquire_many(
        self, claims: Sequence[tuple[str, str, int, str | None]]
    ) -> list[str | AcquireError | None]:
        """Take each ``(key, task_id, ttl_ms, nonce)`` lock as :meth:`acquire` would, in one step.

        Returns, per claim and in order, None if taken, else the holder (see
        ACQUIRE_MANY_SCRIPT): one script call on a server or Sentinel, one
        per hash slot on a Cluster. A claim whose script call failed gets
        that failure, an :class:`AcquireError` (its lock may have been
        taken); the other slots' claims keep their answers.
        """
        batches: dict[int, list[int]] = {}
        for index, (key, _, _, _) in enumerate(claims):
            slot = self.client.keyslot(key) if self.cluster else 0  # type: ignore[union-attr]
            batches.setdefault(slot, []).append(index)
        answers: list[str | AcquireError | None] = [None] * len(claims)
        for indexes in batches.values():
            keys: list[str] = []
            args: list[str | int] = []
            for index in indexes:
                key, task_id, ttl_ms, nonce = claims[index]
                keys.append(key)
                if nonce is not None:
                    keys += [marker_key(key, task_id), former_marker_key(key, task_id)]
                args += [task_id, ttl_ms, nonce or ""]
            try:
                reply = self._call(self._acquire_many, keys, args)
            except redis.RedisError as exc:
                failure = AcquireError(exc, maybe_applied=True)
                failure.__cause__ = exc
                for index in indexes:
                    answers[index] = failure
                continue
            for index, holder in zip(indexes, reply, strict=True):
                answers[index] = _text(holder) or None
        return answers

    def enqueue(self, queue_key: str, message: bytes | str, ticket: Ticket) -> str | None:
        """Take ``ticket``'s lock and push ``message`` onto ``queue_key`` together (ENQUEUE_SCRIPT).

        None if both were done (or a resend found them done), else the
        holder, and nothing was written. The queue is in this client's database.
        """
        pool: Any = getattr(self.client, "connection_pool", None)
        db = int(pool.connection_kwargs.get("db") or 0) if pool is not None else 0
        return enqueue_locked(self.client, queue_key, message, ticket, db)

    def take_over(
        self,
        key: str,
        holder: str,
        task_id: str,
        ttl_ms: int,
        nonce: str | None = None,
        *,
        replaceable: bool = False,
        others: Sequence[str] = (),
    ) -> str | None:
        """Give ``holder``'s lock to ``task_id`` if no copy of it runs or waits; None if done.

        Returns the holder's id while it stands. An empty ``task_id``
        deletes the lock instead (the reaper). ``nonce``: as for :meth:`acquire`.
        ``replaceable``: the new holder (with a nonce) can itself be replaced
        until it begins, as a holder that :meth:`replace` made. ``others``:
        under ``unique_limit``, the key's other slots, none of which a
        caller-chosen ``task_id`` may hold already.
        """
        keys = [key, marker_key(key, holder)]
        args: list[str | int] = [holder, task_id, ttl_ms]
        if nonce is not None and task_id:
            keys += [marker_key(key, task_id), former_marker_key(key, task_id), *others]
            args += [nonce, "1" if replaceable else ""]
        return _text(self._call(self._take_over, keys, args))

    def discard(self, key: str, attempt: Attempt, *, drop_later: bool) -> bool:
        """Release the lock of a copy that will not run (see DISCARD_SCRIPT); return whether it did.

        ``drop_later``: leave a marker that drops every later copy of the id
        (a revoke, a purge); not for a message that was never published.
        """
        keys = (key, marker_key(key, attempt.task_id), waiting_key(key))
        return bool(self._call(self._discard, keys, [*attempt.args(), "x" if drop_later else ""]))

    # -- the worker -----------------------------------------------------------------------------

    def begin(
        self,
        key: str,
        attempt: Attempt,
        owner: str,
        proof: str,
        marker_ttl_ms: int,
        *,
        release: bool = False,
        evict: str = "",
    ) -> list[Any]:
        """Mark a copy running (see BEGIN_SCRIPT); return the verdict and its details."""
        task_id = attempt.task_id
        keys = (key, marker_key(key, task_id), former_marker_key(key, task_id), waiting_key(key))
        args = [*attempt.args(), owner, proof, marker_ttl_ms, "1" if release else "", evict]
        reply = self._call(self._begin, keys, args)
        return [_text(part) if isinstance(part, bytes) else part for part in reply]

    def end(self, key: str, attempt: Attempt, owner: str, outcome: Outcome, *, leave_done: bool) -> bool:
        """End a run (see END_SCRIPT); return whether the lock was released."""
        keys = (key, marker_key(key, attempt.task_id))
        args = (*attempt.args(), owner, outcome, "1" if leave_done else "")
        if self._own is None:
            return bool(self._call(self._end, keys, args))
        try:
            return bool(self._own_call(self._end, keys, args))
        except AcquireError as failure:
            raise failure.error from None

    def continue_(self, key: str, attempt: Attempt) -> bool:
        """Say that ``attempt``, a retry or replacement, was published (see CONTINUE_SCRIPT)."""
        keys = (key, marker_key(key, attempt.task_id))
        return bool(self._call(self._continue, keys, attempt.args()))

    def heartbeat(self, markers: Iterable[tuple[str, str]], ttl_ms: int) -> None:
        """Renew each ``(marker key, value)`` this process holds.

        One pipelined round trip on one server; one call per marker on a
        Cluster, where markers live in many slots.
        """
        if self.cluster:
            for marker, value in markers:
                self._call(self._heartbeat, (marker,), (value, ttl_ms))
            return
        pipe = self.client.pipeline(transaction=False)
        for marker, value in markers:
            self._heartbeat(keys=[marker], args=[value, ttl_ms], client=pipe)
        pipe.execute()

    # -- reading --------------------------------------------------------------------------------

    def release(self, key: str, task_id: str, nonce: str = "") -> bool:
        """Delete the lock if ``task_id`` holds it and no copy of it runs or waits; return whether it did."""
        return self.discard(key, Attempt(task_id, nonce=nonce), drop_later=False)

    def holder(self, key: str) -> str | None:
        """Return the id of the task holding the lock, or None."""
        return _text(self.client.get(key))

    def marker(self, key: str, task_id: str) -> str | None:
        """Return the marker of ``task_id`` under ``key``, or None."""
        return _text(self.client.get(marker_key(key, task_id)))

    def ttl_ms(self, key: str) -> int | None:
        """Return the lock's remaining life in milliseconds, or None if it is gone."""
        ttl = int(self.client.pttl(key))
        return None if ttl == -2 else ttl

    # -- I/O ------------------------------------------------------------------------------------

    def _call(self, script: Any, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        # EVALSHA first; a server that lost its scripts gets the script
        # itself (EVAL, which caches it there). Every script is safe to send
        # twice, so redis-py's retry of a dropped connection (and a Cluster's
        # redirection) is harmless. Not SCRIPT LOAD: on a Cluster redis-py
        # sends it to every primary, and one that is down would fail a call
        # that never needed it.
        try:
            return self.client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return self.client.eval(script.script, len(keys), *keys, *args)

    def _own_call(self, script: Any, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        assert self._own is not None
        parts = (*(k.encode() for k in keys), *(_arg(a) for a in args))
        shape = (script.sha, len(keys), len(args))
        head = self._heads.get(shape)
        if head is None:
            head = self._heads[shape] = _head(*shape)
        command = [_packed(head, parts)]
        return _evalsha_on_own_connection(self._own, script, command)


class _OwnConnections:
    """Connections of the hot paths' own: a free list, so threads and greenlets share a few.

    The enqueue path's one round trip writes a pre-packed ``EVALSHA`` and
    reads the reply on a connection nothing else uses while it is out, so it
    needs neither the pool's checkout (which polls the socket) nor its
    bookkeeping, and it knows whether a failed command could have reached the
    server. Connections are built from the pool's own class and settings
    (TLS, unix socket, ACL user, database, timeouts), taken from and given
    back to a free list, never more out at once than the pool's
    ``max_connections``: a gevent producer running hundreds of greenlets
    reuses a few instead of opening one per greenlet. A forked child never writes on its parent's
    sockets: it starts with a free list of its own.
    """

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._limit = int(getattr(pool, "max_connections", 50) or 50)
        self._timeout = pool.connection_kwargs.get("socket_timeout") or 5.0
        self._forked()

    def _forked(self) -> None:
        self._pid = os.getpid()
        self._free: list[Any] = []
        self._slots = threading.BoundedSemaphore(min(self._limit, 1024))

    def take(self) -> Any:
        if self._pid != os.getpid():
            self._forked()
        # No more out at once than the limit: a call beyond it waits for one
        # to come back, as redis-py's blocking pool makes it wait.
        if not self._slots.acquire(timeout=self._timeout):
            raise AcquireError(redis.ConnectionError("no free lock-store connection"), maybe_applied=False)
        try:
            return self._free.pop()
        except IndexError:
            return self._pool.connection_class(**self._pool.connection_kwargs)

    def give_back(self, connection: Any) -> None:
        if self._pid == os.getpid():
            self._free.append(connection)
            self._slots.release()


def _packed(head: bytes, parts: tuple[bytes, ...]) -> bytes:
    # RESP bulk strings after a pre-packed head: the command, its script's
    # sha and its key count never change.
    return head + b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)


def _head(sha: str, keys: int, args: int) -> bytes:
    return b"*%d\r\n$7\r\nEVALSHA\r\n$%d\r\n%s\r\n$%d\r\n%d\r\n" % (
        3 + keys + args, len(sha), sha.encode(), len(str(keys)), keys
    )


def _evalsha_on_own_connection(connections: _OwnConnections, script: Any, command: list[bytes]) -> Any:
    # A connection dropped after the command was sent (a restarted server, a
    # socket closed by a proxy or by the server's idle timeout) is retried
    # once on a fresh one: the scripts are safe to send twice. A timeout is
    # not retried, and its socket is closed so that a late reply is never
    # read as another command's.
    connection = connections.take()
    for attempt in (1, 2):
        try:
            connection.connect()  # at once if connected
        except redis.RedisError as exc:
            # Refused, unresolvable, timed out connecting or refused
            # authentication: nothing was sent on this attempt, and a first
            # attempt that was sent ended in a retry.
            connection.disconnect()
            connections.give_back(connection)
            raise AcquireError(exc, maybe_applied=attempt > 1) from exc
        try:
            try:
                connection.send_packed_command(command, check_health=False)
                reply = connection.read_response()
            except NoScriptError:
                # A restarted server or a SCRIPT FLUSH: load it, run it again.
                connection.send_command("SCRIPT", "LOAD", script.script, check_health=False)
                connection.read_response()
                connection.send_packed_command(command, check_health=False)
                reply = connection.read_response()
        except redis.ConnectionError as exc:
            connection.disconnect()
            if attempt == 1 and not isinstance(exc, redis.AuthenticationError):
                continue
            connections.give_back(connection)
            raise AcquireError(exc, maybe_applied=True) from exc
        except redis.ResponseError as exc:
            connections.give_back(connection)
            raise AcquireError(exc, maybe_applied=True) from exc
        except BaseException as exc:
            connection.disconnect()
            connections.give_back(connection)
            if isinstance(exc, redis.RedisError):
                raise AcquireError(exc, maybe_applied=True) from exc
            raise
        connections.give_back(connection)
        return reply
    raise AcquireError(redis.ConnectionError("no attempt left"), maybe_applied=True)  # pragma: no cover


def _arg(value: str | int) -> bytes:
    return value.encode() if isinstance(value, str) else b"%d" % value


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def marker_says_running(marker: Any) -> bool:
    """Whether the marker value ``marker`` (as stored, or None) says a copy of its task runs."""
    if isinstance(marker, bytes):
        return marker.startswith(b"r|")
    return isinstance(marker, str) and marker.startswith("r|")


#: ENQUEUE_SCRIPT's sha: the transport sends it on the broker's connections.
ENQUEUE_SHA = hashlib.sha1(LockStore.ENQUEUE_SCRIPT.encode()).hexdigest()


def enqueue_locked(
    client: Any,
    queue_key: str,
    message: bytes | str,
    ticket: Ticket,
    broker_db: int,
    expire: tuple[Sequence[str], int] | None = None,
) -> str | None:
    """Run ENQUEUE_SCRIPT on ``client`` (the broker's, on ``broker_db``); None if queued, else the holder.

    ``expire``: the queue's lists and their expiry in milliseconds, for a
    queue declared with one. Redis errors propagate to the caller (kombu
    retries a publish after a lost connection: the script is safe to resend).
    """
    keys: list[str] = [queue_key, ticket.key]
    if ticket.nonce:
        keys += [marker_key(ticket.key, ticket.task_id), former_marker_key(ticket.key, ticket.task_id)]
    expire_ms = ""
    if expire is not None:
        keys += expire[0]
        expire_ms = str(expire[1])
    lock_db = "" if ticket.db == broker_db else str(ticket.db)
    args = (message, ticket.task_id, ticket.ttl_ms, ticket.nonce, lock_db, broker_db, expire_ms)
    try:
        reply = client.evalsha(ENQUEUE_SHA, len(keys), *keys, *args)
    except NoScriptError:
        reply = client.eval(LockStore.ENQUEUE_SCRIPT, len(keys), *keys, *args)
    return _text(reply)
