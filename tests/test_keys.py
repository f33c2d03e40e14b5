"""What makes two calls the same task: binding, defaults, canonical JSON, errors, key layout."""

from __future__ import annotations

import enum
import os
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery
from hypothesis import assume, given
from hypothesis import strategies as st

from celery_unique import DuplicateTaskError, UniqueTask
from celery_unique.keys import argument_digest, escape, format_key, parse_key
from tests.versions import KOMBU


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


def test_untyped_task_with_unique_on_names_the_task(celery_app: Celery) -> None:
    """typing=False, unique_on and a call that does not fit the signature: a TypeError naming the task."""

    @celery_app.task(base=UniqueTask, name="tests.untyped_on", typing=False, unique_on=("a",))
    def untyped_on(a: int, b: int = 0) -> int:
        return a

    with pytest.raises(TypeError, match=r"tests\.untyped_on: unique_on .*does not fit.*too many"):
        untyped_on.lock_key((1, 2, 3), {}, {})
    assert untyped_on.lock_key((1,), {"b": 5}, {}) == untyped_on.lock_key((1, 6), {}, {})


def test_untyped_task_keys_on_raw_arguments(celery_app: Celery) -> None:
    """With typing=False, calls that do not bind still get a stable key."""

    @celery_app.task(base=UniqueTask, name="tests.untyped", typing=False)
    def untyped(a: int) -> int:
        return a

    assert untyped.lock_key((1, 2), {}, {}) == untyped.lock_key([1, 2], None, {})
    assert untyped.lock_key((1, 2), {}, {}) != untyped.lock_key((1, 3), {}, {})


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


MISSING = object()


@pytest.fixture
def defaults(celery_app: Celery) -> SimpleNamespace:
    """Tasks whose parameters have defaults with and without a JSON form."""
    ns = SimpleNamespace(seen=[])

    @celery_app.task(base=UniqueTask, name="tests.resize")
    def resize(
        image: str, width: int = 2, marker: object = MISSING,
        after: timedelta = timedelta(minutes=5), color: Color = Color.RED,
    ) -> str:
        return image

    class Recording(UniqueTask):  # type: ignore[misc]
        def unique_identity(self, arguments: dict[str, Any]) -> Any:
            ns.seen.append(dict(arguments))
            return arguments

    @celery_app.task(base=Recording, name="tests.recorded")
    def recorded(image: str, width: int = 2, marker: object = MISSING) -> str:
        return image

    ns.resize, ns.recorded = resize, recorded
    return ns


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((), {"image": "a"}), (("a", 2), {}), (("a",), {"width": 2}), ((), {"width": 2, "image": "a"})],
)
def test_an_argument_equal_to_its_default_is_left_out(
    defaults: SimpleNamespace, args: Any, kwargs: Any
) -> None:
    """f(1), f(1, b=2) and f(b=2, a=1), where b defaults to 2, are one call, keyed without b."""
    assert defaults.resize.lock_key(args, kwargs, {}) == defaults.resize.lock_key(("a",), None, {})
    assert parse_key(defaults.resize.lock_key(args, kwargs, {})).digest == argument_digest(
        "tests.resize", {"image": "a"}
    )


@pytest.mark.parametrize("width", [2.0, True, "2", 3])
def test_a_value_of_another_type_than_its_default_is_another_call(
    defaults: SimpleNamespace, width: Any
) -> None:
    """f(1, b=2.0), where b defaults to the int 2, is not f(1)."""
    assert defaults.resize.lock_key(("a", width), None, {}) != defaults.resize.lock_key(("a",), None, {})


