"""Taking the lock at enqueue: duplicates, the same task id, every way to call."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery

from celery_unique import LOCK_HEADER, DuplicateTaskError, UniqueTask
from celery_unique.keys import parse_key
from tests.conftest import TRANSPORT, builds_before_locking


def queued(broker: redis.Redis, queue: str = "celery") -> int:
    return int(broker.llen(queue))


def test_quick_start(tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis) -> None:
    """The quick start: a second identical enqueue names the holder and publishes nothing."""
    r = tasks.send_report.apply_async((42,), unique=3600)
    with pytest.raises(DuplicateTaskError) as info:
        tasks.send_report.apply_async((42,), unique=3600)

    assert info.value.task_id == r.id
    assert locks.get(info.value.key) == r.id.encode()
    assert str(info.value) == (
        f"tests.send_report: duplicate refused, task {r.id} holds the lock {info.value.key}"
    )
    assert "queued" not in str(info.value)  # the holder may be running, or finished and failed
    assert queued(broker) == 1
    assert 3590_000 < locks.pttl(info.value.key) <= 3600_000


def test_different_arguments_are_not_duplicates(
    tasks: SimpleNamespace, broker: redis.Redis
) -> None:
    """Another argument value is another task."""
    tasks.send_report.apply_async((42,), unique=60)
    tasks.send_report.apply_async((43,), unique=60)
    tasks.send_report.apply_async((42, "weekly"), unique=60)
    assert queued(broker) == 3


def test_delay_uses_the_task_default(tasks: SimpleNamespace, locks: redis.Redis) -> None:
    """delay() honours the task's default TTL from @app.task(unique=600)."""
    first = tasks.send_report_hourly.delay(7)
    with pytest.raises(DuplicateTaskError) as info:
        tasks.send_report_hourly.delay(7)
    assert info.value.task_id == first.id
    assert 590_000 < locks.pttl(info.value.key) <= 600_000


def test_per_call_ttl_overrides_task_default(tasks: SimpleNamespace, locks: redis.Redis) -> None:
    """A per-call unique= wins over the task's default."""
    tasks.send_report_hourly.apply_async((7,), unique=30)
    with pytest.raises(DuplicateTaskError) as info:
        tasks.send_report_hourly.apply_async((7,))
    assert 20_000 < locks.pttl(info.value.key) <= 30_000


