"""Debounce: on_duplicate="replace" drops a holder that has not begun, and unique_max_wait caps the wait."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery, states
from celery.contrib.testing.worker import start_worker

from celery_unique import DuplicateTaskError, UniqueTask, UniqueTypeError, UniqueValueError
from celery_unique.keys import marker_key
from celery_unique.lock import LockStore
from celery_unique.testing import RedisServer
from tests.conftest import BROKER_DB, LOCK_DB, wait_until
from tests.reply_dropper import ReplyDropper, app_behind
from tests.test_protocol_faults import load_scripts, sha

SCRATCH_DB = 5


@pytest.fixture
def scratch(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """Where the tasks below write down each run."""
    client = redis_server.client(SCRATCH_DB)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def debounced(celery_app: Celery, redis_server: RedisServer) -> SimpleNamespace:
    """A debounced task keyed on its user alone, and one that waits for a gate."""
    ns = SimpleNamespace()
    url = redis_server.url(SCRATCH_DB)

    @celery_app.task(base=UniqueTask, name="tests.debounce.sync", unique=60, unique_on=["user_id"],
                     on_duplicate="replace", shared=False)
    def sync(user_id: int, version: str) -> str:
        redis.Redis.from_url(url).rpush("ran", version)
        return version

    @celery_app.task(base=UniqueTask, name="tests.debounce.gated", unique=60, on_duplicate="replace",
                     shared=False)
    def gated(user_id: int) -> int:
        client = redis.Redis.from_url(url)
        client.rpush("began", user_id)
        client.blpop(["gate"], timeout=20)
        return user_id

    ns.sync, ns.gated = sync, gated
    return ns


def queued_eta(broker: redis.Redis, task_id: str) -> datetime:
    """The eta of the queued message of ``task_id``."""
    for raw in broker.lrange("celery", 0, -1):
        message = json.loads(raw)
        if message["headers"]["id"] == task_id:
            return datetime.fromisoformat(message["headers"]["eta"])
    raise AssertionError(f"no queued message of {task_id}")


def test_a_later_call_replaces_a_holder_that_has_not_begun(
    celery_app: Celery, debounced: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """The holder's marker says revoked, its result REVOKED; the later call holds the lock, published."""
    first = debounced.sync.apply_async((1, "a"), countdown=30)
    second = debounced.sync.apply_async((1, "b"), countdown=30)
    assert second.id != first.id
    key = debounced.sync.lock_key((1, "b"), {}, {})
    assert locks.get(key) == second.id.encode()
    assert locks.get(marker_key(key, first.id)).startswith(b"x|0|0|")
    assert celery_app.backend.get_task_meta(first.id, cache=False)["status"] == states.REVOKED
    assert broker.llen("celery") == 2  # the first's message stays queued, to be dropped by a worker


