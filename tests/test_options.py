"""Beyond Asynq: unique_on, unique_until, on_duplicate, the task_duplicate signal, precedence."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery

from celery_unique import DuplicateTaskError, UniqueTask, task_duplicate
from celery_unique.keys import argument_digest, parse_key
from tests.conftest import wait_until


@pytest.fixture
def more(celery_app: Celery) -> SimpleNamespace:
    """Tasks with option defaults of their own."""
    ns = SimpleNamespace()

    @celery_app.task(base=UniqueTask, name="tests.per_user", unique_on=("user_id",))
    def per_user(user_id: int, note: str = "") -> str:
        return note

    @celery_app.task(base=UniqueTask, name="tests.flexible")
    def flexible(user_id: int, **extra: Any) -> int:
        return user_id

    @celery_app.task(base=UniqueTask, name="tests.until_start", unique_until="start")
    def until_start(seconds: float) -> float:
        import time

        time.sleep(seconds)
        return seconds

    @celery_app.task(
        base=UniqueTask, name="tests.finish_retry", bind=True, unique_until="finish",
        max_retries=2, default_retry_delay=0.3,
    )
    def finish_retry(self: UniqueTask, x: int) -> None:
        raise self.retry(exc=RuntimeError(f"still failing {x}"))

    @celery_app.task(base=UniqueTask, name="tests.existing", on_duplicate="existing")
    def existing(x: int) -> int:
        return x * 10

    class LowercaseUrl(UniqueTask):  # type: ignore[misc]
        def unique_identity(self, arguments: dict[str, Any]) -> Any:
            return arguments["url"].lower()

    @celery_app.task(base=LowercaseUrl, name="tests.sync_feed")
    def sync_feed(url: str) -> str:
        return url

    for name, value in list(locals().items()):
        if name not in ("ns", "celery_app", "LowercaseUrl"):
            setattr(ns, name, value)
    return ns


def header(broker: redis.Redis, name: str, index: int = -1) -> Any:
    return json.loads(broker.lindex("celery", index))["headers"].get(name)


# unique_on ---------------------------------------------------------------


def test_unique_on_ignores_other_parameters(more: SimpleNamespace) -> None:
    """With unique_on=("user_id",), calls differing only in other arguments are duplicates."""
    first = more.per_user.apply_async((1, "a"), unique=60)
    with pytest.raises(DuplicateTaskError) as info:
        more.per_user.apply_async((1,), {"note": "b"}, unique=60)
    assert info.value.task_id == first.id
    more.per_user.apply_async((2, "a"), unique=60)
    assert parse_key(info.value.key).digest == argument_digest("tests.per_user", {"user_id": 1})


def test_unique_on_per_call_overrides_task(more: SimpleNamespace) -> None:
    """A per-call unique_on wins over the task's."""
    more.per_user.apply_async((1, "a"), unique=60, unique_on=("user_id", "note"))
    more.per_user.apply_async((1, "b"), unique=60, unique_on=("user_id", "note"))


def test_empty_unique_on_means_one_per_task_and_queue(tasks: SimpleNamespace) -> None:
    """unique_on=() makes every call of the task on one queue the same."""
    tasks.send_report.apply_async((1,), unique=60, unique_on=())
    with pytest.raises(DuplicateTaskError):
        tasks.send_report.apply_async((2, "weekly"), unique=60, unique_on=[])
    tasks.send_report.apply_async((2,), unique=60, unique_on=(), queue="other")


def test_unique_on_unknown_name(tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis) -> None:
    """An unknown unique_on name is a ValueError naming task and parameter; nothing happens."""
    with pytest.raises(ValueError, match=r"tests\.send_report: unique_on names 'usr_id'"):
        tasks.send_report.apply_async((1,), unique=60, unique_on=("usr_id",))
    assert locks.dbsize() == 0
    assert broker.llen("celery") == 0


def test_unique_on_bad_type(tasks: SimpleNamespace) -> None:
    """unique_on must be names: a number is a TypeError naming the task."""
    with pytest.raises(TypeError, match=r"tests\.send_report: unique_on must be"):
        tasks.send_report.apply_async((1,), unique=60, unique_on=5)


def test_unique_on_reaches_var_keyword(more: SimpleNamespace) -> None:
    """unique_on may name a key passed through **kwargs."""
    more.flexible.apply_async((1,), {"tenant": "a", "page": 1}, unique=60, unique_on=("tenant",))
    with pytest.raises(DuplicateTaskError):
        more.flexible.apply_async((2,), {"tenant": "a", "page": 2}, unique=60, unique_on=("tenant",))


def test_unique_identity_override(more: SimpleNamespace) -> None:
    """A subclass's unique_identity decides what makes calls the same."""
    more.sync_feed.apply_async(("HTTP://Example.org/feed",), unique=60)
    with pytest.raises(DuplicateTaskError):
        more.sync_feed.apply_async(("http://example.org/FEED",), unique=60)


# unique_until ------------------------------------------------------------


def test_until_start_releases_as_the_task_starts(
    more: SimpleNamespace, worker: Any, locks: redis.Redis
) -> None:
    """unique_until="start": the lock goes when the task starts, so a copy can queue while it runs."""
    first = more.until_start.apply_async((1.5,), unique=60)
    wait_until(lambda: locks.dbsize() == 0, what="released at start")
    assert not first.ready()
    second = more.until_start.apply_async((1.5,), unique=60)
    assert first.get(timeout=10) == 1.5
    assert second.get(timeout=10) == 1.5


def test_until_finish_releases_on_final_failure(
    tasks: SimpleNamespace, worker: Any, locks: redis.Redis
) -> None:
    """unique_until="finish": a task that fails for good releases its lock."""
    result = tasks.fail.apply_async((1,), unique=60, unique_until="finish")
    with pytest.raises(RuntimeError):
        result.get(timeout=10)
    wait_until(lambda: locks.dbsize() == 0, what="released on failure")