def test_defaults_without_a_json_form_do_not_block_calls(
    defaults: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """A task whose defaults are an object() sentinel, a timedelta and an Enum member takes its lock."""
    first = defaults.resize.apply_async(("a",), unique=60)
    with pytest.raises(DuplicateTaskError) as info:
        defaults.resize.apply_async(("a",), {"marker": MISSING, "color": Color.RED}, unique=60)
    assert info.value.task_id == first.id
    assert broker.llen("celery") == 1


def test_an_argument_other_than_a_non_json_default_names_itself(defaults: SimpleNamespace) -> None:
    """Passing a value that JSON cannot send, in place of such a default, is the documented TypeError."""
    with pytest.raises(TypeError, match=r"tests\.resize: argument 'color' .*Color\.BLUE"):
        defaults.resize.lock_key(("a",), {"color": Color.BLUE}, {})


def test_unique_identity_receives_arguments_without_defaults(defaults: SimpleNamespace) -> None:
    """unique_identity() gets the passed arguments by name, without those at their default."""
    defaults.recorded.lock_key(("a",), None, {})
    defaults.recorded.lock_key(("a", 2, MISSING), None, {})
    defaults.recorded.lock_key(("a",), {"width": 3}, {})
    assert defaults.seen == [{"image": "a"}, {"image": "a"}, {"image": "a", "width": 3}]


def test_unique_on_selects_a_name_left_at_its_default_consistently(defaults: SimpleNamespace) -> None:
    """unique_on naming a parameter at its default (even a sentinel) leaves it out, passed or not."""
    key = defaults.resize.lock_key(("a",), None, {}, unique_on=("image", "marker"))
    assert key == defaults.resize.lock_key(("a", 3), {"marker": MISSING}, {}, unique_on=("image", "marker"))
    assert parse_key(key).digest == argument_digest("tests.resize", {"image": "a"})
    assert key != defaults.resize.lock_key(("a",), {"marker": "set"}, {}, unique_on=("image", "marker"))


def test_unique_on_tells_an_absent_keyword_from_none(celery_app: Celery) -> None:
    """unique_on naming a **kwargs key: not passing it is not passing None."""

    @celery_app.task(base=UniqueTask, name="tests.tenanted", unique_on=("tenant",))
    def tenanted(page: int, **extra: Any) -> int:
        return page

    assert tenanted.lock_key((1,), {}, {}) == tenanted.lock_key((2,), {"other": 1}, {})
    assert tenanted.lock_key((1,), {}, {}) != tenanted.lock_key((1,), {"tenant": None}, {})


class Vector:
    """A value with a JSON form whose == answers element by element, as numpy arrays do."""

    def __init__(self, *items: int) -> None:
        self.items = items

    def __json__(self) -> list[int]:
        return list(self.items)

    def __eq__(self, other: object) -> Any:
        if not isinstance(other, Vector):
            raise TypeError("cannot compare")
        return [a == b for a, b in zip(self.items, other.items, strict=False)]

    __hash__ = None  # type: ignore[assignment]


ORIGIN = Vector(0, 0)


def test_a_default_whose_equality_is_not_a_bool_is_kept(celery_app: Celery) -> None:
    """A value whose == answers a list is compared by identity only, without an error."""

    @celery_app.task(base=UniqueTask, name="tests.move")
    def move(to: Vector = ORIGIN) -> None:
        pass

    assert move.lock_key((), {"to": ORIGIN}, {}) == move.lock_key((), None, {})
    assert move.lock_key((), {"to": Vector(0, 0)}, {}) != move.lock_key((), None, {})
    assert parse_key(move.lock_key((Vector(0, 0),), None, {})).digest == argument_digest(
        "tests.move", {"to": [0, 0]}
    )


PER_PROCESS_TASK = """
import os
from celery import Celery
from celery_unique import UniqueTask

app = Celery("producer", set_as_current=False)
app.conf.unique_redis_url = "redis://127.0.0.1:1/0"  # never connected: keys only
HOST = os.environ["REPORT_HOST"]  # differs from process to process


@app.task(base=UniqueTask, name="tests.host_report")
def host_report(user_id, host=HOST):
    return host


print(host_report.lock_key((1,), None, {}))
print(host_report.lock_key((1,), {"host": HOST}, {}))
print(host_report.lock_key((1, "elsewhere"), None, {}))
"""


def test_a_default_computed_per_process_gives_one_key_everywhere() -> None:
    """Two producer processes with different per-process defaults key f(1) alike."""
    keys = []
    for host in ("alpha", "beta"):
        env = dict(os.environ, REPORT_HOST=host)
        done = subprocess.run(
            [sys.executable, "-c", PER_PROCESS_TASK], env=env, capture_output=True, text=True,
            timeout=60, check=False,
        )
        assert done.returncode == 0, done.stderr
        keys.append(done.stdout.split())
    (alpha, alpha_explicit, alpha_elsewhere), (beta, beta_explicit, beta_elsewhere) = keys
    assert alpha == beta == alpha_explicit == beta_explicit
    assert alpha_elsewhere == beta_elsewhere != alpha


@pytest.mark.parametrize(
    ("one", "other"),
    [({2: "a", 10: "b"}, {"2": "a", "10": "b"}),
     ({1: "x", None: "y", 1.5: "z", False: 0}, {"1": "x", "null": "y", "1.5": "z", "false": 0}),
     ((1, {"a": (2,)}), [1, {"a": [2]}])],
)
def test_json_arguments_that_arrive_alike_share_a_key(key_of: Any, one: Any, other: Any) -> None:
    """For a JSON task, int and str keys, or tuples and lists, that the worker receives alike are one call."""
    assert key_of(1, one) == key_of(1, other)


def test_json_accepts_a_dict_of_mixed_key_types(tasks: SimpleNamespace, broker: redis.Redis) -> None:
    """A dict mixing int and str keys, which Celery publishes, is keyed like the JSON the worker gets."""
    tasks.send_report.apply_async((1, {1: "a", "b": 2}), unique=60)
    with pytest.raises(DuplicateTaskError):
        tasks.send_report.apply_async((1, {"1": "a", "b": 2}), unique=60)
    assert broker.llen("celery") == 1


def test_plain_json_keys_are_unchanged() -> None:
    """Digests of str-keyed JSON arguments are those of earlier releases, so held locks still match."""
    assert argument_digest("t", {"user_id": 42, "period": "weekly"}) == (
        "KiY6Ab62Dtt_WS7_cnAnxJqUFhhD-v6-Yc0GZp6Bfdc"
    )


@pytest.mark.skipif(KOMBU < (5, 7), reason="pinned with kombu 5.7, whose JSON wraps datetimes and UUIDs")
def test_json_keys_of_kombu_types_are_unchanged() -> None:
    """Digests of datetimes, decimals, UUIDs and bytes are those of earlier releases on the same kombu."""
    mixed = {
        "a": [1, 2.5, None, True, "x"],
        "b": {"z": (1, 2), "y": datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)},
        "c": Decimal("1.10"), "d": uuid.UUID(int=5), "e": b"ab",
    }
    assert argument_digest("t", mixed) == "jksNswDFLaw0teGnHo-JQxYefZ8CK9XJNUAGqKG45wY"