def test_a_debounce_runs_once_with_the_latest_arguments(
    celery_app: Celery, debounced: SimpleNamespace, scratch: redis.Redis, locks: redis.Redis
) -> None:
    """Three calls a countdown apart, a real worker: only the last runs; the others' copies are dropped."""
    with start_worker(celery_app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
        results = [debounced.sync.apply_async((1, version), countdown=1) for version in "abc"]
        assert results[-1].get(timeout=20) == "c"
        # The replaced calls' messages come due too; each is dropped as it begins.
        time.sleep(1.5)
    assert scratch.lrange("ran", 0, -1) == [b"c"]
    assert [r.state for r in results] == [states.REVOKED, states.REVOKED, states.SUCCESS]
    wait_until(lambda: locks.dbsize() == 0, what="the lock released by the run")


def test_a_holder_that_has_begun_refuses_the_call(
    celery_app: Celery, debounced: SimpleNamespace, scratch: redis.Redis
) -> None:
    """Once the holder runs (its marker says so), a replacing call is refused as a duplicate."""
    with start_worker(celery_app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
        running = debounced.gated.apply_async((7,))
        wait_until(lambda: scratch.llen("began") == 1, what="the holder to begin")
        with pytest.raises(DuplicateTaskError) as info:
            debounced.gated.apply_async((7,))
        assert info.value.task_id == running.id
        scratch.rpush("gate", 1)
        assert running.get(timeout=20) == 7


def test_a_holder_sent_without_replace_is_not_replaced(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """A holder enqueued with on_duplicate="raise" may run unmarked: a replacing call is refused."""
    holder = tasks.send_report.apply_async((5,), unique=60, countdown=30)
    with pytest.raises(DuplicateTaskError) as info:
        tasks.send_report.apply_async((5,), unique=60, countdown=30, on_duplicate="replace")
    assert info.value.task_id == holder.id
    assert broker.llen("celery") == 1


def test_max_wait_caps_the_postponement_at_the_first_calls_time(
    debounced: SimpleNamespace, broker: redis.Redis
) -> None:
    """With unique_max_wait=5, a replacing call's 60 s countdown becomes at most 5 s after the first call."""
    start = datetime.now(timezone.utc)
    debounced.sync.apply_async((2, "a"), countdown=60, unique_max_wait=5)
    later = debounced.sync.apply_async((2, "b"), countdown=60, unique_max_wait=timedelta(seconds=5))
    eta = queued_eta(broker, later.id)
    assert start <= eta <= start + timedelta(seconds=5.5), (start, eta)


def test_without_max_wait_each_call_postpones_the_run(
    debounced: SimpleNamespace, broker: redis.Redis
) -> None:
    """No cap: the replacing call keeps its own countdown."""
    start = datetime.now(timezone.utc)
    debounced.sync.apply_async((3, "a"), countdown=60)
    later = debounced.sync.apply_async((3, "b"), countdown=60)
    assert queued_eta(broker, later.id) >= start + timedelta(seconds=59)


def test_a_replace_whose_reply_was_lost_is_resent_and_holds_the_lock(redis_server: RedisServer) -> None:
    """The replacing try's reply is lost: the resend finds its own lock, and the holder is REVOKED."""
    with ReplyDropper(redis_server.port) as dropper:
        app = app_behind(dropper, redis_server.url, "debounce-lost-reply")

        @app.task(base=UniqueTask, name="tests.debounce.lost", shared=False, unique=60,
                  on_duplicate="replace")
        def lost(user_id: int) -> int:
            return user_id

        load_scripts(redis_server.client(LOCK_DB))
        first = lost.apply_async((1,), countdown=30)
        # The second try, with the holder's marker (4 keys): the one that replaces.
        dropper.arm(b"EVALSHA", sha(LockStore.REPLACE_SCRIPT), b"4")
        second: Any = lost.apply_async((1,), countdown=30)
        assert dropper.dropped.is_set(), "no reply was dropped: the test did not lose the script's reply"
        assert redis_server.client(LOCK_DB).get(lost.lock_key((1,), {}, {})) == second.id.encode()
        assert second.id != first.id
        # The resend still learns whom the first attempt replaced, and says so.
        assert app.backend.get_task_meta(first.id, cache=False)["status"] == states.REVOKED
        assert redis_server.client(BROKER_DB).llen("celery") == 2
        app.close()


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (-1, UniqueValueError, "tests.send_report: unique_max_wait must be at least 0"),
        ("soon", UniqueTypeError, "tests.send_report: unique_max_wait must be a number of seconds"),
    ],
)
def test_a_bad_max_wait_names_the_task_and_the_value(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis, value: Any, error: type, message: str
) -> None:
    """unique_max_wait below 0 or not a number is refused before any lock or publish."""
    with pytest.raises(error, match=message) as info:
        tasks.send_report.apply_async((1,), unique=60, on_duplicate="replace", unique_max_wait=value)
    assert repr(value) in str(info.value)
    assert locks.dbsize() == 0
    assert broker.llen("celery") == 0


def test_a_call_with_callbacks_neither_replaces_nor_is_replaced(
    debounced: SimpleNamespace, tasks: SimpleNamespace, locks: redis.Redis
) -> None:
    """A call with a link is never replaced, nor replaces: dropping it would leave its canvas waiting."""
    linked = debounced.sync.apply_async((4, "a"), countdown=30, link=tasks.send_report.s())
    with pytest.raises(DuplicateTaskError) as info:
        debounced.sync.apply_async((4, "b"), countdown=30)
    assert info.value.task_id == linked.id
    plain = debounced.sync.apply_async((6, "a"), countdown=30)
    with pytest.raises(DuplicateTaskError):
        debounced.sync.apply_async((6, "b"), countdown=30, link=tasks.send_report.s())
    assert locks.get(debounced.sync.lock_key((6, "a"), {}, {})) == plain.id.encode()


def test_a_call_that_takes_over_a_finished_holder_stays_replaceable(
    celery_app: Celery, debounced: SimpleNamespace, locks: redis.Redis
) -> None:
    """A holder that finished without releasing is taken over; the new holder is replaced by the next call."""
    key = debounced.sync.lock_key((1, "a"), {}, {})
    finished_id = "finished-without-releasing"
    locks.set(key, finished_id, px=60_000)
    celery_app.backend.store_result(finished_id, "a", states.SUCCESS)
    taker = debounced.sync.apply_async((1, "b"), countdown=30)
    assert locks.get(key) == taker.id.encode()
    latest = debounced.sync.apply_async((1, "c"), countdown=30)
    assert locks.get(key) == latest.id.encode()
    assert celery_app.backend.get_state(taker.id) == states.REVOKED