def test_until_finish_keeps_the_lock_across_retries(
    more: SimpleNamespace, worker: Any, locks: redis.Redis
) -> None:
    """unique_until="finish": retries keep the lock; the final failure releases it."""
    result = more.finish_retry.apply_async((1,), unique=60)
    key = wait_until(lambda: locks.keys("*"), what="lock")[0]
    wait_until(lambda: result.state == "RETRY", what="first retry")
    assert locks.get(key) == result.id.encode()
    with pytest.raises(DuplicateTaskError):
        more.finish_retry.apply_async((1,), unique=60)
    with pytest.raises(RuntimeError):
        result.get(timeout=10)
    wait_until(lambda: not locks.exists(key), what="released after final failure")


def test_until_success_is_the_default(tasks: SimpleNamespace, broker: redis.Redis) -> None:
    """The default mode sends no until header; other modes name themselves."""
    tasks.send_report.apply_async((1,), unique=60)
    assert header(broker, "celery_unique_until") is None
    tasks.send_report.apply_async((2,), unique=60, unique_until="finish")
    assert header(broker, "celery_unique_until", 0) == "finish"


def test_bad_until_is_refused(tasks: SimpleNamespace, locks: redis.Redis) -> None:
    """An unknown unique_until is a ValueError naming the task and the value."""
    with pytest.raises(ValueError, match=r"tests\.send_report: unique_until must be .* not 'forever'"):
        tasks.send_report.apply_async((1,), unique=60, unique_until="forever")
    assert locks.dbsize() == 0


# on_duplicate, signal, log -----------------------------------------------


def test_existing_returns_the_holders_result(
    more: SimpleNamespace, worker: Any, broker: redis.Redis
) -> None:
    """on_duplicate="existing" returns the holder's AsyncResult and publishes nothing."""
    first = more.existing.apply_async((4,), unique=60, countdown=1)
    again = more.existing.apply_async((4,), unique=60, countdown=1)
    assert again.id == first.id
    assert again.get(timeout=10) == 40


def test_existing_per_call(tasks: SimpleNamespace, broker: redis.Redis) -> None:
    """on_duplicate="existing" works per call too."""
    first = tasks.send_report.apply_async((1,), unique=60)
    again = tasks.send_report.apply_async((1,), unique=60, on_duplicate="existing")
    assert again.id == first.id
    assert broker.llen("celery") == 1


def test_task_duplicate_signal_and_log(
    tasks: SimpleNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    """Every refused duplicate sends task_duplicate and logs the holder at INFO."""
    seen: list[dict[str, Any]] = []

    def receiver(sender: Any = None, **kwargs: Any) -> None:
        seen.append({"sender": sender, **kwargs})

    task_duplicate.connect(receiver)
    try:
        first = tasks.send_report.apply_async((1,), {"period": "weekly"}, unique=60)
        caplog.set_level(logging.INFO, logger="celery_unique")
        with pytest.raises(DuplicateTaskError) as info:
            tasks.send_report.apply_async((1,), {"period": "weekly"}, unique=60)
    finally:
        task_duplicate.disconnect(receiver)
    (event,) = seen
    assert event["sender"].name == "tests.send_report"
    assert (event["key"], event["task_id"]) == (info.value.key, first.id)
    assert (tuple(event["args"]), event["kwargs"]) == ((1,), {"period": "weekly"})
    (record,) = [r for r in caplog.records if r.name == "celery_unique"]
    assert record.levelno == logging.INFO
    assert first.id in record.getMessage()
    assert "tests.send_report" in record.getMessage()


# precedence --------------------------------------------------------------


def test_precedence_call_task_app_default(celery_app: Celery, broker: redis.Redis) -> None:
    """Per call beats task attribute beats app setting beats the built-in default."""

    @celery_app.task(base=UniqueTask, name="tests.plain_defaults")
    def plain_defaults(x: int) -> int:
        return x

    @celery_app.task(base=UniqueTask, name="tests.task_raises", on_duplicate="raise",
                     unique_until="success")
    def task_raises(x: int) -> int:
        return x

    # Built-in default: raise, success.
    plain_defaults.apply_async((1,), unique=60)
    with pytest.raises(DuplicateTaskError):
        plain_defaults.apply_async((1,), unique=60)
    assert header(broker, "celery_unique_until") is None

    # A fresh app state picks up app settings.
    celery_app.conf.unique_on_duplicate = "existing"
    celery_app.conf.unique_until = "finish"
    del celery_app._celery_unique_state
    assert plain_defaults.apply_async((1,), unique=60).id  # app: existing
    plain_defaults.apply_async((2,), unique=60)
    assert header(broker, "celery_unique_until", 0) == "finish"  # app: finish

    # The task attribute beats the app setting.
    task_raises.apply_async((1,), unique=60)
    with pytest.raises(DuplicateTaskError):
        task_raises.apply_async((1,), unique=60)
    assert header(broker, "celery_unique_until", 0) is None

    # The per-call option beats the task attribute.
    assert task_raises.apply_async((1,), unique=60, on_duplicate="existing").id
    task_raises.apply_async((3,), unique=60, unique_until="start")
    assert header(broker, "celery_unique_until", 0) == "start"


def test_bad_app_setting(celery_app: Celery, tasks: SimpleNamespace) -> None:
    """A bad unique_on_duplicate setting is a ConfigurationError naming it."""
    from celery_unique import ConfigurationError

    celery_app.conf.unique_on_duplicate = "ignore"
    with pytest.raises(ConfigurationError, match=r"unique_on_duplicate must be one of .*'ignore'"):
        tasks.send_report.apply_async((1,), unique=60)
