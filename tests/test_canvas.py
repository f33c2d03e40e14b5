"""Chains, groups, chords, beat and send_unique."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery, chain, chord, group
from celery.beat import ScheduleEntry, Scheduler

from celery_unique import DuplicateTaskError, UniqueSignature, UniqueTask, send_unique
from celery_unique.compat import BEAT_HEADER
from celery_unique.headers import UNTIL_HEADER
from tests.conftest import wait_until
from tests.versions import CELERY_57


@pytest.fixture
def canvas(celery_app: Celery) -> SimpleNamespace:
    """Small tasks to compose."""
    ns = SimpleNamespace()

    @celery_app.task(base=UniqueTask, name="tests.double")
    def double(x: int) -> int:
        return 2 * x

    @celery_app.task(base=UniqueTask, name="tests.total")
    def total(values: list[int]) -> int:
        return sum(values)

    @celery_app.task(name="tests.plain_add")
    def plain_add(a: int, b: int = 0) -> int:
        return a + b

    ns.double, ns.total, ns.plain_add = double, total, plain_add
    return ns


def test_chain_links_take_their_locks(
    canvas: SimpleNamespace, worker: Any, locks: redis.Redis
) -> None:
    """Each chain link set with unique= locks when enqueued and releases on success."""
    result = chain(canvas.double.s(1).set(unique=60), canvas.double.s().set(unique=60)).apply_async()
    assert result.get(timeout=10) == 4
    wait_until(lambda: locks.dbsize() == 0, what="both links released")


def test_chain_duplicate_link_fails_the_link_not_the_parent(
    canvas: SimpleNamespace, worker: Any, locks: redis.Redis
) -> None:
    """A later link that is a duplicate fails itself and the chain; the parent keeps its SUCCESS."""
    holder = canvas.double.apply_async((2,), unique=60, countdown=30)  # holds double(2)
    result = chain(canvas.double.s(1).set(unique=60), canvas.double.s().set(unique=60)).apply_async()
    with pytest.raises(DuplicateTaskError) as info:
        result.get(timeout=10)
    assert info.value.task_id == holder.id
    assert result.parent.get(timeout=10) == 2
    holder.revoke()


def test_chain_duplicate_link_with_existing_continues(
    canvas: SimpleNamespace, worker: Any
) -> None:
    """With on_duplicate="existing" a duplicate link is skipped and the parent succeeds."""
    holder = canvas.double.apply_async((2,), unique=60, countdown=30)
    result = chain(
        canvas.double.s(1).set(unique=60),
        canvas.double.s().set(unique=60, on_duplicate="existing"),
    ).apply_async()
    assert result.parent.get(timeout=10) == 2
    holder.revoke()


def test_group_members_lock_each(canvas: SimpleNamespace, worker: Any, locks: redis.Redis) -> None:
    """A group's members each take and release their own lock."""
    result = group(canvas.double.s(i).set(unique=60) for i in range(3)).apply_async()
    assert result.get(timeout=10) == [0, 2, 4]
    wait_until(lambda: locks.dbsize() == 0, what="group released")


def test_group_stops_at_a_duplicate(canvas: SimpleNamespace, broker: redis.Redis) -> None:
    """A duplicate member raises; members published before it stay queued."""
    with pytest.raises(DuplicateTaskError):
        group(canvas.double.s(1).set(unique=60), canvas.double.s(1).set(unique=60)).apply_async()
    assert broker.llen("celery") == 1


def test_chord_header_and_body(canvas: SimpleNamespace, worker: Any, locks: redis.Redis) -> None:
    """Unique chord members and body run and release their locks."""
    result = chord(
        [canvas.double.s(1).set(unique=60), canvas.double.s(2).set(unique=60)],
        canvas.total.s().set(unique=60),
    ).apply_async()
    assert result.get(timeout=15) == 6
    wait_until(lambda: locks.dbsize() == 0, what="chord released")


