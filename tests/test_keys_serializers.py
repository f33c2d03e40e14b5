"""The task's serializer decides what is distinct: keys follow what the worker receives."""

from __future__ import annotations

import base64
import enum
import importlib.util
import json
import math
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, NamedTuple

import pytest
import redis
from celery import Celery, Task
from hypothesis import given
from hypothesis import strategies as st
from kombu import serialization

from celery_unique import LOCK_HEADER, DuplicateTaskError, UniqueTask, keys
from celery_unique.keys import argument_digest, canonical_text
from tests.conftest import CI


def needs(module: str) -> None:
    """Skip locally, fail in CI, when the serializer's library is not installed."""
    if importlib.util.find_spec(module) is None:
        reason = f"{module} is not installed (it is in the test extra)"
        if CI:
            pytest.fail(reason)
        pytest.skip(reason)


class Shape(enum.Enum):
    SQUARE = 1
    ROUND = 2


class Point(NamedTuple):
    x: int
    y: int


class Opaque:
    """An object pickle sends, but that has no canonical form."""


try:
    from pydantic import BaseModel
except ImportError:  # needs() skips or fails the tests that use it
    BaseModel = object

if BaseModel is not object:

    class Order(BaseModel):  # at module level, so that pickle and type hints find it
        id: int
        placed: datetime
        lines: tuple[str, ...] = ()


def task_with(app: Celery, serializer: str) -> Any:
    @app.task(base=UniqueTask, name=f"tests.{serializer}_task", serializer=serializer)
    def task(item: Any, note: str = "") -> None:
        pass

    return task


def key_of(task: Any, *args: Any, **options: Any) -> str:
    return str(task.lock_key(args, None, options))


# What each serializer keeps apart -------------------------------------------


@pytest.mark.parametrize(
    ("one", "other"),
    [({1: "x"}, {"1": "x"}), ((1, 2), [1, 2]), ((1, (2,)), (1, [2])), (b"a", "a"), (1, 1.0), (1, True),
     (Shape.SQUARE, 1), (Point(1, 2), (1, 2)), (frozenset({1}), {1}), ({1: "x"}, {True: "x"}),
     (datetime(2026, 1, 2, tzinfo=timezone(timedelta(hours=1), "CET")),
      datetime(2026, 1, 2, tzinfo=timezone(timedelta(hours=1))))],
)
def test_pickle_keeps_apart_what_the_worker_tells_apart(celery_app: Celery, one: Any, other: Any) -> None:
    """For a pickle task, int and str keys, tuples and lists, and other types give distinct keys."""
    task = task_with(celery_app, "pickle")
    assert key_of(task, one) != key_of(task, other)


def test_pickle_accepts_values_json_cannot_send(celery_app: Celery) -> None:
    """Sets, enums, timedeltas and namedtuples are keyed canonically under pickle, sets in any order."""
    task = task_with(celery_app, "pickle")
    value = {"when": timedelta(hours=1), "shape": Shape.ROUND, "at": Point(1, 2), 3: {"b", "a", "c"}}
    same = {3: {"c", "a", "b"}, "at": Point(1, 2), "shape": Shape.ROUND, "when": timedelta(hours=1)}
    assert key_of(task, value) == key_of(task, same)


def test_pickle_sets_are_keyed_whatever_their_order(celery_app: Celery) -> None:
    """Sets whose iteration order follows their insertion order (colliding hashes) key alike."""
    one, other = {1, 9}, {9, 1}
    assert list(one) != list(other)
    task = task_with(celery_app, "pickle")
    assert key_of(task, (one, 2)) == key_of(task, (other, 2))
    assert key_of(task, {"k": one}) == key_of(task, {"k": other})


@pytest.mark.parametrize("value", [(1,), ("tuple", 1), {1: "a"}, {1, 2}, b"\x00"])
def test_typed_texts_never_meet_plain_json(value: Any) -> None:
    """A value with types JSON lacks never shares its text with a plain JSON value spelling its tags."""
    text = canonical_text(value, "pickle")
    assert text.startswith("\0")
    assert canonical_text(json.loads(text[1:]), "pickle") != text


def test_pickle_refuses_values_without_canonical_form(celery_app: Celery, locks: redis.Redis) -> None:
    """An object pickle can send but that has no canonical form is a TypeError naming task and argument."""
    task = task_with(celery_app, "pickle")
    with pytest.raises(TypeError, match=r"tests\.pickle_task: argument 'item' .*Opaque.*'pickle'"):
        task.apply_async(([Opaque()],), unique=60)
    with pytest.raises(TypeError, match=r"tests\.pickle_task: argument 'item' .*function"):
        task.apply_async((lambda: None,), unique=60)
    assert locks.dbsize() == 0