class ByObject(UniqueTask):  # type: ignore[misc]
    def unique_identity(self, arguments: dict[str, Any]) -> Any:
        return arguments["returns"]


@pytest.mark.parametrize(
    ("returns", "message"),
    [(object(), r"what unique_identity\(\) returned .*object"),
     ([1, object()], r"what unique_identity\(\) returned .*list"),
     ({"x": object()}, r"unique_identity\(\) result 'x' .*object")],
)
def test_unique_identity_without_canonical_form_names_the_task(
    celery_app: Celery, locks: redis.Redis, returns: Any, message: str
) -> None:
    """A unique_identity() result with no canonical form is the documented TypeError naming the task."""

    @celery_app.task(base=ByObject, name="tests.by_object")
    def by_object(returns: Any) -> None:
        pass

    with pytest.raises(TypeError, match=rf"tests\.by_object: {message}.*no canonical form"):
        by_object.apply_async((returns,), unique=60)
    assert locks.dbsize() == 0


def test_unknown_serializer_names_the_task(tasks: SimpleNamespace) -> None:
    """A serializer kombu does not know is a ValueError naming the task and the serializer."""
    with pytest.raises(ValueError, match=r"tests\.send_report: serializer 'nope'"):
        tasks.send_report.lock_key((1,), None, {"serializer": "nope"})


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


@pytest.mark.parametrize("key", ["", "unique", "unique:celery:task", ":q:task:digest", "a:b:c:"])
def test_parse_key_names_a_malformed_key(key: str) -> None:
    """parse_key refuses a string that is not <prefix>:<queue>:<task name>:<digest>, naming it."""
    with pytest.raises(ValueError, match="is not a lock key") as info:
        parse_key(key)
    assert repr(key) in str(info.value)
