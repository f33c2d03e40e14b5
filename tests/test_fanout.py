"""fan_out(): the unique members of groups and chord headers sent in a block lock in one round trip."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery, chain, chord, group, states
from celery.exceptions import SoftTimeLimitExceeded

from celery_unique import (
    DuplicateTaskError,
    LockStoreError,
    UniqueTask,
    UniqueValueError,
    apply_many,
    events,
    fan_out,
)
from celery_unique.lock import LockStore
from tests.conftest import wait_until
from tests.test_bulk import script_calls
from tests.test_protocol_faults import load_scripts


def key_of(tasks: SimpleNamespace, user_id: int) -> str:
    """The lock key of ``send_report(user_id)``."""
    key: str = tasks.send_report.lock_key((user_id,), {}, {})
    return key


def test_a_group_takes_every_lock_in_one_script_call(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """Thirty unique members: one script call inside fan_out(), thirty without it."""
    load_scripts(locks)
    before = script_calls(locks)
    with fan_out():
        fanned = group(tasks.send_report.s(i).set(unique=60) for i in range(30)).apply_async()
    assert script_calls(locks) - before == 1
    assert [locks.get(key_of(tasks, i)) for i in range(30)] == [r.id.encode() for r in fanned.results]
    assert broker.llen("celery") == 30
    before = script_calls(locks)
    group(tasks.send_report.s(i).set(unique=60) for i in range(30, 60)).apply_async()
    assert script_calls(locks) - before == 30


def test_a_chord_header_takes_its_locks_in_one_script_call(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """A chord's unique header members are locked together; the body waits for them as usual."""
    load_scripts(locks)
    before = script_calls(locks)
    with fan_out():
        body = chord([tasks.send_report.s(i).set(unique=60) for i in range(10)])(tasks.send_report.s())
    assert script_calls(locks) - before == 1
    assert all(locks.get(key_of(tasks, i)) is not None for i in range(10))
    assert broker.llen("celery") == 10  # the header; the body goes when it completes
    assert body.parent is not None
    assert [r.id.encode() for r in body.parent.results] == [
        locks.get(key_of(tasks, i)) for i in range(10)
    ]


