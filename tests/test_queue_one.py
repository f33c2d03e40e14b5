"""unique_while_running="queue_one": a debounce keeps the latest call waiting, to run after the holder."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import redis
from celery import Celery, states
from celery.contrib.testing.worker import start_worker

from celery_unique import ConfigurationError, DuplicateTaskError, UniqueTask, UniqueValueError
from celery_unique.config import UniqueConfig, lock_store
from celery_unique.keys import marker_key, waiting_key
from celery_unique.lock import Attempt
from celery_unique.testing import RedisServer
from tests.conftest import wait_until

SCRATCH_DB = 5


@pytest.fixture
def scratch(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """Where the tasks below write down each run."""
    client = redis_server.client(SCRATCH_DB)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def queued(celery_app: Celery, redis_server: RedisServer) -> SimpleNamespace:
    """A debounced task with queue_one, keyed on its user: each run waits for a gate of its own."""
    url = redis_server.url(SCRATCH_DB)

    @celery_app.task(base=UniqueTask, name="tests.queue_one.sync", unique=60, unique_on=["user_id"],
                     on_duplicate="replace", unique_while_running="queue_one", shared=False)
    def sync(user_id: int, version: str) -> str:
        client = redis.Redis.from_url(url)
        client.rpush("ran", f"began {version}")
        client.blpop([f"gate {version}"], timeout=20)
        client.rpush("ran", f"ended {version}")
        return version

    return SimpleNamespace(sync=sync)


def begin_by_hand(celery_app: Celery, key: str, task_id: str) -> None:
    """Mark a queued replaceable call running, as a worker's BEGIN_SCRIPT does, on the real lock store."""
    store = lock_store(celery_app)
    nonce = str(store.marker(key, task_id)).split("|")[3]
    assert store.begin(key, Attempt(task_id, nonce=nonce), "worker/1", "elsewhere:1", 30_000)[0] == "run"


def test_the_latest_call_waits_for_the_running_holder_and_runs_after_it(
    celery_app: Celery, queued: SimpleNamespace, scratch: redis.Redis, locks: redis.Redis
) -> None:
    """A real worker: calls made while the holder runs wait; only the latest runs, after the holder ends."""
    threads = {"pool": "threads", "concurrency": 2, "perform_ping_check": False, "shutdown_timeout": 20}
    with start_worker(celery_app, **threads):
        holder = queued.sync.apply_async((1, "a"))
        wait_until(lambda: scratch.lrange("ran", 0, -1) == [b"began a"], what="the holder to begin")
        key = queued.sync.lock_key((1, "b"), {}, {})
        second = queued.sync.apply_async((1, "b"))
        assert locks.get(waiting_key(key)) == second.id.encode()
        # The second call's copy begins while the holder runs: it is held back, again and again.
        wait_until(lambda: celery_app.backend.client.exists(f"celery-task-meta-{second.id}") == 0
                   and locks.get(key) == holder.id.encode(), what="the holder to keep its lock")
        third = queued.sync.apply_async((1, "c"))
        assert locks.get(waiting_key(key)) == third.id.encode()
        assert locks.get(marker_key(key, second.id)).startswith(b"x|0|0|")
        assert second.state == states.REVOKED
        assert locks.get(key) == holder.id.encode()
        scratch.rpush("gate a", 1)
        assert holder.get(timeout=20) == "a"
        wait_until(lambda: scratch.lrange("ran", 0, -1)[-1:] == [b"began c"], timeout=20,
                   what="the waiting call to begin")
        assert locks.get(key) == third.id.encode()
        assert not locks.exists(waiting_key(key))
        scratch.rpush("gate c", 1)
        assert third.get(timeout=20) == "c"
    assert scratch.lrange("ran", 0, -1) == [b"began a", b"ended a", b"began c", b"ended c"]
    wait_until(lambda: locks.dbsize() == 0, what="the lock released by the last run")