def test_msgpack_sends_tuples_as_lists_and_refuses_int_keys(celery_app: Celery) -> None:
    """msgpack: a tuple and a list arrive alike; an int key, which the worker cannot decode, is refused."""
    needs("msgpack")
    task = task_with(celery_app, "msgpack")
    assert key_of(task, (1, (2, 3))) == key_of(task, [1, [2, 3]])
    assert key_of(task, b"a") != key_of(task, "a")
    with pytest.raises(TypeError, match=r"tests\.msgpack_task: argument 'item' .*'msgpack'.*map key"):
        key_of(task, {1: "x"})


def test_yaml_keeps_key_types_and_sends_tuples_as_lists(celery_app: Celery) -> None:
    """YAML: int and str keys differ, a tuple and a list arrive alike, sets and dates are keyed."""
    needs("yaml")
    task = task_with(celery_app, "yaml")
    assert key_of(task, {1: "x"}) != key_of(task, {"1": "x"})
    assert key_of(task, (1, 2)) == key_of(task, [1, 2])
    assert key_of(task, {3, 1, 2}) == key_of(task, {2, 3, 1}) != key_of(task, [1, 2, 3])
    assert key_of(task, date(2026, 1, 2)) != key_of(task, "2026-01-02")


def test_the_per_call_serializer_decides(tasks: Any) -> None:
    """serializer= per call wins over the task's: pickle keeps apart the tuple that JSON sends as a list."""
    task = tasks.send_report
    assert key_of(task, 1, (1, 2)) == key_of(task, 1, [1, 2])
    assert key_of(task, 1, (1, 2), serializer="pickle") != key_of(task, 1, [1, 2], serializer="pickle")


def test_plain_json_values_key_alike_under_every_serializer(tasks: Any) -> None:
    """Arguments that arrive as plain JSON keep one key whichever serializer sends them."""
    needs("yaml")
    value = {"a": [1, 2.5, None, True, "x"], "b": {"c": "d"}}
    json_key = key_of(tasks.send_report, 1, value)
    assert key_of(tasks.send_report, 1, value, serializer="pickle") == json_key
    assert key_of(tasks.send_report, 1, value, serializer="yaml") == json_key


# Keyed on what is published --------------------------------------------------


def published(broker: redis.Redis) -> tuple[Any, Any, Any]:
    """The newest message on the default queue: its decoded args, kwargs and lock header."""
    message = json.loads(broker.lindex("celery", 0))
    body = base64.b64decode(message["body"])
    content_type = message["content-type"]
    args, kwargs, _ = serialization.loads(
        body, content_type, message["content-encoding"], accept=[content_type]
    )
    return args, kwargs, message["headers"][LOCK_HEADER]


@pytest.mark.parametrize(
    ("serializer", "library", "value"),
    [("json", "json", {1: "a", "b": (2, 3)}),
     ("json", "json", [datetime(2026, 1, 2, tzinfo=timezone.utc), Decimal("1.10"), b"\xff"]),
     ("pickle", "pickle", {1: {"a", "b"}, "c": (Shape.ROUND, Point(1, 2))}),
     ("yaml", "yaml", {1: ("a", b"b"), "c": {2, 3}}),
     ("msgpack", "msgpack", [("a", b"b"), {"c": 1}])],
)
def test_a_call_and_the_message_it_publishes_share_a_key(
    celery_app: Celery, broker: redis.Redis, serializer: str, library: str, value: Any
) -> None:
    """The key of a call equals the key of the arguments the worker decodes from its message."""
    needs(library)
    celery_app.conf.accept_content = ["json", "pickle", "yaml", "msgpack"]
    task = task_with(celery_app, serializer)
    task.apply_async((value,), {"note": "n"}, unique=60)
    args, kwargs, key = published(broker)
    assert task.lock_key(args, kwargs, {}) == key
    with pytest.raises(DuplicateTaskError):
        task.apply_async(args, kwargs, unique=60)


# pydantic=True tasks ---------------------------------------------------------


def pydantic_task(app: Celery) -> tuple[Any, Any]:
    """A pydantic=True task and its model; skipped where Celery does not send models."""
    needs("pydantic")
    if not hasattr(Task, "_dump_pydantic_arguments"):
        pytest.skip("this Celery does not dump pydantic model arguments in apply_async")

    @app.task(base=UniqueTask, name="tests.ship", pydantic=True)
    def ship(order: Order, express: bool = False) -> int:
        return order.id

    return ship, Order


def test_pydantic_models_are_keyed_as_celery_sends_them(
    celery_app: Celery, broker: redis.Redis
) -> None:
    """A model argument is keyed on the dump Celery publishes: the same as passing that dump."""
    ship, order_cls = pydantic_task(celery_app)
    order = order_cls(id=7, placed=datetime(2026, 1, 2, tzinfo=timezone.utc), lines=("a",))
    ship.apply_async((order,), unique=60)
    args, kwargs, key = published(broker)
    assert args == [order.model_dump(mode="json")]
    assert ship.lock_key(args, kwargs, {}) == key
    with pytest.raises(DuplicateTaskError):
        ship.apply_async((order.model_dump(mode="json"),), {"express": False}, unique=60)
    other = order.model_copy(update={"id": 8})
    ship.apply_async((), {"order": other}, unique=60)
    assert broker.llen("celery") == 2


