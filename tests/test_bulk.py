"""apply_many: a batch of unique calls takes its locks in one round trip, each call its own outcome."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery
from celery.signals import before_task_publish

from celery_unique import DuplicateTaskError, LockStoreError, UniqueTask, UniqueTypeError, apply_many
from celery_unique.lock import LockStore
from celery_unique.testing import RedisServer
from tests.conftest import BROKER_DB, LOCK_DB, wait_until
from tests.reply_dropper import ReplyDropper, app_behind
from tests.test_protocol_faults import load_scripts, sha


def script_calls(server: redis.Redis) -> int:
    """How many EVALSHA and EVAL commands the server has run."""
    stats = server.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval"))


def test_a_batch_takes_every_lock_in_one_script_call(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """Fifty distinct calls: one script call on the lock store, fifty locks, fifty messages."""
    sigs = [tasks.send_report.s(i).set(unique=60) for i in range(50)]
    load_scripts(locks)  # no NOSCRIPT round trip to count
    before = script_calls(locks)
    outcomes = apply_many(sigs)
    assert script_calls(locks) - before == 1
    assert [type(o).__name__ for o in outcomes] == ["AsyncResult"] * 50
    keys = [tasks.send_report.lock_key((i,), {}, {}) for i in range(50)]
    assert [locks.get(k) for k in keys] == [o.id.encode() for o in outcomes]
    assert broker.llen("celery") == 50


def test_each_refused_call_gets_its_own_outcome(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """A held call and a repeat inside the batch are refused; the others are published."""
    held = tasks.send_report.apply_async((3,), unique=60)
    outcomes = apply_many([
        tasks.send_report.s(1).set(unique=60),
        tasks.send_report.s(1).set(unique=60),
        tasks.send_report.s(2).set(unique=60),
        tasks.send_report.s(3).set(unique=60),
        tasks.send_report.s(3).set(unique=60, on_duplicate="existing"),
    ])
    first, repeat, second, refused, existing = outcomes
    assert isinstance(repeat, DuplicateTaskError)
    assert repeat.task_id == first.id
    assert isinstance(refused, DuplicateTaskError)
    assert refused.task_id == held.id
    assert existing.id == held.id
    assert locks.get(tasks.send_report.lock_key((2,), {}, {})) == second.id.encode()
    assert broker.llen("celery") == 3  # held, first, second


def test_calls_without_a_lock_are_published_as_apply_async_does(
    celery_app: Celery, tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """A plain task's signature and unique=None go out unlocked, in the batch's order."""

    @celery_app.task(name="tests.bulk_plain", shared=False)
    def plain(x: int) -> int:
        return x

    outcomes = apply_many([plain.s(1), tasks.send_report.s(9).set(unique=None), tasks.send_report.s(9)])
    assert all(type(o).__name__ == "AsyncResult" for o in outcomes)
    assert broker.llen("celery") == 3
    assert locks.dbsize() == 0  # send_report has no default TTL


def test_a_misspelt_option_raises_before_anything_is_locked(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """A bad signature anywhere in the batch raises, naming the task, and nothing is locked or sent."""
    with pytest.raises(UniqueTypeError, match=r"tests\.send_report"):
        apply_many([tasks.send_report.s(1).set(unique=60), tasks.send_report.s(2).set(uniqe=60)])
    assert locks.dbsize() == 0
    assert broker.llen("celery") == 0


def test_a_failed_publish_gives_back_only_its_own_lock(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """A call whose message cannot be serialised gets the error as its outcome and leaves no lock."""
    outcomes = apply_many([
        tasks.send_report.s(1).set(unique=60),
        tasks.send_report.s(2, object()).set(unique=60, unique_on=["user_id"]),  # JSON cannot encode it
    ])
    assert type(outcomes[0]).__name__ == "AsyncResult"
    assert isinstance(outcomes[1], Exception)
    assert not isinstance(outcomes[1], DuplicateTaskError)
    assert locks.get(tasks.send_report.lock_key((2,), {}, {})) is None
    assert locks.get(tasks.send_report.lock_key((1,), {}, {})) == outcomes[0].id.encode()
    assert broker.llen("celery") == 1


def test_an_interrupted_batch_leaves_no_lock_without_its_message(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """Ctrl-C at the second publish: the first call stays published and locked, the others hold nothing."""
    published: list[str] = []

    def interrupt(sender: Any = None, headers: Any = None, **_: Any) -> None:
        published.append(headers["id"])
        if len(published) == 2:
            raise KeyboardInterrupt

    before_task_publish.connect(interrupt, weak=False)
    try:
        with pytest.raises(KeyboardInterrupt):
            apply_many([tasks.send_report.s(i).set(unique=60) for i in range(4)])
    finally:
        before_task_publish.disconnect(interrupt)
    held = [locks.get(tasks.send_report.lock_key((i,), {}, {})) for i in range(4)]
    assert held == [published[0].encode(), None, None, None]
    assert broker.llen("celery") == 1


@pytest.mark.parametrize("chosen", [False, True], ids=["generated ids", "chosen ids"])
def test_a_batch_whose_reply_was_lost_is_resent_and_refuses_none_of_its_calls(
    redis_server: RedisServer, chosen: bool
) -> None:
    """The script's reply is dropped; the resend answers "taken" for every call, each published once."""
    with ReplyDropper(redis_server.port) as dropper:
        app = app_behind(dropper, redis_server.url, "bulk-lost-reply")

        @app.task(base=UniqueTask, name="tests.bulk.report", shared=False)
        def report(user_id: int) -> int:
            return user_id

        load_scripts(redis_server.client(LOCK_DB))
        dropper.arm(b"EVALSHA", sha(LockStore.ACQUIRE_MANY_SCRIPT))
        sigs = [report.s(i).set(unique=60, **({"task_id": f"bulk-{i}"} if chosen else {})) for i in range(5)]
        outcomes = apply_many(sigs)
        assert dropper.dropped.is_set(), "no reply was dropped: the test did not lose the script's reply"
        assert all(type(o).__name__ == "AsyncResult" for o in outcomes), outcomes
        lock_db = redis_server.client(LOCK_DB)
        held = [lock_db.get(report.lock_key((i,), {}, {})) for i in range(5)]
        assert held == [o.id.encode() for o in outcomes]
        assert redis_server.client(BROKER_DB).llen("celery") == 5
        app.close()


