"""What makes two calls the same task: binding, canonical JSON, key layout."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery
from hypothesis import assume, given
from hypothesis import strategies as st

from celery_unique import UniqueTask
from celery_unique.keys import argument_digest, escape, format_key, parse_key


@pytest.fixture
def key_of(tasks: SimpleNamespace) -> Any:
    def key(*args: Any, **kwargs: Any) -> str:
        return str(tasks.send_report.lock_key(args, kwargs, {}))

    return key


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((1, "daily"), {}), ((1,), {"period": "daily"}), ((), {"period": "daily", "user_id": 1}), ((1,), {})],
)
def test_spellings_of_one_call_share_a_key(key_of: Any, args: Any, kwargs: Any) -> None:
    """Positional, keyword, reordered and defaulted spellings give one key."""
    assert key_of(*args, **kwargs) == key_of(1, "daily")


def test_none_and_empty_kwargs_are_the_same(tasks: SimpleNamespace) -> None:
    """A retry passes kwargs={} where the first call passed None: same key."""
    task = tasks.send_report
    assert task.lock_key((1,), None, {}) == task.lock_key([1], {}, {})


def test_nested_dict_order_does_not_matter(key_of: Any) -> None:
    """Nested dict key order is not part of the key."""
    assert key_of(1, {"a": 1, "b": {"x": 1, "y": 2}}) == key_of(1, {"b": {"y": 2, "x": 1}, "a": 1})


@pytest.mark.parametrize(("one", "other"), [(1, "1"), (1, 1.0), (1, True), (0, None), ("a", b"a")])
def test_types_are_part_of_the_key(key_of: Any, one: Any, other: Any) -> None:
    """Values that print alike but differ in type give different keys."""
    assert key_of(one) != key_of(other)


def test_kombu_types_are_supported(key_of: Any) -> None:
    """datetime, UUID and Decimal arguments serialize canonically."""
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    ident = uuid.UUID(int=5)
    assert key_of(1, [when, ident, Decimal("1.10")]) == key_of(1, [when, ident, Decimal("1.10")])
    assert key_of(1, Decimal("1.10")) != key_of(1, Decimal("1.1"))
    assert key_of(1, ident) != key_of(1, str(ident))


def test_unsupported_argument_names_itself(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """A value without canonical JSON is a TypeError naming task and argument, before any lock."""
    with pytest.raises(TypeError, match=r"tests\.send_report: argument 'period' .*object") as info:
        tasks.send_report.apply_async((1, object()), unique=60)
    assert "period" in str(info.value)
    assert locks.dbsize() == 0
    assert broker.llen("celery") == 0


def test_wrong_arguments_are_refused_before_locking(
    tasks: SimpleNamespace, locks: redis.Redis
) -> None:
    """Arguments that do not fit the signature raise TypeError naming the task, locking nothing."""
    with pytest.raises(TypeError, match=r"tests\.send_report"):
        tasks.send_report.apply_async((1, 2, 3), unique=60)
    assert locks.dbsize() == 0


def test_untyped_task_keys_on_raw_arguments(celery_app: Celery) -> None:
    """With typing=False, calls that do not bind still get a stable key."""

    @celery_app.task(base=UniqueTask, name="tests.untyped", typing=False)
    def untyped(a: int) -> int:
        return a

    assert untyped.lock_key((1, 2), {}, {}) == untyped.lock_key([1, 2], None, {})
    assert untyped.lock_key((1, 2), {}, {}) != untyped.lock_key((1, 3), {}, {})


def test_key_holds_no_argument_data(key_of: Any) -> None:
    """A 10 MB argument gives a short key that holds none of it."""
    big = "secret" * 2_000_000
    key = key_of(1, big)
    assert len(key) < 100
    assert "secret" not in key
    assert parse_key(key).digest == argument_digest(
        "tests.send_report", {"user_id": 1, "period": big}
    )


@pytest.mark.parametrize("name", ["plain", "with:colon", "with space", "ünïcode", "{tag}", "a*b?[c]\\%"])
def test_key_layout_round_trips(name: str) -> None:
    """Queue and task names with separators, globs or braces parse back exactly."""
    key = format_key("unique", name, name + ".task", "digest")
    assert parse_key(key) == ("unique", name, name + ".task", "digest")
    assert key.count(":") == 3
    assert not any(c in escape(name) for c in "{}*?[]")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12,
)


@given(value=json_values)
def test_equal_calls_give_equal_digests(value: Any) -> None:
    """A value and a reordered copy of it hash the same."""

    def reorder(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: reorder(v[k]) for k in reversed(list(v))}
        if isinstance(v, list):
            return [reorder(x) for x in v]
        return v

    assert argument_digest("t", {"a": value}) == argument_digest("t", {"a": reorder(value)})


@given(one=json_values, other=json_values)
def test_different_values_give_different_digests(one: Any, other: Any) -> None:
    """Values that differ in value or type hash differently."""
    assume(not _same_types(one, other))
    assert argument_digest("t", {"a": one}) != argument_digest("t", {"a": other})


def _same_types(one: Any, other: Any) -> bool:
    if type(one) is not type(other):
        return False
    if isinstance(one, dict):
        return one.keys() == other.keys() and all(_same_types(one[k], other[k]) for k in one)
    if isinstance(one, list):
        return len(one) == len(other) and all(map(_same_types, one, other))
    return bool(one == other)
