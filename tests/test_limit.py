"""unique_limit=N: at most N calls with one key queued or running at once, each in a slot of its own."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery, group, states

from celery_unique import (
    ConfigurationError,
    DuplicateTaskError,
    LockStoreError,
    UniqueLocks,
    UniqueTask,
    UniqueTypeError,
    UniqueValueError,
    apply_many,
    holders,
)
from celery_unique.config import lock_store
from celery_unique.keys import marker_key, parse_key, slot_key, slot_of
from celery_unique.lock import LockStore
from celery_unique.testing import RedisServer
from tests.conftest import BROKER_DB, LOCK_DB, wait_until
from tests.reply_dropper import ReplyDropper, app_behind
from tests.test_protocol_faults import load_scripts, sha

SCRATCH_DB = 5


@pytest.fixture
def scratch(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """Where the gated task waits for its gate."""
    client = redis_server.client(SCRATCH_DB)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def limited(celery_app: Celery, redis_server: RedisServer) -> SimpleNamespace:
    """A task with unique_limit=3, and a gated one with unique_limit=2 that runs until its gate opens."""
    ns = SimpleNamespace()
    url = redis_server.url(SCRATCH_DB)

    @celery_app.task(base=UniqueTask, name="tests.limit.export", unique=60, unique_limit=3, shared=False)
    def export(account: int) -> int:
        return account

    @celery_app.task(base=UniqueTask, name="tests.limit.gated", unique=60, unique_limit=2, shared=False)
    def gated(account: int) -> int:
        client = redis.Redis.from_url(url)
        client.rpush("began", account)
        client.blpop(["gate"], timeout=8)
        return account

    ns.export, ns.gated = export, gated
    return ns


def slots_held(locks: redis.Redis, key: str, limit: int) -> list[str | None]:
    """The holder of each slot of ``key``, slot 1 first."""
    values = locks.mget([slot_key(key, i) for i in range(1, limit + 1)])
    return [None if value is None else value.decode() for value in values]


def test_n_calls_are_accepted_and_the_next_is_refused(
    limited: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """Three calls of one key take the three slots; the fourth is refused, naming slot 1's holder."""
    key = limited.export.lock_key((1,), {}, {})
    accepted = [limited.export.delay(1) for _ in range(3)]
    assert slots_held(locks, key, 3) == [r.id for r in accepted]
    assert sorted(k.decode() for k in locks.keys("*")) == sorted([key, f"{key}~2", f"{key}~3"])
    with pytest.raises(DuplicateTaskError) as info:
        limited.export.delay(1)
    assert info.value.task_id == accepted[0].id
    assert info.value.key == key
    assert broker.llen("celery") == 3
    # Another key has slots of its own.
    limited.export.delay(2)


def test_each_message_carries_the_slot_it_took(limited: SimpleNamespace, broker: redis.Redis) -> None:
    """The lock header of each accepted call names its own slot key, so its worker ends that slot."""
    key = limited.export.lock_key((4,), {}, {})
    for _ in range(2):
        limited.export.delay(4)
    headers = [json.loads(m)["headers"]["celery_unique_lock"] for m in broker.lrange("celery", 0, -1)]
    assert sorted(headers) == sorted([key, f"{key}~2"])