def test_a_lock_store_that_fails_is_each_calls_outcome(redis_server: RedisServer) -> None:
    """With the lock store down, each call gets LockStoreError, or fails open if it says so."""
    app = Celery("bulk-store-down", set_as_current=False)
    app.conf.update(
        broker_url=redis_server.url(BROKER_DB),
        unique_redis_url="redis://127.0.0.1:1/0",
        broker_connection_retry_on_startup=False,
        task_default_queue="celery",
        unique_redis_options={"socket_timeout": 0.5},
    )

    @app.task(base=UniqueTask, name="tests.bulk.down", shared=False)
    def down(user_id: int) -> int:
        return user_id

    outcomes: list[Any] = apply_many([
        down.s(1).set(unique=60), down.s(2).set(unique=60, unique_on_store_error="enqueue"),
    ])
    assert isinstance(outcomes[0], LockStoreError)
    assert type(outcomes[1]).__name__ == "AsyncResult"
    assert redis_server.client(BROKER_DB).llen("celery") == 1
    app.close()


def test_a_worker_runs_the_batch_and_releases_every_lock(
    tasks: SimpleNamespace, locks: redis.Redis, worker: Any
) -> None:
    """A real worker runs each accepted call once, and each run releases its own lock."""
    outcomes = apply_many([tasks.send_report.s(i).set(unique=60) for i in range(10)])
    assert [o.get(timeout=20) for o in outcomes] == [f"report {i} daily" for i in range(10)]
    wait_until(lambda: locks.dbsize() == 0, what="every lock released")