def test_per_call_none_turns_locking_off(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """unique=None per call publishes plainly even when the task has a default."""
    tasks.send_report_hourly.apply_async((7,), unique=None)
    tasks.send_report_hourly.apply_async((7,), unique=None)
    assert queued(broker) == 2
    assert locks.dbsize() == 0


def test_signature_set_unique(tasks: SimpleNamespace, broker: redis.Redis) -> None:
    """A signature carries unique= through .set() to apply_async."""
    first = tasks.send_report.s(42).set(unique=60).apply_async()
    with pytest.raises(DuplicateTaskError) as info:
        tasks.send_report.s(42).set(unique=60).delay()
    assert info.value.task_id == first.id
    assert queued(broker) == 1


def test_same_task_id_is_a_duplicate(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """Enqueueing the same call twice under one caller-chosen id publishes once (Asynq)."""
    first = tasks.send_report.apply_async((42,), unique=60, task_id="report-42")
    with pytest.raises(DuplicateTaskError) as info:
        tasks.send_report.apply_async((42,), unique=60, task_id="report-42")
    assert info.value.task_id == first.id == "report-42"
    assert queued(broker) == 1
    with pytest.raises(DuplicateTaskError):
        tasks.send_report.apply_async((42,), unique=60, task_id="another")
    assert queued(broker) == 1


def test_frozen_signature_applied_twice_publishes_once(
    tasks: SimpleNamespace, broker: redis.Redis
) -> None:
    """Applying one frozen signature twice is one task: the second call is refused."""
    signature = tasks.send_report.s(7).set(unique=60)
    signature.freeze()
    first = signature.apply_async()
    with pytest.raises(DuplicateTaskError) as info:
        signature.apply_async()
    assert info.value.task_id == first.id
    assert queued(broker) == 1


def test_lock_value_is_the_generated_task_id(tasks: SimpleNamespace, locks: redis.Redis) -> None:
    """Without a caller-given id, the id is made before locking and is the lock's value."""
    result = tasks.send_report.apply_async((1,), unique=60)
    (key,) = locks.keys("*")
    assert locks.get(key) == result.id.encode()


def test_header_carries_the_lock_key(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """The published message carries the lock key in its headers, for the worker."""
    tasks.send_report.apply_async((1,), unique=60, headers={"trace": "abc"})
    (key,) = locks.keys("*")
    message = json.loads(broker.lindex("celery", 0))
    assert message["headers"][LOCK_HEADER] == key.decode()
    assert message["headers"]["trace"] == "abc"


def test_no_option_means_no_lock_store_at_all(celery_app: Celery, broker: redis.Redis) -> None:
    """Without unique, a UniqueTask never talks to the lock store (here: unreachable)."""
    celery_app.conf.unique_redis_url = "redis://127.0.0.1:1/0"

    @celery_app.task(base=UniqueTask, name="tests.plain")
    def plain(x: int) -> int:
        return x

    plain.delay(1)
    plain.apply_async((1,))
    plain.s(1).apply_async()
    assert queued(broker) == 3


@pytest.mark.parametrize(
    ("options", "queue"),
    [
        ({}, "celery"),
        ({"queue": "reports"}, "reports"),
    ],
)
def test_key_names_the_routed_queue(
    tasks: SimpleNamespace, locks: redis.Redis, options: dict[str, str], queue: str
) -> None:
    """The lock key holds the queue Celery publishes to."""
    tasks.send_report.apply_async((1,), unique=60, **options)
    (key,) = locks.keys("*")
    assert parse_key(key.decode()).queue == queue


def test_queue_object_and_routing_key_options(
    celery_app: Celery, tasks: SimpleNamespace, locks: redis.Redis
) -> None:
    """A kombu Queue keys by its name; routing_key alone and no queue means the default queue."""
    from kombu import Queue

    tasks.send_report.apply_async((1,), unique=60, queue=Queue("kq"))
    tasks.send_report.apply_async((2,), unique=60, routing_key="rk")
    celery_app.conf.task_default_queue = "fallback"
    del celery_app._celery_unique_state  # settings are read once per app
    tasks.send_report.apply_async((3,), unique=60)
    queues = sorted(parse_key(k.decode()).queue for k in locks.keys("*"))
    assert queues == ["celery", "fallback", "kq"]


def test_other_queue_is_not_a_duplicate(tasks: SimpleNamespace, broker: redis.Redis) -> None:
    """The same call routed to another queue is another task."""
    tasks.send_report.apply_async((42,), unique=60)
    tasks.send_report.apply_async((42,), unique=60, queue="reports")
    with pytest.raises(DuplicateTaskError):
        tasks.send_report.apply_async((42,), unique=60, queue="reports")
    assert queued(broker, "celery") == 1
    assert queued(broker, "reports") == 1


# The task attribute is deprecated in Celery 5 but still routes, so the key must follow it.
@pytest.mark.filterwarnings(r"ignore:\s*The 'queue' task attribute:celery.exceptions.CDeprecationWarning")
def test_queue_from_task_attribute_and_routes(celery_app: Celery, locks: redis.Redis) -> None:
    """The queue comes from queue=, then the task's queue, then task_routes, then the default."""
    celery_app.conf.task_routes = {"tests.routed": {"queue": "routed"}}

    @celery_app.task(base=UniqueTask, name="tests.routed")
    def routed(x: int) -> int:
        return x

    @celery_app.task(base=UniqueTask, name="tests.pinned", queue="pinned")
    def pinned(x: int) -> int:
        return x

    routed.apply_async((1,), unique=60)
    routed.apply_async((1,), unique=60, queue="explicit")
    pinned.apply_async((1,), unique=60)
    queues = sorted(parse_key(k.decode()).queue for k in locks.keys("*"))
    assert queues == ["explicit", "pinned", "routed"]
    # Routing by task_routes and naming the same queue explicitly is one task.
    with pytest.raises(DuplicateTaskError):
        routed.apply_async((1,), unique=60, queue="routed")


def test_countdown_extends_the_lock(tasks: SimpleNamespace, locks: redis.Redis) -> None:
    """With countdown, the lock lasts until processing time plus the TTL (Asynq's ProcessIn)."""
    tasks.send_report.apply_async((1,), unique=10, countdown=100)
    (key,) = locks.keys("*")
    assert 109_000 < locks.pttl(key) <= 110_000


def test_eta_extends_the_lock(celery_app: Celery, tasks: SimpleNamespace, locks: redis.Redis) -> None:
    """With eta, the lock lasts until the eta plus the TTL (Asynq's ProcessAt)."""
    from datetime import timedelta

    tasks.send_report.apply_async((1,), unique=10, eta=celery_app.now() + timedelta(hours=1))
    (key,) = locks.keys("*")
    assert 3609_000 < locks.pttl(key) <= 3610_000


def test_lock_store_is_one_client_per_app(celery_app: Celery, tasks: SimpleNamespace) -> None:
    """Every enqueue of an app goes through one lock store and connection pool."""
    from celery_unique.config import lock_store

    tasks.send_report.apply_async((1,), unique=60)
    store = lock_store(celery_app)
    tasks.send_report.apply_async((2,), unique=60)
    assert lock_store(celery_app) is store
    assert store.client.connection_pool.connection_kwargs["port"] == int(
        celery_app.conf.unique_redis_url.rsplit(":", 1)[1].split("/")[0]
    )


def test_retries_option_from_outside_the_run_is_checked(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """Passing retries= from outside the task's run continues no lock: the holder's own id is refused."""
    held = tasks.send_report.apply_async((42,), unique=60)
    for task_id in (held.id, "another"):
        with pytest.raises(DuplicateTaskError) as info:
            tasks.send_report.apply_async((42,), unique=60, task_id=task_id, retries=1)
        assert info.value.task_id == held.id
    assert queued(broker) == 1
    (key,) = locks.keys("unique:*:*:*")
    assert locks.get(key) == held.id.encode()


def test_generated_task_ids_are_uuid7_strings() -> None:
    """Ids made before locking are distinct version-7 UUIDs in Celery's lower-case spelling."""
    import uuid

    from celery_unique.ids import new_task_id

    ids = [new_task_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (7, uuid.RFC_4122, text)


def test_generated_task_ids_carry_the_time_they_were_made() -> None:
    """An id's first 48 bits are the Unix time in ms at which it was made, so ids sort by it."""
    import time

    from celery_unique.ids import new_task_id

    before = time.time_ns() // 1_000_000
    first = new_task_id()
    while time.time_ns() // 1_000_000 == before:  # the next millisecond
        pass
    second = new_task_id()
    after = time.time_ns() // 1_000_000
    stamps = [int(text.replace("-", "")[:12], 16) for text in (first, second)]
    assert before <= stamps[0] < stamps[1] <= after
    assert first < second


@pytest.mark.skipif(bool(TRANSPORT), reason=builds_before_locking)
def test_before_task_publish_never_hears_of_a_refused_call(
    tasks: SimpleNamespace, broker: redis.Redis
) -> None:
    """A before_task_publish receiver sees each published call, and never a refused duplicate."""
    from celery.signals import before_task_publish

    seen: list[str] = []

    def record(headers: dict[str, Any], **_: Any) -> None:
        seen.append(headers["id"])

    before_task_publish.connect(record)
    try:
        first = tasks.send_report.apply_async((5,), unique=60)
        with pytest.raises(DuplicateTaskError):
            tasks.send_report.apply_async((5,), unique=60)
    finally:
        before_task_publish.disconnect(record)
    assert seen == [first.id]
    assert queued(broker) == 1


def test_failure_between_lock_and_publish_leaves_no_lock(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """When the publish fails after the lock was taken (an unserializable header), no lock is left."""
    with pytest.raises(TypeError, match="not JSON serializable"):
        tasks.send_report.apply_async((6,), unique=60, headers={"unserializable": object()})
    assert locks.dbsize() == 0
    assert queued(broker) == 0
    # The thread's lock connection is in step: the next call works.
    tasks.send_report.apply_async((6,), unique=60)
    assert queued(broker) == 1


def test_retries_option_without_a_task_id_is_a_new_call(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """Only a call naming its task id continues a lock as a retry: retries=1 alone is checked."""
    first = tasks.send_report.apply_async((8,), unique=60)
    with pytest.raises(DuplicateTaskError) as info:
        tasks.send_report.apply_async((8,), unique=60, retries=1)
    assert info.value.task_id == first.id
    assert queued(broker) == 1