def test_beat_duplicate_is_logged_not_raised(
    celery_app: Celery, canvas: SimpleNamespace, broker: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Beat sends a unique entry once; the next tick's duplicate is an INFO line, not an error."""
    scheduler = Scheduler(celery_app, lazy=True)
    options: dict[str, Any] = {"unique": 300}
    if not CELERY_57:
        # Driven from this thread, not beat's own (which beat_init marks):
        # before Celery 5.7 beat puts no header on its tasks, so the entry does.
        options["headers"] = {BEAT_HEADER: True}
    entry = ScheduleEntry(
        name="double-1", task="tests.double", schedule=60, args=(1,), options=options,
        app=celery_app,
    )
    caplog.set_level(logging.INFO)
    first = scheduler.apply_async(entry, advance=False)
    second = scheduler.apply_async(entry, advance=False)
    assert second.id == first.id
    assert broker.llen("celery") == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("refused duplicate" in r.getMessage() for r in caplog.records)


def test_send_unique_registered_unique_task(canvas: SimpleNamespace, celery_app: Celery) -> None:
    """send_unique on a registered UniqueTask is its apply_async."""
    first = send_unique(celery_app, "tests.double", (1,), unique=60)
    with pytest.raises(DuplicateTaskError) as info:
        send_unique(celery_app, "tests.double", kwargs={"x": 1}, unique=60)
    assert info.value.task_id == first.id


def test_send_unique_plain_task_binds_its_signature(
    canvas: SimpleNamespace, celery_app: Celery, broker: redis.Redis
) -> None:
    """send_unique on a plain registered task binds arguments with its signature."""
    first = send_unique(celery_app, "tests.plain_add", (1,), unique=60)
    with pytest.raises(DuplicateTaskError) as info:
        send_unique(celery_app, "tests.plain_add", (1, 0), unique=60)
    assert info.value.task_id == first.id
    assert broker.llen("celery") == 1


def test_send_unique_unknown_task(celery_app: Celery, broker: redis.Redis, locks: redis.Redis) -> None:
    """send_unique on another service's task keys on the arguments as given, and routes by name."""
    celery_app.conf.task_routes = {"billing.*": {"queue": "billing"}}
    first = send_unique(celery_app, "billing.charge", (7,), {"cents": 100}, unique=60)
    with pytest.raises(DuplicateTaskError) as info:
        send_unique(celery_app, "billing.charge", [7], {"cents": 100}, unique=60)
    assert info.value.task_id == first.id
    send_unique(celery_app, "billing.charge", (7,), {"cents": 200}, unique=60)
    assert broker.llen("billing") == 2
    assert b":billing:billing.charge:" in locks.keys("*")[0]


def test_send_unique_without_ttl_is_send_task(
    celery_app: Celery, broker: redis.Redis, locks: redis.Redis
) -> None:
    """Without unique (and no task default) send_unique publishes plainly."""
    send_unique(celery_app, "billing.charge", (7,))
    send_unique(celery_app, "billing.charge", (7,))
    assert broker.llen("celery") == 2
    assert locks.dbsize() == 0


def test_send_unique_passes_on_each_unique_option(
    celery_app: Celery, tasks: SimpleNamespace, broker: redis.Redis
) -> None:
    """send_unique's unique_on, unique_until and on_duplicate reach the lock as apply_async's do."""
    first = send_unique(
        celery_app, "tests.send_report", (1,), {"period": "a"}, unique=60,
        unique_on=["user_id"], unique_until="start",
    )
    headers = json.loads(broker.lindex("celery", -1))["headers"]
    assert headers[UNTIL_HEADER] == "start"
    again = send_unique(
        celery_app, "tests.send_report", (1,), {"period": "b"}, unique=60,
        unique_on=["user_id"], on_duplicate="existing",
    )
    assert again.id == first.id  # refused: the same user_id; "existing" returned the holder
    with pytest.raises(DuplicateTaskError):
        send_unique(celery_app, "tests.send_report", (1,), {"period": "b"}, unique=60, unique_on=["user_id"])
    send_unique(celery_app, "tests.send_report", (1,), {"period": "b"}, unique=60)  # all arguments
    assert broker.llen("celery") == 2


def test_unique_signature_by_name_locks(
    celery_app: Celery, tasks: SimpleNamespace, broker: redis.Redis
) -> None:
    """A UniqueSignature made from a task's name is Celery's signature: its .set(unique=) takes the lock."""
    first = UniqueSignature("tests.send_report", (3,), app=celery_app).set(unique=60).apply_async()
    with pytest.raises(DuplicateTaskError) as info:
        tasks.send_report.apply_async((3,), unique=60)
    assert info.value.task_id == first.id
    assert broker.llen("celery") == 1