def test_a_waiting_call_revoked_gives_its_place_up(
    celery_app: Celery, queued: SimpleNamespace, locks: redis.Redis
) -> None:
    """Revoking the waiting call frees its place, owner-checked: the holder keeps the lock."""
    holder = queued.sync.apply_async((2, "a"), countdown=60)
    key = queued.sync.lock_key((2, "a"), {}, {})
    begin_by_hand(celery_app, key, holder.id)
    waiting = queued.sync.apply_async((2, "b"), countdown=60)
    assert locks.get(waiting_key(key)) == waiting.id.encode()
    store = lock_store(celery_app)
    nonce = str(store.marker(key, waiting.id)).split("|")[3]
    assert store.discard(key, Attempt(waiting.id, nonce=nonce), drop_later=True)
    assert not locks.exists(waiting_key(key))
    assert locks.get(key) == holder.id.encode()
    # A discard of a call that neither holds nor waits frees nothing.
    assert not store.discard(key, Attempt(waiting.id, nonce=nonce), drop_later=True)


def test_without_queue_one_a_running_holder_refuses_the_call(
    celery_app: Celery, queued: SimpleNamespace, locks: redis.Redis
) -> None:
    """Per call, unique_while_running="refuse" wins over the task's queue_one: the call is refused."""
    holder = queued.sync.apply_async((3, "a"), countdown=60)
    key = queued.sync.lock_key((3, "a"), {}, {})
    begin_by_hand(celery_app, key, holder.id)
    with pytest.raises(DuplicateTaskError) as info:
        queued.sync.apply_async((3, "b"), countdown=60, unique_while_running="refuse")
    assert info.value.task_id == holder.id
    assert not locks.exists(waiting_key(key))
    waiting = queued.sync.apply_async((3, "c"), countdown=60)
    assert locks.get(waiting_key(key)) == waiting.id.encode()


def test_a_holder_that_has_not_begun_is_still_replaced(
    celery_app: Celery, queued: SimpleNamespace, locks: redis.Redis
) -> None:
    """Under queue_one a queued holder is replaced as by a debounce: nothing waits."""
    first = queued.sync.apply_async((4, "a"), countdown=60)
    second = queued.sync.apply_async((4, "b"), countdown=60)
    key = queued.sync.lock_key((4, "a"), {}, {})
    assert locks.get(key) == second.id.encode()
    assert not locks.exists(waiting_key(key))
    assert first.state == states.REVOKED


def test_a_bad_value_is_refused_with_the_task_and_the_value(
    celery_app: Celery, queued: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """An unknown unique_while_running names the task and the value; nothing is locked or published."""
    with pytest.raises(UniqueValueError, match=r"tests\.queue_one\.sync: unique_while_running must be one "
                                               r"of 'refuse', 'queue_one', not 'later'"):
        queued.sync.apply_async((5, "a"), unique_while_running="later")
    assert locks.dbsize() == 0
    assert broker.llen("celery") == 0


def test_the_app_setting_is_checked_and_is_the_default(
    celery_app: Celery, tasks: SimpleNamespace, locks: redis.Redis
) -> None:
    """A bad unique_while_running setting is a ConfigurationError; a good one is every call's default."""
    celery_app.conf.unique_while_running = "sometimes"
    with pytest.raises(ConfigurationError, match=r"unique_while_running must be one of .*'sometimes'"):
        UniqueConfig.from_app(celery_app)
    celery_app.conf.unique_while_running = "queue_one"
    holder = tasks.send_report.apply_async((6,), unique=60, countdown=60, on_duplicate="replace")
    key = tasks.send_report.lock_key((6,), {}, {})
    begin_by_hand(celery_app, key, holder.id)
    waiting = tasks.send_report.apply_async((6,), unique=60, countdown=60, on_duplicate="replace")
    assert locks.get(waiting_key(key)) == waiting.id.encode()