def test_a_refused_member_fails_alone_and_the_block_raises_after_sending_the_rest(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """Under "raise" the refused member is FAILURE, every other member is sent, then the error is raised."""
    held = tasks.send_report.apply_async((3,), unique=60)
    with pytest.raises(DuplicateTaskError) as raised, fan_out():
        fanned = group(tasks.send_report.s(i).set(unique=60) for i in range(1, 6)).apply_async()
    assert raised.value.task_id == held.id
    refused = fanned.results[2]
    assert tasks.send_report.backend.get_state(refused.id) == states.FAILURE
    assert isinstance(refused.result, DuplicateTaskError)
    assert broker.llen("celery") == 1 + 4
    assert locks.get(key_of(tasks, 3)) == held.id.encode()


def test_a_refused_member_under_existing_is_no_error(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """Under "existing" the block does not raise; the refused member's own result still says why."""
    tasks.send_report.apply_async((2,), unique=60)
    with fan_out():
        fanned = group(
            tasks.send_report.s(i).set(unique=60, on_duplicate="existing") for i in range(1, 4)
        ).apply_async()
    assert tasks.send_report.backend.get_state(fanned.results[1].id) == states.FAILURE
    assert broker.llen("celery") == 1 + 2


def test_an_error_inside_the_block_locks_and_sends_nothing_it_deferred(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """A group sent in a block that then fails leaves no lock and no message."""
    def send_then_fail() -> None:
        with fan_out():
            group(tasks.send_report.s(i).set(unique=60) for i in range(5)).apply_async()
            raise RuntimeError("changed my mind")

    with pytest.raises(RuntimeError, match="changed my mind"):
        send_then_fail()
    assert locks.dbsize() == 0
    assert broker.llen("celery") == 0


def test_a_call_without_a_chosen_id_is_locked_and_sent_at_once(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """A plain apply_async in the block behaves as outside it: its refusal is raised where it is made."""
    with fan_out():
        first = tasks.send_report.apply_async((7,), unique=60)
        assert broker.llen("celery") == 1
        assert locks.get(key_of(tasks, 7)) == first.id.encode()
        with pytest.raises(DuplicateTaskError):
            tasks.send_report.apply_async((7,), unique=60)


def test_nested_blocks_and_chains_share_the_outer_blocks_round_trip(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """An inner block and a chain's first step join the outer block: still one script call."""
    load_scripts(locks)
    before = script_calls(locks)
    with fan_out():
        group(tasks.send_report.s(i).set(unique=60) for i in range(3)).apply_async()
        with fan_out():
            chain(tasks.send_report.si(3).set(unique=60), tasks.send_report.si(4)).apply_async()
        assert broker.llen("celery") == 0
    assert script_calls(locks) - before == 1
    assert broker.llen("celery") == 4
    assert all(locks.get(key_of(tasks, i)) is not None for i in range(4))


def test_a_worker_runs_a_chord_whose_refused_member_fails_it_promptly(
    tasks: SimpleNamespace, locks: redis.Redis, worker: Any
) -> None:
    """A real worker: a chord with a refused header member fails at once; a chord without one completes."""
    held = tasks.send_report.apply_async((2,), unique=120, countdown=60)  # member 2's lock, held a minute
    with pytest.raises(DuplicateTaskError), fan_out():
        failing = chord([tasks.send_report.s(i).set(unique=60) for i in range(4)])(tasks.send_report.s())
    with pytest.raises(Exception, match=f"duplicate refused, task {held.id} holds the lock"):
        failing.get(timeout=20)
    with fan_out():
        done = chord([tasks.send_report.s(i).set(unique=60) for i in range(10, 13)])(tasks.send_report.s())
    assert done.get(timeout=20) == "report ['report 10 daily', 'report 11 daily', 'report 12 daily'] daily"
    wait_until(lambda: all(locks.get(key_of(tasks, i)) is None for i in range(10, 13)), what="released")
    held.revoke()


def test_calls_a_raising_block_dropped_are_revoked_so_nothing_waits_on_them(
    tasks: SimpleNamespace, broker: redis.Redis
) -> None:
    """What a raising block sent never runs: their results say REVOKED; the chord fails."""
    sent: dict[str, Any] = {}

    def send_then_fail() -> None:
        with fan_out():
            sent["group"] = group(tasks.send_report.s(i).set(unique=60) for i in range(2)).apply_async()
            header = [tasks.send_report.s(i).set(unique=60) for i in range(2, 4)]
            sent["chord"] = chord(header, tasks.send_report.s()).apply_async()
            raise RuntimeError("changed my mind")

    with pytest.raises(RuntimeError):
        send_then_fail()
    assert broker.llen("celery") == 0
    assert [r.state for r in sent["group"].results] == [states.REVOKED, states.REVOKED]
    with pytest.raises(Exception, match="fan_out"):
        sent["chord"].get(timeout=10)


def test_an_inner_block_that_raises_drops_its_calls_from_the_outer_block(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """The outer block catches the inner one's error: only the calls made outside the inner one are sent."""
    with fan_out():
        kept = group(tasks.send_report.s(i).set(unique=60) for i in range(2)).apply_async()
        try:
            with fan_out():
                group(tasks.send_report.s(i).set(unique=60) for i in range(2, 5)).apply_async()
                raise RuntimeError("inner changed its mind")
        except RuntimeError:
            pass
    assert broker.llen("celery") == 2
    expected = [r.id.encode() for r in kept.results] + [None] * 3
    assert [locks.get(key_of(tasks, i)) for i in range(5)] == expected


def test_a_call_made_after_the_block_in_a_context_copied_inside_it_is_sent(
    tasks: SimpleNamespace, broker: redis.Redis
) -> None:
    """An asyncio task made in the block that sends after it ended sends at once, not into a spent batch."""

    async def later() -> Any:
        await asyncio.sleep(0.05)
        return group(tasks.send_report.s(i).set(unique=60) for i in range(3)).apply_async()

    async def main() -> Any:
        with fan_out():
            sending = asyncio.create_task(later())
        return await sending

    asyncio.run(main())
    assert broker.llen("celery") == 3


@pytest.fixture
def replacer(celery_app: Celery, tasks: SimpleNamespace) -> Any:
    """A task that replaces itself by a group of ``send_report`` calls inside a block."""

    @celery_app.task(base=UniqueTask, name="tests.fan_out_replacer", bind=True, shared=False)
    def replacer(self: UniqueTask, n: int) -> Any:
        with fan_out():
            return self.replace(group(tasks.send_report.s(i).set(unique=60) for i in range(n)))

    return replacer


def test_a_replacement_sent_in_a_block_goes_out(replacer: Any, locks: redis.Redis, worker: Any) -> None:
    """A task that replaces itself by a group inside a block: the group runs and the task's lock goes."""
    result = replacer.apply_async((3,), unique=60)
    assert result.get(timeout=15) == [f"report {i} daily" for i in range(3)]
    wait_until(lambda: locks.get(replacer.lock_key((3,), {}, {})) is None, what="the replaced task's lock")


def test_a_time_limit_stops_the_batch_and_gives_back_the_locks_not_sent(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A soft time limit at the second publish stops the batch: one message, the rest's locks given back."""
    published: list[str] = []
    real = UniqueTask._publish

    def publish(self: UniqueTask, call: Any) -> Any:
        published.append(call.lock_id)
        if len(published) == 2:
            raise SoftTimeLimitExceeded()
        return real(self, call)

    monkeypatch.setattr(UniqueTask, "_publish", publish)
    with pytest.raises(SoftTimeLimitExceeded):
        apply_many([tasks.send_report.s(i).set(unique=60) for i in range(4)])
    assert broker.llen("celery") == 1
    assert [locks.get(key_of(tasks, i)) for i in range(1, 4)] == [None] * 3


def test_an_interruption_while_the_batch_script_runs_gives_every_lock_back(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after the script took the locks, before its reply was read: no message, and no lock left."""
    real = LockStore._call

    def call(self: LockStore, script: Any, keys: Any, args: Any) -> Any:
        reply = real(self, script, keys, args)
        if script is self._acquire_many:
            raise KeyboardInterrupt
        return reply

    monkeypatch.setattr(LockStore, "_call", call)
    with pytest.raises(KeyboardInterrupt):
        apply_many([tasks.send_report.s(i).set(unique=600) for i in range(3)])
    monkeypatch.undo()
    assert broker.llen("celery") == 0
    assert [locks.get(key_of(tasks, i)) for i in range(3)] == [None] * 3


def test_a_batch_lock_store_error_is_counted_per_call(
    tasks: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose script fails counts one lock-store error per call, as single calls do."""
    counted: list[str] = []
    monkeypatch.setattr(events, "store_error", lambda task: counted.append(task.name))
    real = LockStore._call

    def call(self: LockStore, script: Any, keys: Any, args: Any) -> Any:
        if script is self._acquire_many:
            raise redis.ConnectionError("lost")
        return real(self, script, keys, args)

    monkeypatch.setattr(LockStore, "_call", call)
    outcomes = apply_many([tasks.send_report.s(i).set(unique=60) for i in range(2)])
    assert [type(outcome) for outcome in outcomes] == [LockStoreError, LockStoreError]
    assert counted == [tasks.send_report.name] * 2


def test_a_call_that_takes_no_lock_goes_out_as_it_is_made(
    tasks: SimpleNamespace, broker: redis.Redis
) -> None:
    """A UniqueTask member sent without unique= is not deferred: a block that raises has sent it already."""

    def send_then_fail() -> None:
        with fan_out():
            group(tasks.send_report.s(1), tasks.send_report.s(2).set(unique=60)).apply_async()
            raise RuntimeError("changed my mind")

    with pytest.raises(RuntimeError):
        send_then_fail()
    assert broker.llen("celery") == 1


def test_an_interruption_while_a_single_acquire_runs_gives_the_lock_back(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after a call's acquire took the lock, before its reply was read: no message, no lock left."""
    real = LockStore._own_call

    def call(self: LockStore, script: Any, keys: Any, args: Any) -> Any:
        reply = real(self, script, keys, args)
        if script is self._acquire:
            raise KeyboardInterrupt
        return reply

    monkeypatch.setattr(LockStore, "_own_call", call)
    with pytest.raises(KeyboardInterrupt):
        tasks.send_report.apply_async((1,), unique=600)
    monkeypatch.undo()
    assert broker.llen("celery") == 0
    assert locks.get(key_of(tasks, 1)) is None


def test_a_bad_option_in_a_block_sends_nothing_and_leaves_nothing_waiting(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """A bad unique value fails the block at its end: nothing locked or sent, and every result REVOKED."""
    sent: dict[str, Any] = {}

    def send() -> None:
        with fan_out():
            members = [tasks.send_report.s(1).set(unique=60), tasks.send_report.s(2).set(unique=-1)]
            sent["group"] = group(members).apply_async()

    with pytest.raises(UniqueValueError, match="send_report"):
        send()
    assert locks.dbsize() == 0
    assert broker.llen("celery") == 0
    assert [r.state for r in sent["group"].results] == [states.REVOKED, states.REVOKED]
