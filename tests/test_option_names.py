"""Misspelt options: refused before anything is locked or published, and Celery's own never are."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from amqp.basic_message import Message
from celery import Celery, Signature, Task, signature
from celery.app.amqp import AMQP
from celery.app.task import Context
from kombu import Producer

from celery_unique import InvalidCallError, UniqueTask, UniqueTypeError, send_unique
from celery_unique.option_names import CELERY_OPTION_NAMES, _one_edit, check_option_names, near_miss
from celery_unique.options import OPTION_NAMES

#: Misspellings and the option each one should be taken for.
NEAR_MISSES = [
    ("uniqe", "unique"),  # a letter deleted
    ("uniquee", "unique"),  # a letter inserted
    ("unigue", "unique"),  # a letter replaced
    ("unqiue", "unique"),  # two letters swapped
    ("uniq", "unique"),  # two edits, but starts with "uniq"
    ("Unique", "unique"),
    ("unique_untill", "unique_until"),
    ("unique_ttl", "unique_until"),
    ("uniqueness", "unique"),
    ("unique_no", "unique_on"),
    ("on_duplicat", "on_duplicate"),
    ("on_dupliate", "on_duplicate"),
    ("on_dupilcate", "on_duplicate"),
    ("onduplicate", "on_duplicate"),
]


def celery_option_names() -> set[str]:
    """The option names Celery's and kombu's installed code takes, read from their signatures."""
    app = Celery(set_as_current=False)
    takers: list[Callable[..., Any]] = [
        Task.apply_async, Task.apply, Task.retry, Celery.send_task, AMQP.as_task_v2,
        app.amqp.send_task_message, Producer.publish, Signature.apply_async,
    ]
    names = set()
    for taker in takers:
        parameters = inspect.signature(taker).parameters.values()
        names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    # The AMQP properties kombu passes on, and what a retry forwards from its request.
    names |= {name for name, _ in Message.PROPERTIES}
    names |= set(Context().as_execution_options())
    return names - {"self"}


CELERY_NAMES = sorted(celery_option_names())


@pytest.fixture
def calls(celery_app: Celery) -> SimpleNamespace:
    """A unique task that records every run of its body."""
    ns = SimpleNamespace(runs=[])

    @celery_app.task(base=UniqueTask, name="tests.recorded")
    def recorded(x: int) -> int:
        ns.runs.append(x)
        return x

    ns.task = recorded
    return ns


def refused(call: Callable[[], Any], name: str, meant: str) -> UniqueTypeError:
    """Run ``call``, which must raise UniqueTypeError naming ``name`` and ``meant``; return it."""
    with pytest.raises(UniqueTypeError) as info:
        call()
    message = str(info.value)
    assert f"unknown option {name!r}" in message
    assert f"did you mean {meant!r}" in message
    return info.value


def nothing_done(locks: redis.Redis, broker: redis.Redis) -> None:
    """No lock was taken and no message published."""
    assert locks.dbsize() == 0
    assert broker.llen("celery") == 0


@pytest.mark.parametrize(("name", "meant"), NEAR_MISSES)
def test_misspelt_option_is_refused(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis, name: str, meant: str
) -> None:
    """A near miss of a package option is a TypeError naming the task and the option meant; no side effect."""
    error = refused(lambda: tasks.send_report.apply_async((1,), **{name: 60}), name, meant)
    assert str(error).startswith("tests.send_report: ")
    assert isinstance(error, TypeError)
    assert isinstance(error, InvalidCallError)
    nothing_done(locks, broker)


def test_misspelt_option_is_refused_beside_valid_ones(
    tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis
) -> None:
    """A correct unique option does not excuse a misspelt one in the same call."""
    refused(
        lambda: tasks.send_report.apply_async((1,), unique=60, unique_untill="finish", queue="celery"),
        "unique_untill", "unique_until",
    )
    nothing_done(locks, broker)


def test_refused_by_apply(calls: SimpleNamespace, locks: redis.Redis) -> None:
    """apply() refuses a near miss before it locks or runs anything."""
    refused(lambda: calls.task.apply((1,), uniqe=60), "uniqe", "unique")
    assert calls.runs == []
    assert locks.dbsize() == 0


def test_refused_in_eager_mode(
    celery_app: Celery, calls: SimpleNamespace, locks: redis.Redis
) -> None:
    """Under task_always_eager, apply_async refuses a near miss before the task runs."""
    celery_app.conf.task_always_eager = True
    try:
        refused(lambda: calls.task.apply_async((1,), on_dupliate="existing"), "on_dupliate", "on_duplicate")
    finally:
        celery_app.conf.task_always_eager = False
    assert calls.runs == []
    assert locks.dbsize() == 0


@pytest.mark.parametrize("applied", ["apply_async", "delay", "by name"])
def test_refused_from_a_signature(
    celery_app: Celery, tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis, applied: str
) -> None:
    """A signature's .set(uniqe=60) is refused when the signature is applied."""
    if applied == "by name":
        sig = signature("tests.send_report", args=(1,), app=celery_app).set(uniqe=60)
    else:
        sig = tasks.send_report.s(1).set(uniqe=60)
    refused(sig.delay if applied == "delay" else sig.apply_async, "uniqe", "unique")
    nothing_done(locks, broker)


