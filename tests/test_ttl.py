"""The unique option's TTL: accepted forms, and every refused one before any Redis call."""

from __future__ import annotations

import math
import pickle
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery

from celery_unique import InvalidCallError, UniqueTask, UniqueTaskError
from celery_unique.ttl import ttl_ms


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, 1000), (1.5, 1500), (3600, 3_600_000), (timedelta(minutes=2), 120_000)],
)
def test_accepted_ttls(value: Any, expected: int) -> None:
    """Seconds (int or float) and timedeltas of at least 1 second are accepted."""
    assert ttl_ms("t", value) == expected


BAD_TTLS = [
    (0, ValueError),
    (0.999, ValueError),
    (-5, ValueError),
    (math.nan, ValueError),
    (math.inf, ValueError),
    (-math.inf, ValueError),
    (10**400, ValueError),
    (timedelta(milliseconds=300), ValueError),
    (timedelta(seconds=-1), ValueError),
    (True, TypeError),
    (False, TypeError),
    ("60", TypeError),
    (b"60", TypeError),
    ([60], TypeError),
    (object(), TypeError),
]


@pytest.mark.parametrize(("value", "error"), BAD_TTLS)
def test_bad_ttl_refused_before_redis(
    celery_app: Celery, broker: redis.Redis, value: Any, error: type[Exception]
) -> None:
    """Each bad TTL raises naming task and value, with the lock store unreachable and nothing sent."""
    celery_app.conf.unique_redis_url = "redis://127.0.0.1:1/0"

    @celery_app.task(base=UniqueTask, name="tests.ttl")
    def ttl_task(x: int) -> int:
        return x

    with pytest.raises(error, match=r"tests\.ttl: unique must") as info:
        ttl_task.apply_async((1,), unique=value)
    assert repr(value)[:20] in str(info.value)
    assert broker.llen("celery") == 0


@pytest.mark.parametrize(("value", "error"), BAD_TTLS[:3] + BAD_TTLS[10:12])
def test_bad_task_default_refused(celery_app: Celery, value: Any, error: type[Exception]) -> None:
    """A bad task-level default is refused at enqueue the same way."""

    @celery_app.task(base=UniqueTask, name="tests.bad_default", unique=value)
    def bad_default(x: int) -> int:
        return x

    with pytest.raises(error, match=r"tests\.bad_default"):
        bad_default.delay(1)


def test_timedelta_sets_the_lock_ttl(tasks: SimpleNamespace, locks: redis.Redis) -> None:
    """A timedelta TTL becomes the lock's PTTL."""
    tasks.send_report.apply_async((1,), unique=timedelta(minutes=5))
    (key,) = locks.keys("*")
    assert 299_000 < locks.pttl(key) <= 300_000


@pytest.mark.parametrize(("value", "kind"), [(0.5, ValueError), ("60", TypeError)])
def test_bad_input_errors_share_the_package_root(
    tasks: SimpleNamespace, value: Any, kind: type[Exception]
) -> None:
    """A bad TTL is both the built-in error and an InvalidCallError, and pickles as itself."""
    with pytest.raises(kind) as info:
        tasks.send_report.apply_async((1,), unique=value)
    assert isinstance(info.value, InvalidCallError)
    assert isinstance(info.value, UniqueTaskError)
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is type(info.value)
    assert str(copy) == str(info.value)