def test_pydantic_models_sent_with_pickle_are_keyed_as_models(celery_app: Celery) -> None:
    """With serializer="pickle" Celery sends the model itself, which is keyed by class and fields."""
    ship, order_cls = pydantic_task(celery_app)
    placed = datetime(2026, 1, 2, tzinfo=timezone.utc)
    order = order_cls(id=7, placed=placed)
    pickled = key_of(ship, order, serializer="pickle")
    assert pickled == key_of(ship, order_cls(id=7, placed=placed), serializer="pickle")
    assert pickled != key_of(ship, order_cls(id=8, placed=placed), serializer="pickle")
    assert pickled != key_of(ship, order.model_dump(mode="json"), serializer="pickle")


# Properties ------------------------------------------------------------------

json_leaves = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text()
    | st.datetimes(timezones=st.none() | st.just(timezone.utc)) | st.dates() | st.times()
    | st.decimals() | st.uuids(version=4) | st.binary(max_size=8)
)
json_ready = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=4)
    | st.lists(children, max_size=4).map(tuple)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12,
)


@given(value=json_ready)
def test_json_fast_path_matches_the_exact_path(value: Any) -> None:
    """For every value the JSON fast path accepts, its text is the exact path's."""
    assert keys._json_ready({"a": value})
    assert canonical_text({"a": value}) == keys._json_exact({"a": value})


json_keys = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=3)
json_any_keys = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(json_keys, children, max_size=4),
    max_leaves=12,
)


@given(value=json_any_keys)
def test_json_key_is_the_key_of_what_the_worker_receives(value: Any) -> None:
    """For JSON, a value and what kombu decodes from its message give the same digest."""
    content_type, encoding, data = serialization.dumps(value, "json")
    received = serialization.loads(data, content_type, encoding, accept=[content_type])
    assert argument_digest("t", {"a": value}) == argument_digest("t", {"a": received})


hashables = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=3)
    | st.binary(max_size=3) | st.sampled_from(Shape) | st.decimals(allow_nan=False),
    lambda children: st.lists(children, max_size=3).map(tuple) | st.frozensets(children, max_size=3),
    max_leaves=6,
)
typed_values = st.recursive(
    hashables | st.floats() | st.datetimes() | st.timedeltas() | st.uuids(version=4),
    lambda children: st.lists(children, max_size=3) | st.lists(children, max_size=3).map(tuple)
    | st.dictionaries(hashables, children, max_size=3) | st.sets(hashables, max_size=3),
    max_leaves=10,
)


def same(one: Any, other: Any) -> bool:
    """Equal values of the same types all the way down, as pickle delivers them."""
    if type(one) is not type(other):
        return False
    if isinstance(one, float):
        return repr(one) == repr(other) or (math.isnan(one) and math.isnan(other))
    if isinstance(one, Decimal):
        return str(one) == str(other)
    if isinstance(one, (list, tuple)):
        return len(one) == len(other) and all(map(same, one, other))
    if isinstance(one, (set, frozenset, dict)):
        if len(one) != len(other):
            return False
        for key in one:
            matches = [k for k in other if same(key, k)]
            if len(matches) != 1:
                return False
            if isinstance(one, dict) and not same(one[key], other[matches[0]]):
                return False
        return True
    return bool(one == other)


@given(one=typed_values, other=typed_values)
def test_pickle_texts_are_equal_exactly_for_equal_values(one: Any, other: Any) -> None:
    """Under pickle, two values share a canonical text exactly when they are equal with their types."""
    assert (canonical_text(one, "pickle") == canonical_text(other, "pickle")) == same(one, other)


@given(value=typed_values)
def test_pickle_texts_ignore_order(value: Any) -> None:
    """Under pickle, dict and set order is not part of the canonical text."""

    def reorder(v: Any) -> Any:
        if type(v) is dict:
            return {k: reorder(v[k]) for k in reversed(list(v))}
        if type(v) is list:
            return [reorder(x) for x in v]
        if type(v) is set:
            return set(reversed(list(v)))
        return v

    assert canonical_text(value, "pickle") == canonical_text(reorder(value), "pickle")


plain_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12,
)


@given(value=plain_json)
def test_plain_json_values_have_one_text_for_every_serializer(value: Any) -> None:
    """A value that arrives as plain JSON has the same canonical text under JSON and pickle."""
    assert canonical_text(value, "pickle") == canonical_text(value, "json")


def test_argument_digest_names_the_serializer() -> None:
    """argument_digest() encodes for the serializer it is given."""
    assert argument_digest("t", {"a": (1,)}) == argument_digest("t", {"a": [1]})
    assert argument_digest("t", {"a": (1,)}, "pickle") != argument_digest("t", {"a": [1]}, "pickle")
