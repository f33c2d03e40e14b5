"""A model of the lock protocol (docs/protocol.md), run against the package's own scripts.

``ProtocolMachine`` is a hypothesis state machine. Its rules are what
producers, brokers, workers and operators do to one call's lock: enqueue
(with a generated or a reused, caller-chosen id), the holder check,
redelivery of a message (Redis restoring it, RabbitMQ redelivering it),
a copy's beginning, its body storing a result, its end with each outcome,
a retry, a crash, the death reported by the worker's main process, a
revoke, a purge, a reap, time passing (unrenewed markers expire) and the
lock's TTL passing, and a call that replaces a holder not begun yet
(``on_duplicate="replace"``, a debounce), or waits for one that has begun
(``unique_while_running="queue_one"``), and a call with ``unique_limit``
(ACQUIRE_SLOT_SCRIPT over the slots of a key of its own, whose copies
begin and end on the slot they took). A call is a throttle
(``unique_until="expiry"``) or not. A command's reply may be lost: the client sends it again. An enqueue goes
through ACQUIRE_SCRIPT (the lock, then a publish) or ENQUEUE_SCRIPT (the
opt-in transport: lock and message in one script, the queue in a database of
its own), and the queue must hold exactly one message per call accepted that way. Each rule
calls :class:`celery_unique.lock.LockStore` on a real Redis, and after
every step the machine checks invariants 1-9 of docs/protocol.md against
what Redis holds and what the model knows.

The model runs a copy *unmarked* only where a worker would: a first copy of
its message that no redelivery has touched. Every other copy is marked.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, ClassVar

import redis
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from celery_unique import execution, holders
from celery_unique.keys import marker_key, slot_keys, waiting_key
from celery_unique.lock import KEEP, REQUEUE, Attempt, LockStore, Ticket, enqueue_locked

PREFIX = "model"
KEY = f"{PREFIX}:celery:model.task:digest"
#: Another call's lock, in the batches of the bulk enqueue (deleted after each).
OTHER_KEY = f"{PREFIX}:celery:model.task:other"
# Long enough that no key expires by itself while an example runs, even on a
# loaded machine: time passes only when a rule says so.
LOCK_TTL_MS = 300_000
MARKER_TTL_MS = 30_000
CHOSEN_IDS = ("chosen-1", "chosen-2")
#: The key of the calls sent with unique_limit (at most LIMITS[-1] slots), and its slots.
LIMIT_KEY = f"{PREFIX}:celery:model.task:limited"
LIMITS = (2, 3)
LIMIT_SLOTS = tuple(slot_keys(LIMIT_KEY, LIMITS[-1]))
#: Where the one call waits that runs after KEY's holder (unique_while_running="queue_one").
WAITING_KEY = waiting_key(KEY)
#: The queue of ENQUEUE_SCRIPT's messages, in a database beside the model's locks.
QUEUE = "model-queue"


@dataclass
class Copy:
    """One message of one attempt of one task id, as the model follows it."""

    number: int
    task_id: str
    nonce: str
    nesting: int = 0
    retries: int = 0
    marked: bool = False
    #: queued, running, ending (its result stored), ended, crashed, dropped, purged
    state: str = "queued"
    owner: str = ""
    #: The marker value a marked running copy holds.
    marker: str = ""
    #: Set when the worker ran it although the lock was gone (a "stray" run).
    stray: bool = False
    #: Set once its body finished and Celery stored the state (it may die before its end).
    stored: bool = False
    #: Set when it died after publishing its retry, before saying so (CONTINUE).
    died_continuing: bool = False
    #: The lock its message carries: KEY, or the slot of LIMIT_KEY its call took.
    key: str = KEY

    @property
    def attempt(self) -> Attempt:
        return Attempt(self.task_id, self.nesting, self.retries, self.nonce)

    @property
    def attempt_key(self) -> tuple[str, str, int, int]:
        return (self.task_id, self.nonce, self.nesting, self.retries)


@dataclass
class Incarnation:
    """An accepted call: a task id with the nonce of its acquire."""

    task_id: str
    nonce: str
    #: "expiry" for a throttle; otherwise the end rule draws "success" or "finish".
    until: str = "success"
    revoked: bool = False
    #: Sent with on_duplicate="replace": a later call may replace it before it begins; its copies are marked.
    replaceable: bool = False
    #: A later call replaced it (REPLACE_SCRIPT): no copy of it may run.
    replaced: bool = False
    #: It waits for KEY in WAITING_KEY (queue_one), until a copy of it takes the lock as it begins.
    waits: bool = False
    #: Its lock's TTL passed (or the lock was taken over): best effort from then on.
    expired: bool = False
    #: Its chosen id was enqueued again: a copy of an attempt of it that ended
    #: or was revoked is still dropped; any other copy runs unmarked.
    superseded: bool = False
    #: The state the result backend holds.
    stored: str | None = None
    ended_attempts: set[tuple[int, int]] = field(default_factory=set)
    latest: tuple[int, int] = (0, 0)
    #: The lock it holds: KEY, or the slot of LIMIT_KEY it took (unique_limit).
    key: str = KEY


class ProtocolMachine(RuleBasedStateMachine):
    """The lock protocol's moving parts, driven against a real Redis."""

    client: redis.Redis
    #: The script a mutation test replaces, by LockStore attribute name, and its new text.
    mutations: ClassVar[dict[str, str]] = {}

    def __init__(self) -> None:
        super().__init__()
        self.client.flushdb()
        self.store = LockStore(self.client)
        kwargs = self.client.connection_pool.connection_kwargs
        self.lock_db = int(kwargs.get("db") or 0)
        self.queue_db = self.lock_db - 1
        self.queue = redis.Redis(host=kwargs["host"], port=kwargs["port"], db=self.queue_db)
        self.queue.delete(QUEUE)
        #: Calls that ENQUEUE_SCRIPT accepted: each left one message.
        self.enqueued = 0
        for name, script in self.mutations.items():
            setattr(self.store, name, self.client.register_script(script))
        self.copies: list[Copy] = []
        #: Copies that published a retry, and whether they raise it (throw).
        self.pending_throw: dict[int, bool] = {}
        self.calls: dict[tuple[str, str], Incarnation] = {}
        self.numbers = itertools.count()
        self.generated = itertools.count()
        #: The last call that REPLACE put in WAITING_KEY: the only one that may wait.
        self.latest_waiting: Incarnation | None = None

    # -- helpers --------------------------------------------------------------------------------

    def holder(self, key: str = KEY) -> str | None:
        value = self.client.get(key)
        return value.decode() if value is not None else None

    def current(self, task_id: str | None) -> Incarnation | None:
        """The incarnation of ``task_id`` on KEY that no TTL, reuse, revoke or replace has ended."""
        return next(
            (c for c in self.calls.values()
             if c.task_id == task_id and c.key == KEY
             and not (c.expired or c.superseded or c.revoked or c.replaced)),
            None,
        )

    def call_of(self, copy: Copy) -> Incarnation:
        return self.calls[(copy.task_id, copy.nonce)]

    def live(self, copy: Copy) -> bool:
        return not self.call_of(copy).expired

    def assert_nothing_pending(self, call: Incarnation, how: str) -> None:
        """A lock given away (take-over, reap) leaves no copy of its holder that will still run.

        A queued copy of an attempt that ended, or that a marked copy is
        finishing, is held back or dropped when it begins. One of an attempt
        whose body finished, stored its state, and died before its end (the
        whole worker killed) may run again: Celery's at-least-once
        redelivery of finished work, outside the protocol (docs/protocol.md).
        """
        mine = [c for c in self.copies if (c.task_id, c.nonce) == (call.task_id, call.nonce) and not c.stray]
        finishing = {c.attempt_key for c in mine if (c.state == "ending" and c.marker) or c.stored}
        pending = [
            c for c in mine
            if c.state == "running"
            or (c.state == "queued" and not call.revoked and c.attempt_key not in finishing
                and (c.nesting, c.retries) not in call.ended_attempts)
        ]
        assert not pending, f"{how} gave the lock away while {pending} will still run"

    def assert_let_go(self, call: Incarnation, how: str) -> None:
        """Invariant 3, no hang: a call that succeeded, ended and runs nowhere holds no lock."""
        if call.expired or call.superseded or call.revoked or call.replaced or call.until == "expiry":
            return
        if call.latest not in call.ended_attempts or call.stored != "SUCCESS":
            return
        busy = [
            c for c in self.copies_in("running", "continuing", "ending", "crashed")
            if (c.task_id, c.nonce) == (call.task_id, call.nonce)
        ]
        if not busy:
            held = self.holder(call.key)
            assert held != call.task_id, f"{how}: {call} succeeded and ended, and its lock stays"

    def copies_in(self, *states: str) -> list[Copy]:
        return [c for c in self.copies if c.state in states]

    def new_copy(self, task_id: str, nonce: str, **fields: Any) -> Copy:
        copy = Copy(next(self.numbers), task_id, nonce, **fields)
        self.copies.append(copy)
        return copy

    # -- producers ------------------------------------------------------------------------------

    @rule(chosen=st.sampled_from((None, *CHOSEN_IDS)), resend=st.booleans(),
          throttle=st.sampled_from((False, False, False, True)), bulk=st.booleans())
    def enqueue(self, chosen: str | None, resend: bool, throttle: bool, bulk: bool = False) -> None:
        """A producer's unique call, alone or in a batch (ACQUIRE_MANY), its reply maybe lost and resent."""
        task_id = chosen or f"gen-{next(self.generated)}"
        nonce = f"n{next(self.numbers)}" if chosen else ""
        before = self.holder()

        def take() -> str | None:
            if not bulk:
                return self.store.acquire(KEY, task_id, LOCK_TTL_MS, nonce if chosen else None)
            # A batch: this call between two of another key, the second the
            # same call as the first (refused by it).
            claims = [(OTHER_KEY, "other", LOCK_TTL_MS, None), (KEY, task_id, LOCK_TTL_MS, nonce or None),
                      (OTHER_KEY, "another", LOCK_TTL_MS, None)]
            _other, answer, repeat = self.store.acquire_many(claims)
            assert repeat == "other", f"a repeat inside the batch answered {repeat!r}"
            return answer

        holder = take()
        if resend:
            again = take()
            assert again == holder, f"a resent acquire answered {again!r}, the first {holder!r}"
        self.client.delete(OTHER_KEY)
        self.accepted(task_id, nonce, throttle, before, holder)

    @rule(chosen=st.sampled_from((None, *CHOSEN_IDS)), resend=st.booleans(),
          throttle=st.sampled_from((False, False, False, True)))
    def enqueue_atomically(self, chosen: str | None, resend: bool, throttle: bool) -> None:
        """A unique call through the transport: lock and message in one script, maybe resent."""
        task_id = chosen or f"gen-{next(self.generated)}"
        nonce = f"n{next(self.numbers)}" if chosen else ""
        before = self.holder()
        queued = self.queue.llen(QUEUE)
        ticket = Ticket(KEY, task_id, LOCK_TTL_MS, nonce, self.lock_db)
        message = f"message of {task_id}/{nonce}"
        holder = enqueue_locked(self.queue, QUEUE, message, ticket, self.queue_db)
        if resend:
            again = enqueue_locked(self.queue, QUEUE, message, ticket, self.queue_db)
            assert again == holder, f"a resent enqueue answered {again!r}, the first {holder!r}"
        pushed = self.queue.llen(QUEUE) - queued
        assert pushed == (1 if holder is None else 0), f"{pushed} messages for {task_id}, holder {holder!r}"
        if holder is None:
            self.enqueued += 1
        self.accepted(task_id, nonce, throttle, before, holder)

    def accepted(self, task_id: str, nonce: str, throttle: bool, before: str | None,
                 holder: str | None) -> None:
        """Follow an enqueue's answer: a refusal names the holder; an acceptance is a new incarnation."""
        if before is None:
            assert holder is None, f"a free lock refused {task_id}: {holder!r}"
        if holder is not None:
            assert holder == before
            return
        self.incarnate(task_id, nonce, throttle, KEY)

    def incarnate(self, task_id: str, nonce: str, throttle: bool, key: str) -> None:
        """A new incarnation holds ``key``, with one queued copy."""
        for (other, _), call in self.calls.items():
            if other == task_id and call.key == key:
                # A reused id: the old incarnation's lock is gone. Its ended or
                # revoked state is kept aside for one incarnation, no more.
                call.expired = call.expired or call.superseded
                call.superseded = True
        until = "expiry" if throttle else "success"
        self.calls[(task_id, nonce)] = Incarnation(task_id, nonce, until, key=key)
        self.new_copy(task_id, nonce, key=key)

    @rule(resend=st.booleans(), throttle=st.sampled_from((False, False, False, True)),
          queue_one=st.booleans())
    def enqueue_replacing(self, resend: bool, throttle: bool, queue_one: bool = False) -> None:
        """A call with on_duplicate="replace" (REPLACE_SCRIPT): it replaces a holder that has not begun.

        Under ``queue_one`` a holder that has begun does not refuse it: it
        waits in WAITING_KEY, replacing the call that waited there.
        """
        task_id, nonce = f"gen-{next(self.generated)}", f"n{next(self.numbers)}"
        before, waiting = self.holder(), self.holder(WAITING_KEY)
        held, waiter = self.current(before), self.current(waiting)
        answer = self.store.replace(KEY, task_id, LOCK_TTL_MS, nonce, queue_one=queue_one)
        if resend:
            again = self.store.replace(KEY, task_id, LOCK_TTL_MS, nonce, queue_one=queue_one)
            assert again._replace(now_ms=0) == answer._replace(now_ms=0), (
                f"a resent replace answered {again}, the first {answer}"
            )
        if answer.holder is not None:
            assert not queue_one, f"{task_id} (queue_one) was refused by {answer.holder!r}"
            assert answer.holder == before, f"refused by {answer.holder!r}, but {before!r} held the lock"
            if held is not None and held.replaceable and not self.begun(held):
                raise AssertionError(f"{task_id} was refused, though {held} had not begun")
            return
        replaceable_holder = held is not None and held.replaceable and not self.begun(held)
        if answer.waits:
            assert queue_one, f"{task_id} waits, though it was sent without queue_one"
            assert before is not None, f"{task_id} waits, though the lock was free"
            assert not replaceable_holder, f"{task_id} waits behind {held}, which it could replace"
            assert self.holder(WAITING_KEY) == task_id, f"{task_id} waits, but not in {WAITING_KEY}"
        elif before is not None:
            assert answer.replaced == before, f"took {before!r}'s lock, says it replaced {answer.replaced!r}"
            if held is not None:
                assert held.replaceable, f"replaced {held}, which was not sent to be replaced"
                assert not self.begun(held), f"replaced {held}, which had begun"
                held.replaced = True
        # Only the latest call waits: the one that waited gives way to a
        # call that waits now, or that takes the free lock.
        if queue_one and waiting is not None and (answer.waits or before is None):
            assert answer.replaced == waiting, f"{task_id} left {waiting!r} waiting: {answer}"
            if waiter is not None:
                assert not self.begun(waiter), f"replaced {waiter}, which had begun"
                waiter.replaced = True
        call = self.calls[(task_id, nonce)] = Incarnation(
            task_id, nonce, "expiry" if throttle else "success", replaceable=True, waits=answer.waits
        )
        if answer.waits:
            self.latest_waiting = call
        self.new_copy(task_id, nonce, marked=True)

    @rule(chosen=st.sampled_from((None, *CHOSEN_IDS)), resend=st.booleans(),
          throttle=st.sampled_from((False, False, False, True)), limit=st.sampled_from(LIMITS))
    def enqueue_limited(self, chosen: str | None, resend: bool, throttle: bool, limit: int) -> None:
        """A call with unique_limit (ACQUIRE_SLOT), maybe resent; refused, it takes over a finished slot."""
        # Calls of one key share one limit (docs/protocol.md, "Bounds"): a
        # chosen id under a lower limit could hold a slot above it too.
        # Generated ids, which never repeat, mix limits safely.
        limit = LIMITS[-1] if chosen else limit
        task_id = chosen or f"gen-{next(self.generated)}"
        nonce = f"n{next(self.numbers)}" if chosen else ""
        slots = LIMIT_SLOTS[:limit]
        before = {slot: self.holder(slot) for slot in slots}
        answer = self.store.acquire_slot(LIMIT_KEY, limit, task_id, LOCK_TTL_MS, nonce or None)
        if resend:
            again = self.store.acquire_slot(LIMIT_KEY, limit, task_id, LOCK_TTL_MS, nonce or None)
            assert again == answer, f"a resent slot acquire answered {again}, the first {answer}"
        own = [slot for slot, held in before.items() if held == task_id]
        if answer.key is not None:
            assert not own, f"{task_id} took {answer.key} while it held {own}"
            free = [slot for slot, held in before.items() if held is None]
            assert free, f"{task_id} took {answer.key}, though {before} held every slot"
            assert answer.key == free[0], f"{task_id} took {answer.key}, not the first free of {before}"
            self.incarnate(task_id, nonce, throttle, answer.key)
            return
        if own:
            assert chosen, f"generated {task_id} in {own} was refused: {answer}"
            assert answer.holders == ((own[0], task_id),), f"{task_id} in {own} answered {answer}"
            return
        assert dict(answer.holders) == before, f"refused by {answer.holders}, but {before} held the slots"
        # The holder check, as decide_slots does it: the first finished holder's slot.
        for slot, held in answer.holders:
            call = self.finished_slot_holder(slot, held)
            if call is None:
                continue
            others = tuple(other for other in slots if other != slot) if chosen else ()
            if self.store.take_over(slot, held, task_id, LOCK_TTL_MS, nonce or None, others=others) is None:
                self.assert_nothing_pending(call, "the slot's holder check")
                call.expired = True
                self.incarnate(task_id, nonce, throttle, slot)
                return

    def finished_slots(self) -> list[tuple[str, str]]:
        """Every ``(slot, holder)`` of LIMIT_KEY whose holder the result backend says finished."""
        held = [(slot, self.holder(slot)) for slot in LIMIT_SLOTS]
        return [(slot, h) for slot, h in held if h is not None and self.finished_slot_holder(slot, h)]

    @precondition(lambda self: self.finished_slots())
    @rule(data=st.data(), chosen=st.sampled_from((None, *CHOSEN_IDS)), limit=st.sampled_from(LIMITS))
    def slot_take_over(self, data: st.DataObject, chosen: str | None, limit: int) -> None:
        """A call refused by full slots takes a finished slot over, after another call of its id took one."""
        limit = LIMITS[-1] if chosen else limit  # one limit per key for a chosen id, as in enqueue_limited
        slots = LIMIT_SLOTS[:limit]
        finished = [(slot, held) for slot, held in self.finished_slots() if slot in slots]
        if not finished:
            return
        slot, held = data.draw(st.sampled_from(finished))
        task_id = chosen or f"gen-{next(self.generated)}"
        nonce = f"n{next(self.numbers)}" if chosen else ""
        own = [other for other in slots if self.holder(other) == task_id]
        others = tuple(other for other in slots if other != slot) if chosen else ()
        if self.store.take_over(slot, held, task_id, LOCK_TTL_MS, nonce or None, others=others) is None:
            assert not own, f"{task_id} took {slot} over while it held {own}"
            call = self.finished_slot_holder(slot, held)
            assert call is not None
            self.assert_nothing_pending(call, "a late slot take-over")
            call.expired = True
            self.incarnate(task_id, nonce, False, slot)

    def finished_slot_holder(self, slot: str, held: str) -> Incarnation | None:
        """The incarnation holding ``slot``, if the result backend says it finished (never a throttle)."""
        for call in self.calls.values():
            if call.task_id == held and call.key == slot and not (call.expired or call.superseded):
                if call.until == "expiry":
                    return None
                return call if call.stored in ("SUCCESS", "FAILURE") else None
        return None

    def begun(self, call: Incarnation) -> bool:
        """Whether a copy of ``call`` ever began (held a marker, ran, ended), or a retry of it is out."""
        mine = [c for c in self.copies if (c.task_id, c.nonce) == (call.task_id, call.nonce)]
        return bool(call.latest != (0, 0) or call.ended_attempts or any(
            c.marker or c.stray or c.state not in ("queued", "dropped", "purged") for c in mine
        ))

    def finished_holder(self) -> Incarnation | None:
        """The current incarnation holding the lock, if the result backend says it finished."""
        held = self.holder()
        for call in self.calls.values():
            if call.task_id == held and call.key == KEY and not (call.expired or call.superseded):
                # A throttle's producer and reaper ask holders.finished, which never says yes.
                if call.until == "expiry" and not holders.finished(call.stored, call.until):
                    return None
                return call if call.stored in ("SUCCESS", "FAILURE") else None
        return None

    @precondition(lambda self: self.finished_holder() is not None)
    @rule(resend=st.booleans(), replaceable=st.booleans())
    def holder_check(self, resend: bool, replaceable: bool = False) -> None:
        """A refused call takes a finished holder's lock over, as the producer does (a debounce's too)."""
        held = self.holder()
        call = self.finished_holder()
        if held is None or call is None:
            return
        new = f"gen-{next(self.generated)}"
        # A debounce's call has a nonce and stays replaceable until it begins.
        nonce = f"n{next(self.numbers)}" if replaceable else None
        answer = self.store.take_over(KEY, held, new, LOCK_TTL_MS, nonce, replaceable=replaceable)
        if resend:
            again = self.store.take_over(KEY, held, new, LOCK_TTL_MS, nonce, replaceable=replaceable)
            assert again == answer, f"a resent take-over answered {again!r}, the first {answer!r}"
        if answer is None:
            self.assert_nothing_pending(call, "the holder check")
            call.expired = True  # its lock went to the new call
            self.calls[(new, nonce or "")] = Incarnation(new, nonce or "", replaceable=replaceable)
            self.new_copy(new, nonce or "", marked=replaceable)

    # -- the broker -----------------------------------------------------------------------------

    @precondition(lambda self: self.copies_in("queued", "running"))
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        """The broker delivers another copy of a message: both copies are now marked."""
        # A running copy's message is still unacknowledged only if the run
        # was marked (late acknowledgement marks it before any copy appears).
        candidates = [c for c in self.copies_in("queued", "running") if c.state == "queued" or c.marked]
        if not candidates:
            return
        original = data.draw(st.sampled_from(candidates))
        original.marked = True
        self.new_copy(original.task_id, original.nonce, nesting=original.nesting,
                      retries=original.retries, marked=True, key=original.key)

    # -- workers --------------------------------------------------------------------------------

    @precondition(lambda self: self.copies_in("queued"))
    @rule(data=st.data(), resend=st.booleans())
    def begin(self, data: st.DataObject, resend: bool) -> None:
        """A worker begins a copy: unmarked if it is its message's only copy, else BEGIN."""
        copy = data.draw(st.sampled_from(self.copies_in("queued")))
        call = self.call_of(copy)
        copy.owner = f"worker/{copy.number}"
        if call.revoked:
            # Celery discards a revoked task's message and says so (task_revoked).
            copy.state = "dropped"
            self.store.discard(copy.key, copy.attempt, drop_later=True)
            return
        if not copy.marked:
            self.assert_may_run(copy, "an unmarked copy")
            copy.state = "running"
            return
        reply = self.store.begin(copy.key, copy.attempt, copy.owner, "other-machine:1", MARKER_TTL_MS)
        if resend:
            again = self.store.begin(copy.key, copy.attempt, copy.owner, "other-machine:1", MARKER_TTL_MS)
            assert again[0] == reply[0] or (reply[0] == "run" and again[0] == "run"), (reply, again)
        verdict = reply[0]
        if verdict == "run":
            self.assert_may_run(copy, "BEGIN said run")
            copy.state, copy.marker = "running", str(reply[1])
            call.waits = False  # a waiting call takes the lock as it begins
        elif verdict == "stray":
            # The lock is gone and no marker says why: only its TTL can have
            # done that, or a newer incarnation of the id took it.
            ended = (copy.nesting, copy.retries) in call.ended_attempts or call.revoked
            assert call.expired or (call.superseded and not ended), (
                f"{copy} ran unmarked (stray) though its lock's TTL has not passed"
            )
            copy.state, copy.stray = "running", True
        elif verdict == "wait":
            running = [
                c for c in self.copies_in("running", "continuing", "ending", "crashed")
                if c.attempt_key == copy.attempt_key and c.marker and c is not copy
            ]
            assert running or call.expired, f"{copy} held back with no copy of its attempt running"
            # Held back: published again with a countdown; that copy is marked too.
            copy.state = "dropped"
            self.new_copy(copy.task_id, copy.nonce, nesting=copy.nesting, retries=copy.retries, marked=True,
                          key=copy.key)
        elif verdict == "behind":
            # It waits for the lock, which another call holds: held back, as a copy that waits.
            holder = self.holder()
            assert call.waits, f"{copy} held back behind {holder!r}, though it waits for no lock"
            assert holder not in (None, copy.task_id), f"{copy} held back, though {holder!r} holds the lock"
            copy.state = "dropped"
            self.new_copy(copy.task_id, copy.nonce, nesting=copy.nesting, retries=copy.retries, marked=True,
                          key=copy.key)
        elif verdict == "skip":
            assert (
                call.expired
                or (copy.nesting, copy.retries) in call.ended_attempts
                or call.latest > (copy.nesting, copy.retries)
            ), f"{copy} skipped though its attempt never ended"
            copy.state = "dropped"
        elif verdict == "drop":
            assert call.revoked or call.replaced or call.expired, (
                f"{copy} dropped though it was never revoked, purged or replaced"
            )
            copy.state = "dropped"
        else:
            raise AssertionError(f"unknown verdict {reply!r}")

    def assert_may_run(self, copy: Copy, how: str) -> None:
        """Invariant 1: no other copy of the attempt runs, and the attempt has not ended."""
        call = self.call_of(copy)
        if call.expired:
            return
        # A continuing copy has published its retry or replacement: only a
        # copy of that same attempt would run its body twice.
        others = [
            c for c in self.copies_in("running", "continuing", "ending")
            if c.task_id == copy.task_id and c.nonce == copy.nonce and not c.stray and c is not copy
            and (c.state != "continuing" or c.attempt_key == copy.attempt_key)
        ]
        assert not others, f"{how}: {copy} runs beside {others}"
        assert (copy.nesting, copy.retries) not in call.ended_attempts, f"{how}: {copy} ran again"
        assert not call.revoked, f"{how}: revoked {copy} runs"
        assert not call.replaced, f"{how}: {copy} runs, though a later call replaced it"

    @precondition(lambda self: self.copies_in("running"))
    @rule(data=st.data(), state=st.sampled_from(("SUCCESS", "FAILURE")))
    def store_result(self, data: st.DataObject, state: str) -> None:
        """A body returns (or fails for good) and Celery stores its state, before the run's end."""
        copy = data.draw(st.sampled_from(self.copies_in("running")))
        copy.state, copy.stored = "ending", True
        call = self.call_of(copy)
        if not copy.stray:
            call.stored = state

    @precondition(lambda self: self.copies_in("ending"))
    @rule(data=st.data(), until=st.sampled_from(("success", "finish")), resend=st.booleans())
    def end(self, data: st.DataObject, until: str, resend: bool) -> None:
        """A run's end (END_SCRIPT), as its stored state and mode say."""
        copy = data.draw(st.sampled_from(self.copies_in("ending")))
        call = self.call_of(copy)
        mode = "expiry" if call.until == "expiry" else until
        outcome = execution.settled(mode, succeeded=call.stored == "SUCCESS")
        copy.state = "ended"
        if not copy.stray:
            call.ended_attempts.add((copy.nesting, copy.retries))
        marked = bool(copy.marker)
        if not marked and outcome == KEEP:
            return  # the worker sends nothing
        for _ in range(2 if resend else 1):
            self.store.end(copy.key, copy.attempt, copy.owner, outcome, leave_done=marked)
        if not copy.stray:
            self.assert_let_go(call, "END")

    @precondition(lambda self: [c for c in self.copies_in("running") if not c.stray])
    @rule(data=st.data(), marked=st.booleans(), throw=st.booleans())
    def retry(self, data: st.DataObject, marked: bool, throw: bool) -> None:
        """The body calls self.retry(): the retry is published, then CONTINUE; the attempt ends.

        With ``throw=False`` the body returns after the retry, and Celery
        stores SUCCESS for the attempt that retried.
        """
        copy = data.draw(st.sampled_from([c for c in self.copies_in("running") if not c.stray]))
        call = self.call_of(copy)
        attempt = (copy.nesting, copy.retries + 1)
        # A replaceable call's retry carries its header: its runs are marked too.
        marked = marked or call.replaceable
        self.new_copy(copy.task_id, copy.nonce, nesting=attempt[0], retries=attempt[1], marked=marked,
                      key=copy.key)
        call.latest = max(call.latest, attempt)
        # The retry is published; CONTINUE follows (``continued``), and the
        # retry may begin, even end, in between.
        copy.state = "continuing"
        self.pending_throw[copy.number] = throw

    @precondition(lambda self: self.copies_in("continuing"))
    @rule(data=st.data())
    def continued(self, data: st.DataObject) -> None:
        """The attempt that published a retry says so (CONTINUE); its body then returns."""
        copy = data.draw(st.sampled_from(self.copies_in("continuing")))
        call = self.call_of(copy)
        self.store.continue_(copy.key, Attempt(copy.task_id, copy.nesting, copy.retries + 1, copy.nonce))
        throw = self.pending_throw.pop(copy.number)
        if call.latest == (copy.nesting, copy.retries + 1):
            call.stored = "RETRY" if throw else "SUCCESS"
        copy.state = "ended"  # its end sends nothing
        call.ended_attempts.add((copy.nesting, copy.retries))
        self.assert_let_go(call, "CONTINUE")

    @precondition(lambda self: self.copies_in("running", "continuing", "ending"))
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        """A worker dies mid-run: its marker is renewed no more, and nothing ends the run."""
        copy = data.draw(st.sampled_from(self.copies_in("running", "continuing", "ending")))
        copy.died_continuing = copy.state == "continuing"
        copy.state = "crashed"

    @precondition(lambda self: [c for c in self.copies_in("crashed") if not c.stray])
    @rule(data=st.data(), requeued=st.booleans())
    def death_reported(self, data: st.DataObject, requeued: bool) -> None:
        """The main process hears its pool process died: the dead copy's marker goes first."""
        copy = data.draw(st.sampled_from([c for c in self.copies_in("crashed") if not c.stray]))
        copy.state = "dropped"
        self.store.end(copy.key, copy.attempt, copy.owner, REQUEUE, leave_done=False)
        if requeued:
            self.new_copy(copy.task_id, copy.nonce, nesting=copy.nesting, retries=copy.retries, marked=True,
                          key=copy.key)
            if copy.died_continuing:
                # Its retry is out and nothing said so: the attempt comes back
                # and may run beside its retry, as a plain task's would. Outside
                # the protocol (docs/protocol.md, "Bounds"): best effort from here.
                self.call_of(copy).expired = True
        else:
            self.store.end(copy.key, copy.attempt, copy.owner, KEEP, leave_done=True)
            # The attempt ended unless another copy of it runs (its marker stands):
            # then that copy's own end decides.
            marker = (self.client.get(marker_key(copy.key, copy.task_id)) or b"").decode()
            if marker.startswith(f"d|{copy.nesting}|{copy.retries}|{copy.nonce}|"):
                self.call_of(copy).ended_attempts.add((copy.nesting, copy.retries))

    @precondition(lambda self: self.copies_in("running", "continuing", "ending"))
    @rule()
    def heartbeat(self) -> None:
        """The keepers of live marked copies renew their markers."""
        live = self.copies_in("running", "continuing", "ending")
        markers = [(marker_key(c.key, c.task_id), c.marker) for c in live if c.marker]
        self.store.heartbeat(markers, MARKER_TTL_MS)

    # -- operators ------------------------------------------------------------------------------

    @precondition(lambda self: self.copies_in("queued"))
    @rule(data=st.data(), purge=st.booleans())
    def revoke_or_purge(self, data: st.DataObject, purge: bool) -> None:
        """A queued copy is discarded as revoked, or purged from its queue (DISCARD)."""
        copy = data.draw(st.sampled_from(self.copies_in("queued")))
        copy.state = "purged"
        call = self.call_of(copy)
        if not purge:
            # The revoke reaches every copy of the id that a worker discards.
            call.revoked = True
        released = self.store.discard(copy.key, copy.attempt, drop_later=True)
        if purge and released:
            call.revoked = True  # purged: its other copies are dropped

    @precondition(lambda self: self.finished_holder() is not None)
    @rule()
    def reap(self) -> None:
        """The reaper releases a finished holder's lock (TAKE_OVER with no new id)."""
        held = self.holder()
        call = self.finished_holder()
        if held is not None and call is not None and self.store.take_over(KEY, held, "", 0) is None:
            self.assert_nothing_pending(call, "the reaper")
            call.expired = True

    # -- time -----------------------------------------------------------------------------------

    @precondition(lambda self: any(c.marker for c in self.copies))
    @rule(seconds=st.sampled_from((40, 120)))
    def time_passes(self, seconds: int) -> None:
        """Seconds pass, fewer than the lock's TTL: live markers are renewed, shorter-lived keys expire."""
        self.heartbeat()
        alive = {c.marker for c in self.copies_in("running", "continuing", "ending") if c.marker}
        for key in self.client.scan_iter(f"{PREFIX}:run:*"):
            value = (self.client.get(key) or b"").decode()
            if value not in alive and self.client.pttl(key) < seconds * 1000:
                self.client.delete(key)

    @precondition(lambda self: len(self.copies) >= 4)
    @rule()
    def lock_expires(self) -> None:
        """The lock's TTL passes: it and every marker under it expire; best effort from then on."""
        for key in [KEY, WAITING_KEY, *LIMIT_SLOTS, *self.client.scan_iter(f"{PREFIX}:run:*")]:
            self.client.delete(key)
        for call in self.calls.values():
            call.expired = True

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def one_message_per_atomic_acceptance(self) -> None:
        """ENQUEUE_SCRIPT queued one message per call it accepted, and none for a refused one."""
        assert self.queue.llen(QUEUE) == self.enqueued

    @invariant()
    def no_release_while_a_copy_runs(self) -> None:
        """Invariant 2: a task id whose marked copy runs still holds its lock (unless its TTL passed)."""
        running = [c for c in self.copies_in("running") if not c.stray and self.live(c)]
        for copy in running:
            holder = self.holder(copy.key)
            assert holder == copy.task_id, f"{copy} runs without its lock {copy.key}: {holder!r} holds it"

    @invariant()
    def throttle_window(self) -> None:
        """Invariant 6: a throttle's lock is its own until its TTL, unless a revoke or purge dropped it."""
        for call in self.calls.values():
            # A call that waits (queue_one) holds no window yet: it takes the lock as it begins.
            dropped = call.revoked or call.replaced or call.waits
            if call.until == "expiry" and not (call.expired or call.superseded or dropped):
                holder = self.holder(call.key)
                assert holder == call.task_id, f"throttle {call} lost its lock to {holder!r} before its TTL"

    @invariant()
    def at_most_n_slots(self) -> None:
        """At most N holders per key under unique_limit=N, and one id holds at most one slot."""
        held = [value for value in self.client.mget(LIMIT_SLOTS) if value is not None]
        assert len(held) <= LIMITS[-1]
        assert len(set(held)) == len(held), f"one id holds two slots: {held}"
        # The slots are taken in order: only a slot's end or TTL frees it.
        live = [c for c in self.calls.values()
                if c.key in LIMIT_SLOTS and not (c.expired or c.superseded or c.revoked or c.replaced)
                and c.latest not in c.ended_attempts]
        assert len(live) <= LIMITS[-1], f"{len(live)} calls under the limit at once: {live}"

    @invariant()
    def one_call_runs_per_lock(self) -> None:
        """Invariant 9: the bodies of two calls of one lock never run at once (unless a TTL passed).

        A body that published its retry has handed the lock on (invariant 2):
        only a copy that still holds its lock counts.
        """
        running = {
            c.task_id for c in self.copies_in("running")
            if c.key == KEY and not c.stray and self.live(c)
        }
        assert len(running) <= 1, f"calls {sorted(running)} of one lock run at once"

    @invariant()
    def one_waiting_call_the_latest(self) -> None:
        """Invariant 9: at most one call waits for the lock, the latest to wait, and its place is its own."""
        waiting = [c for c in self.calls.values() if c.waits and self.current(c.task_id) is c]
        assert len(waiting) <= 1, f"{len(waiting)} calls wait at once: {waiting}"
        if waiting:
            latest = self.latest_waiting
            assert waiting[0] is latest, f"{waiting[0]} waits, not the latest {latest}"
            held = self.holder(WAITING_KEY)
            assert held == waiting[0].task_id, f"{waiting[0]} waits, but {held!r} holds the waiting key"
        held = self.holder(WAITING_KEY)
        if held is not None:
            call = self.current(held)
            assert call is not None, f"{held!r} holds the waiting key, but it was dropped"
            assert call.waits, f"{held!r} holds the waiting key, but it waits no more"

    @invariant()
    def bounded_residue(self) -> None:
        """Invariant 5: every key starts with the prefix, has a TTL, and no marker outlives its deadline."""
        keys = list(self.client.scan_iter("*", count=1000))
        # One round trip for every key's TTL and value: this runs after every step.
        pipe = self.client.pipeline(transaction=False)
        pipe.time()
        for key in keys:
            pipe.pttl(key)
            pipe.get(key)
        now, *replies = pipe.execute()
        now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
        for key, ttl, value in zip(keys, replies[::2], replies[1::2], strict=True):
            assert key.decode().startswith(f"{PREFIX}:"), key
            assert ttl > 0, f"{key!r} has no TTL ({ttl})"
            if key.decode() not in (KEY, WAITING_KEY, *LIMIT_SLOTS):
                deadline = int((value or b"").decode().split("|")[4])
                assert ttl <= deadline - now_ms + 50, f"{key!r} outlives its lock's deadline"