@pytest.mark.parametrize("name", ["tests.send_report", "other.service.task"])
def test_refused_by_send_unique(
    celery_app: Celery, tasks: SimpleNamespace, locks: redis.Redis, broker: redis.Redis, name: str
) -> None:
    """send_unique refuses a near miss, for a registered task and for one known only by name."""
    error = refused(
        lambda: send_unique(celery_app, name, (1,), unique=60, unique_untill="finish"),
        "unique_untill", "unique_until",
    )
    assert str(error).startswith(f"{name}: ")
    nothing_done(locks, broker)


def test_unknown_options_that_are_no_near_miss_still_reach_kombu(
    tasks: SimpleNamespace, broker: redis.Redis
) -> None:
    """An option that is neither a package option nor like one is passed on as a message property."""
    tasks.send_report.apply_async((1,), unique=60, my_trace_id="abc")
    assert json.loads(broker.lindex("celery", 0))["properties"]["my_trace_id"] == "abc"


def test_stamps_are_never_refused(tasks: SimpleNamespace, broker: redis.Redis) -> None:
    """A stamp named in stamped_headers is sent as a stamp, whatever its name looks like."""
    tasks.send_report.apply_async((1,), unique=60, stamped_headers=["unique_run"], unique_run="r-7")
    headers = json.loads(broker.lindex("celery", 0))["headers"]
    assert headers["stamps"] == {"unique_run": "r-7"}


@pytest.mark.parametrize("name", CELERY_NAMES)
def test_celery_option_names_are_never_refused(name: str) -> None:
    """No option name that Celery's or kombu's code takes is ever taken for a misspelling."""
    assert near_miss(name) is None
    check_option_names("tests.send_report", {name: None})


def test_the_list_holds_every_option_name_celery_takes() -> None:
    """CELERY_OPTION_NAMES holds every option name of the installed Celery and kombu."""
    assert set(CELERY_NAMES) <= CELERY_OPTION_NAMES


@pytest.mark.parametrize("name", sorted(CELERY_OPTION_NAMES))
def test_listed_names_are_no_near_miss_by_themselves(name: str) -> None:
    """No name on the list would be a near miss even without the list: none needs it to pass."""
    assert not name.lower().startswith("uniq")
    assert not any(_one_edit(name, option) for option in OPTION_NAMES)


def test_routing_and_publish_options_pass_end_to_end(
    tasks: SimpleNamespace, broker: redis.Redis
) -> None:
    """A call with Celery's routing, header and publish options is published as Celery would."""
    tasks.send_report.apply_async(
        (1,), unique=60, queue="celery", routing_key="celery", expires=600,
        countdown=0, headers={"trace": "t"}, serializer="json", compression=None,
        retry=True, retry_policy={"max_retries": 1}, ignore_result=True, time_limit=30,
        soft_time_limit=20, shadow="report", MessageGroupId="g",
    )
    message = json.loads(broker.lindex("celery", 0))
    assert message["headers"]["trace"] == "t"
    assert message["headers"]["shadow"] == "report"