def test_unique_limit_one_is_the_plain_lock(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """unique_limit=1 takes today's lock at today's key, and no slot key."""
    first = tasks.send_report.apply_async((1,), unique=60, unique_limit=1)
    key = tasks.send_report.lock_key((1,), {}, {})
    assert [k.decode() for k in locks.keys("*")] == [key]
    assert locks.get(key) == first.id.encode()
    with pytest.raises(DuplicateTaskError):
        tasks.send_report.apply_async((1,), unique=60)


def test_a_slot_freed_by_a_run_is_taken_by_the_next_call(
    limited: SimpleNamespace, worker: Any, locks: redis.Redis, scratch: redis.Redis
) -> None:
    """When one of two running or queued calls ends, the next call takes the slot it freed."""
    key = limited.gated.lock_key((1,), {}, {})
    first = limited.gated.delay(1)
    second = limited.gated.delay(1)
    with pytest.raises(DuplicateTaskError):
        limited.gated.delay(1)
    wait_until(lambda: scratch.llen("began") == 1, what="the first call to begin")
    scratch.rpush("gate", 1)
    assert first.get(timeout=10) == 1
    wait_until(lambda: locks.get(key) is None, what="the first call's slot freed")
    third = limited.gated.delay(1)
    assert slots_held(locks, key, 2) == [third.id, second.id]
    scratch.rpush("gate", 1, 1)
    assert second.get(timeout=10) == 1
    assert third.get(timeout=10) == 1
    wait_until(lambda: locks.dbsize() == 0, what="every slot freed")


def test_a_revoke_frees_a_slot(limited: SimpleNamespace, worker: Any, locks: redis.Redis) -> None:
    """A call waiting in a worker for its countdown is revoked: its slot is free for the next call."""
    key = limited.export.lock_key((2,), {}, {})
    waiting = [limited.export.apply_async((2,), countdown=delay) for delay in (30, 1.5, 30)]
    with pytest.raises(DuplicateTaskError):
        limited.export.apply_async((2,), countdown=30)
    time.sleep(0.5)  # let the worker receive the messages
    waiting[1].revoke()
    wait_until(lambda: locks.get(f"{key}~2") is None, timeout=10, what="the revoked call's slot freed")
    assert waiting[1].state == states.REVOKED
    taker = limited.export.apply_async((2,), countdown=30)
    assert slots_held(locks, key, 3) == [waiting[0].id, taker.id, waiting[2].id]
    for result in (waiting[0], taker, waiting[2]):
        result.revoke()


def test_a_resent_slot_acquire_takes_one_slot(redis_server: RedisServer) -> None:
    """A chosen id's slot acquire whose reply is lost is resent: it finds its own slot, and takes no other."""
    with ReplyDropper(redis_server.port) as dropper:
        app = app_behind(dropper, redis_server.url, "limit-lost-reply")

        @app.task(base=UniqueTask, name="tests.limit.lost", shared=False, unique=60, unique_limit=3)
        def lost(account: int) -> int:
            return account

        locks = redis_server.client(LOCK_DB)
        load_scripts(locks)
        key = lost.lock_key((1,), {}, {})
        holder = lost.delay(1)
        dropper.arm(b"EVALSHA", sha(LockStore.ACQUIRE_SLOT_SCRIPT))
        resent = lost.apply_async((1,), task_id="report-42")
        assert dropper.dropped.is_set(), "no reply was dropped: the test did not lose the script's reply"
        assert resent.id == "report-42"
        assert slots_held(locks, key, 3) == [holder.id, "report-42", None]
        assert redis_server.client(BROKER_DB).llen("celery") == 2
        with pytest.raises(DuplicateTaskError) as info:
            lost.apply_async((1,), task_id="report-42")
        assert info.value.task_id == "report-42"
        assert info.value.key == f"{key}~2"
        app.close()


def test_a_group_with_one_member_too_many_records_it_as_failed(
    limited: SimpleNamespace, worker: Any, locks: redis.Redis, scratch: redis.Redis
) -> None:
    """Three identical members under unique_limit=2: two run, the third fails with DuplicateTaskError."""
    result = group(limited.gated.s(7).set(on_duplicate="existing") for _ in range(3)).apply_async()
    members = result.results
    scratch.rpush("gate", 1, 1)
    assert [m.get(timeout=10) for m in members[:2]] == [7, 7]
    with pytest.raises(DuplicateTaskError) as info:
        members[2].get(timeout=10)
    assert info.value.task_id == members[0].id
    wait_until(lambda: locks.dbsize() == 0, what="every slot freed")


def test_a_group_under_raise_stops_at_the_member_too_many(
    limited: SimpleNamespace, celery_app: Celery, broker: redis.Redis
) -> None:
    """Under "raise" the member beyond the limit raises and is stored as failed; three are queued."""
    canvas = group(limited.export.s(8) for _ in range(4))
    frozen = canvas.freeze()
    with pytest.raises(DuplicateTaskError):
        canvas.apply_async()
    assert broker.llen("celery") == 3
    meta = celery_app.backend.get_task_meta(frozen.results[3].id, cache=False)
    assert meta["status"] == states.FAILURE


def test_finished_holders_are_taken_over_slot_by_slot(
    limited: SimpleNamespace, celery_app: Celery, locks: redis.Redis
) -> None:
    """Every slot is held, the second by a holder that finished without releasing: a call takes that slot."""
    key = limited.export.lock_key((3,), {}, {})
    for slot, holder in enumerate(("queued-1", "finished-2", "queued-3"), start=1):
        locks.set(slot_key(key, slot), holder, px=60_000)
    celery_app.backend.store_result("finished-2", 3, states.SUCCESS)
    taker = limited.export.delay(3)
    assert slots_held(locks, key, 3) == ["queued-1", taker.id, "queued-3"]
    with pytest.raises(DuplicateTaskError) as info:
        limited.export.delay(3)
    assert info.value.task_id == "queued-1"


def test_existing_returns_a_holders_result(limited: SimpleNamespace) -> None:
    """With on_duplicate="existing", a call refused by all slots gets slot 1's holder's AsyncResult."""
    held = [limited.export.delay(5) for _ in range(3)]
    answer = limited.export.apply_async((5,), on_duplicate="existing")
    assert answer.id == held[0].id


def test_a_throttle_accepts_n_calls_per_window(
    limited: SimpleNamespace, worker: Any, locks: redis.Redis
) -> None:
    """Under "expiry", three calls run in the window and keep their slots; the fourth waits for the TTL."""
    results = [limited.export.apply_async((6,), unique=2, unique_until="expiry") for _ in range(3)]
    assert [r.get(timeout=10) for r in results] == [6, 6, 6]
    with pytest.raises(DuplicateTaskError):
        limited.export.apply_async((6,), unique=2, unique_until="expiry")
    key = limited.export.lock_key((6,), {}, {})
    wait_until(lambda: not any(slots_held(locks, key, 3)), timeout=5, what="the window to pass")
    assert limited.export.apply_async((6,), unique=2, unique_until="expiry").get(timeout=10) == 6


def test_eager_calls_take_and_free_a_slot(
    limited: SimpleNamespace, eager: Celery, locks: redis.Redis
) -> None:
    """In eager mode a call takes a free slot and frees it as it ends; with every slot held it is refused."""
    key = limited.export.lock_key((8,), {}, {})
    locks.set(key, "queued-elsewhere", px=60_000)
    assert limited.export.delay(8).get() == 8
    assert slots_held(locks, key, 3) == ["queued-elsewhere", None, None]
    for slot in (2, 3):
        locks.set(slot_key(key, slot), f"queued-{slot}", px=60_000)
    with pytest.raises(DuplicateTaskError):
        limited.export.delay(8)


def test_apply_many_sends_limited_calls_through_their_slots(
    limited: SimpleNamespace, locks: redis.Redis
) -> None:
    """apply_many takes a slot for each call under unique_limit, and refuses the one too many."""
    outcomes = apply_many([limited.export.s(9) for _ in range(4)])
    assert [type(o).__name__ for o in outcomes] == ["AsyncResult"] * 3 + ["DuplicateTaskError"]
    key = limited.export.lock_key((9,), {}, {})
    assert slots_held(locks, key, 3) == [o.id for o in outcomes[:3]]


@pytest.mark.parametrize(
    ("value", "error"), [(0, UniqueValueError), (1001, UniqueValueError), ("2", UniqueTypeError),
                         (True, UniqueTypeError), (2.0, UniqueTypeError)],
)
def test_a_bad_limit_names_the_task_and_the_value(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis, value: Any, error: type
) -> None:
    """unique_limit that is not a whole number from 1 to 1000 is refused before any lock or publish."""
    with pytest.raises(error, match=r"tests\.send_report: unique_limit must be") as info:
        tasks.send_report.apply_async((1,), unique=60, unique_limit=value)
    assert repr(value) in str(info.value)
    assert locks.dbsize() == 0
    assert broker.llen("celery") == 0


def test_a_debounce_with_a_limit_is_refused(tasks: SimpleNamespace, locks: redis.Redis) -> None:
    """on_duplicate="replace" with unique_limit above 1 is refused, naming the task and the limit."""
    with pytest.raises(UniqueValueError, match=r"tests\.send_report: unique_limit=2 cannot be combined"):
        tasks.send_report.apply_async((1,), unique=60, unique_limit=2, on_duplicate="replace")
    assert locks.dbsize() == 0


def test_the_limit_follows_call_task_then_app(redis_server: RedisServer, locks: redis.Redis) -> None:
    """Per call beats the task attribute, which beats the app setting unique_limit."""
    app = Celery("limit-precedence", set_as_current=False)
    app.conf.update(celery_config_for(redis_server), unique_limit=2)

    @app.task(base=UniqueTask, name="tests.limit.by_app", shared=False, unique=60)
    def by_app(account: int) -> int:
        return account

    @app.task(base=UniqueTask, name="tests.limit.by_task", shared=False, unique=60, unique_limit=1)
    def by_task(account: int) -> int:
        return account

    by_app.delay(1)
    by_app.delay(1)
    with pytest.raises(DuplicateTaskError):
        by_app.delay(1)
    by_task.delay(1)
    with pytest.raises(DuplicateTaskError):
        by_task.delay(1)
    by_task.apply_async((1,), unique_limit=3)
    by_task.apply_async((1,), unique_limit=3)
    with pytest.raises(DuplicateTaskError):
        by_task.apply_async((1,), unique_limit=3)
    app.close()


def celery_config_for(redis_server: RedisServer) -> dict[str, Any]:
    """The suite's settings for an app of a test's own."""
    from tests.conftest import RESULT_DB

    return {
        "broker_url": redis_server.url(BROKER_DB),
        "result_backend": redis_server.url(RESULT_DB),
        "unique_redis_url": redis_server.url(LOCK_DB),
        "broker_connection_retry_on_startup": False,
        "task_default_queue": "celery",
    }


def test_a_bad_app_limit_names_the_setting() -> None:
    """An app setting unique_limit that is not a whole number from 1 to 1000 is a ConfigurationError."""
    from celery_unique.config import UniqueConfig

    app = Celery("bad-limit", set_as_current=False)
    app.conf.unique_limit = "3"
    with pytest.raises(ConfigurationError, match=r"unique_limit must be a whole number from 1 to 1000, not"):
        UniqueConfig.from_app(app)


def test_the_admin_lists_counts_reaps_and_releases_slots(
    limited: SimpleNamespace, celery_app: Celery, locks: redis.Redis
) -> None:
    """The lock admin sees each slot as a lock of the task, and releases or reaps it alone."""
    key = limited.export.lock_key((13,), {}, {})
    held = [limited.export.delay(13) for _ in range(3)]
    admin = UniqueLocks(celery_app)
    listed = admin.list("tests.limit.export")
    assert sorted((info.key, info.task_id) for info in listed) == sorted(
        (slot_key(key, i + 1), r.id) for i, r in enumerate(held)
    )
    assert {slot_of(info.key) for info in listed} == {(key, 1), (key, 2), (key, 3)}
    assert admin.count("tests.limit.export") == 3
    assert admin.release(f"{key}~2")
    celery_app.backend.store_result(held[2].id, 13, states.SUCCESS)
    assert admin.reap("tests.limit.export") == 1
    assert slots_held(locks, key, 3) == [held[0].id, None, None]


def test_take_over_refuses_a_chosen_id_that_holds_another_slot(
    celery_app: Celery, locks: redis.Redis
) -> None:
    """TAKE_OVER with the key's other slots refuses a chosen id that already holds one of them."""
    store = lock_store(celery_app)
    key = "unique:celery:tests.limit.export:digest"
    locks.set(key, "finished", px=60_000)
    locks.set(f"{key}~2", "report-7", px=60_000)
    assert store.take_over(key, "finished", "report-7", 60_000, "n1", others=[f"{key}~2"]) == "report-7"
    assert locks.get(key) == b"finished"
    assert store.take_over(key, "finished", "report-8", 60_000, "n2", others=[f"{key}~2"]) is None
    assert locks.get(key) == b"report-8"


def test_slot_keys_parse_back() -> None:
    """A slot key splits into its lock key and slot number; a lock key is its own slot 1."""
    key = "unique:celery:tests.limit.export:AbC-_9"
    assert slot_key(key, 1) == key
    assert slot_of(slot_key(key, 17)) == (key, 17)
    assert slot_of(key) == (key, 1)
    assert parse_key(slot_key(key, 2)).task_name == "tests.limit.export"


def test_a_misspelt_limit_is_refused(tasks: SimpleNamespace, broker: redis.Redis) -> None:
    """unique_limt=2 is refused as a near miss of unique_limit, before anything is sent."""
    with pytest.raises(UniqueTypeError, match="unique_limit"):
        tasks.send_report.apply_async((1,), unique=60, unique_limt=2)
    assert broker.llen("celery") == 0


def test_the_cli_says_which_slot_a_lock_is(
    redis_server: RedisServer, limited: SimpleNamespace, locks: redis.Redis
) -> None:
    """`unique list --json` gives each held slot's number beside its key."""
    from tests.test_admin import celery_cli

    key = limited.export.lock_key((14,), {}, {})
    for _ in range(2):
        limited.export.delay(14)
    result = celery_cli(redis_server, "list", "--json")
    assert result.returncode == 0, result.stderr
    slots = {lock["key"]: lock["slot"] for lock in json.loads(result.stdout)["locks"]}
    assert slots == {key: 1, f"{key}~2": 2}


def test_a_run_sees_its_own_slot_and_a_retry_keeps_it(
    tasks: SimpleNamespace, worker: Any, locks: redis.Redis
) -> None:
    """Each run finds its own id in the slot its message names; a retry runs under that slot and frees it."""
    first = tasks.held_by.apply_async((1,), unique=60, unique_limit=2, countdown=0.5)
    second = tasks.held_by.apply_async((1,), unique=60, unique_limit=2)
    assert second.get(timeout=10) == second.id
    assert first.get(timeout=10) == first.id
    retried = [tasks.flaky.apply_async((2,), unique=60, unique_limit=2) for _ in range(2)]
    assert [r.get(timeout=15) for r in retried] == [1, 1]
    wait_until(lambda: locks.dbsize() == 0, what="every slot freed after the retries")


@pytest.mark.parametrize("limit", [1, 2])
def test_a_take_over_whose_reply_is_lost_twice_gives_the_slot_back(
    redis_server: RedisServer, limit: int
) -> None:
    """TAKE_OVER ran, and its reply and its resend's were lost: the call fails, and the slot is not its."""
    with ReplyDropper(redis_server.port) as dropper:
        app = app_behind(dropper, redis_server.url, f"lost-twice-{limit}")

        @app.task(base=UniqueTask, name=f"tests.lost_twice_{limit}", unique=60, unique_limit=limit,
                  shared=False)
        def twice(x: int) -> int:
            return x

        key = twice.lock_key((1,), {}, {})
        store = lock_store(app)
        for slot in range(1, limit + 1):
            assert store.acquire(slot_key(key, slot), f"holder-{slot}", 60_000) is None
        app.backend.mark_as_done(f"holder-{limit}", 1)  # the last slot's holder finished
        load_scripts(redis_server.client(LOCK_DB))
        script = sha(LockStore.TAKE_OVER_SCRIPT)
        dropper.arm(b"EVALSHA", script)

        def rearm() -> None:
            dropper.dropped.wait(10)
            dropper.arm(b"EVALSHA", script)

        threading.Thread(target=rearm, daemon=True).start()
        with pytest.raises(LockStoreError):
            twice.delay(1)
        locks = redis_server.client(LOCK_DB)
        last = slot_key(key, limit)
        wait_until(lambda: locks.get(last) in (None, f"holder-{limit}".encode()), what="the slot given back")
        app.close()


def test_ending_holders_of_every_slot_share_one_wait(
    celery_app: Celery, locks: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three holders that stored SUCCESS but still run: the call waits one schedule of pauses, not three."""

    @celery_app.task(base=UniqueTask, name="tests.ending_slots", unique=60, unique_limit=3, shared=False)
    def ending(x: int) -> int:
        return x

    key = ending.lock_key((1,), {}, {})
    store = lock_store(celery_app)
    for slot in range(1, 4):
        held = slot_key(key, slot)
        assert store.acquire(held, f"h{slot}", 60_000) is None
        celery_app.backend.mark_as_done(f"h{slot}", 1)
        deadline = int(time.time() * 1000) + 60_000
        locks.set(marker_key(held, f"h{slot}"), f"r|0|1||{deadline}|w@x/1|m:1", px=60_000)
    pauses: list[float] = []
    monkeypatch.setattr(holders.time, "sleep", pauses.append)
    with pytest.raises(DuplicateTaskError):
        ending.delay(1)
    assert pauses == list(holders._ENDING_PAUSES)


@pytest.mark.parametrize("suffix", ["~\u00b2", "~\u0662", "~02", "~1", "~"])
def test_only_a_slot_key_as_written_names_a_slot(suffix: str) -> None:
    """A suffix slot_key() never writes (a non-ASCII digit, a leading zero, 1) is part of the digest."""
    key = "unique:celery:t:abc" + suffix
    assert slot_of(key) == (key, 1)
    assert slot_of("unique:celery:t:abc~12") == ("unique:celery:t:abc", 12)
