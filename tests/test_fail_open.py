"""Fail-open: unique_on_store_error="enqueue" publishes a call unlocked when the lock store fails."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from prometheus_client import REGISTRY

from celery_unique import LockStoreError, UniqueTask
from celery_unique.config import _STATE_ATTR
from celery_unique.errors import ConfigurationError
from celery_unique.testing import RedisServer, free_port
from tests.conftest import BROKER_DB, RESULT_DB

QUEUE = "fail-open"


@pytest.fixture
def down_app(redis_server: RedisServer) -> Iterator[Celery]:
    """An app whose broker and results are up and whose lock store refuses connections."""
    app = Celery("fail-open", set_as_current=False)
    app.conf.update(
        broker_url=redis_server.url(BROKER_DB),
        result_backend=redis_server.url(RESULT_DB),
        unique_redis_url=f"redis://127.0.0.1:{free_port()}/0",
        unique_redis_socket_timeout=0.5,
        broker_connection_retry_on_startup=False,
        task_default_queue=QUEUE,
    )

    @app.task(base=UniqueTask, name="open.sync", shared=False)
    def sync(n: int) -> int:
        return n * 2

    @app.task(base=UniqueTask, name="open.sync_open", shared=False, unique_on_store_error="enqueue")
    def sync_open(n: int) -> int:
        return n * 3

    yield app
    redis_server.client(BROKER_DB).delete(QUEUE)


def queued(broker: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in broker.lrange(QUEUE, 0, -1)]


def unlocked_total(task: str) -> float:
    return REGISTRY.get_sample_value("celery_unique_unlocked_total", {"task": task}) or 0.0


def test_by_default_a_store_error_raises_and_publishes_nothing(down_app: Celery, broker: redis.Redis) -> None:
    """Without fail-open, a lock store that is down is a LockStoreError, and nothing is published."""
    with pytest.raises(LockStoreError, match=r"open\.sync"):
        down_app.tasks["open.sync"].apply_async((1,), unique=60)
    assert queued(broker) == []


def test_enqueue_publishes_the_call_unlocked(
    down_app: Celery, broker: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Fail-open publishes each call without a lock header, counts it, and warns once for many calls."""
    task = down_app.tasks["open.sync"]
    before = unlocked_total("open.sync")
    with caplog.at_level(logging.WARNING, logger="celery_unique"):
        results = [task.apply_async((1,), unique=60, unique_on_store_error="enqueue") for _ in range(3)]
    messages = queued(broker)
    assert sorted(m["headers"]["id"] for m in messages) == sorted(r.id for r in results)
    key = task.lock_key((1,), {}, {})
    for message in messages:
        assert "celery_unique_lock" not in message["headers"]
        assert message["headers"]["celery_unique_unlocked"] == key
    (warning,) = [r for r in caplog.records if r.name == "celery_unique"]
    assert "open.sync sent without its lock" in warning.getMessage()
    assert unlocked_total("open.sync") - before == 3


def test_task_attribute_and_app_setting(down_app: Celery, broker: redis.Redis) -> None:
    """The task attribute turns fail-open on; a per-call "raise" beats it; the app setting is the default."""
    down_app.tasks["open.sync_open"].apply_async((1,), unique=60)
    assert len(queued(broker)) == 1
    with pytest.raises(LockStoreError):
        down_app.tasks["open.sync_open"].apply_async((2,), unique=60, unique_on_store_error="raise")
    down_app.conf.unique_on_store_error = "enqueue"
    down_app.__dict__.pop(_STATE_ATTR)  # the settings are read once per app
    down_app.tasks["open.sync"].apply_async((3,), unique=60)
    assert len(queued(broker)) == 2


def test_bad_values_name_the_task_or_the_setting(down_app: Celery, broker: redis.Redis) -> None:
    """A value that is neither "raise" nor "enqueue" is refused, per call and as a setting."""
    with pytest.raises(ValueError, match=r"open\.sync: unique_on_store_error must be .* not 'ignore'"):
        down_app.tasks["open.sync"].apply_async((1,), unique=60, unique_on_store_error="ignore")
    app = Celery("bad", set_as_current=False)
    app.conf.update(unique_on_store_error="ignore", unique_redis_url="redis://127.0.0.1:1/0")

    @app.task(base=UniqueTask, name="bad.task", shared=False)
    def task() -> None: ...

    with pytest.raises(ConfigurationError, match="unique_on_store_error must be one of 'raise', 'enqueue'"):
        task.apply_async(unique=60)
    assert queued(broker) == []


def test_a_worker_runs_the_unlocked_call_without_the_lock_store(down_app: Celery) -> None:
    """A worker whose lock store is down runs an unlocked call as a plain task: it succeeds, no warning."""
    result = down_app.tasks["open.sync_open"].apply_async((5,), unique=60)
    with start_worker(down_app, pool="solo", perform_ping_check=False, queues=[QUEUE]):
        assert result.get(timeout=10) == 15


def test_eager_apply_fails_open_too(down_app: Celery) -> None:
    """apply() of a fail-open task runs it here when the lock store is down."""
    assert down_app.tasks["open.sync_open"].apply((4,), unique=60).get() == 12


def test_an_up_store_locks_as_usual(redis_server: RedisServer) -> None:
    """With the lock store up, a fail-open call is locked and refuses its duplicate."""
    from celery_unique import DuplicateTaskError

    with RedisServer() as locks:
        app = Celery("open-up", broker=redis_server.url(BROKER_DB), set_as_current=False)
        app.conf.update(unique_redis_url=locks.url(0), task_default_queue=QUEUE,
                        broker_connection_retry_on_startup=False)

        @app.task(base=UniqueTask, name="open.up", shared=False, unique_on_store_error="enqueue")
        def up(n: int) -> int:
            return n

        up.apply_async((1,), unique=60)
        with pytest.raises(DuplicateTaskError):
            up.apply_async((1,), unique=60)
    redis_server.client(BROKER_DB).delete(QUEUE)
