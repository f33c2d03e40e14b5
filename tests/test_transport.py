"""The atomic transport (celery_unique.transport) with a real Celery worker on a real Redis.

The lock store is another database of the broker's server, so the lock's
part of ENQUEUE_SCRIPT selects it. What the server ran is read from its
MONITOR stream; a lost reply is lost by the proxy of ``tests/reply_dropper.py``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

from celery_unique import DuplicateTaskError, UniqueTask
from celery_unique.lock import ENQUEUE_SHA, LockStore
from celery_unique.testing import RedisServer
from tests.conftest import BROKER_DB, LOCK_DB, RESULT_DB, wait_until
from tests.reply_dropper import ReplyDropper

TRANSPORT = "celery_unique.transport:Transport"
#: The user ids the tasks below ran for.
RUNS: list[int] = []


def make_app(server: RedisServer, *, port: int | None = None, locks: str | None = None) -> Celery:
    """An app on ``server`` (through ``port`` if given) whose broker transport is the package's."""
    base = f"redis://127.0.0.1:{port or server.port}"
    app = Celery("transport", set_as_current=False)
    app.conf.update(
        broker_url=f"{base}/{BROKER_DB}",
        broker_transport=TRANSPORT,
        result_backend=server.url(RESULT_DB),
        unique_redis_url=locks or f"{base}/{LOCK_DB}",
        broker_connection_retry_on_startup=False,
        task_default_queue="celery",
    )

    @app.task(base=UniqueTask, name="tests.transport.report", unique=60, shared=False)
    def report(user_id: int) -> int:
        RUNS.append(user_id)
        return user_id

    @app.task(name="tests.transport.spawn", bind=True, shared=False)
    def spawn(self: Any, user_id: int) -> int:
        # Enqueues a duplicate of report(user_id) and says how many children it kept.
        with suppress(DuplicateTaskError):
            report.delay(user_id)
        return len(self.request.children)

    @app.task(name="tests.transport.plain", shared=False)
    def plain(user_id: int) -> int:
        return user_id

    return app


@contextmanager
def monitored(server: RedisServer) -> Iterator[list[dict[str, Any]]]:
    """The commands ``server`` runs inside the block, as MONITOR reports them."""
    seen: list[dict[str, Any]] = []
    client = server.client()
    monitor = client.monitor()
    monitor.__enter__()
    done = threading.Event()

    def read() -> None:
        while True:
            command = monitor.next_command()
            if command["command"] == "ECHO end-of-monitor":
                done.set()
                return
            seen.append(command)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield seen
    finally:
        server.client().echo("end-of-monitor")
        done.wait(5)
        monitor.__exit__()
        client.close()


def outside_scripts(seen: list[dict[str, Any]], *names: str) -> list[str]:
    """The commands among ``seen`` whose name is one of ``names`` and that no script ran."""
    wanted = {name.upper() for name in names}
    return [c["command"] for c in seen
            if c.get("client_type") != "lua" and c["command"].split()[0].upper() in wanted]


def scripting_connections(server: RedisServer) -> set[str]:
    """The ids of the broker's connections whose last command was a script: the publishing ones."""
    found = {c["id"] for c in server.client().client_list() if c["cmd"] in ("evalsha", "eval")}
    assert found, "no connection ran a script"
    return found


def test_unique_task_is_queued_by_one_script_runs_once_and_releases(redis_server: RedisServer) -> None:
    """A unique call is queued by one EVALSHA (no SET or LPUSH of its own), runs once and releases."""
    app = make_app(redis_server)
    report = app.tasks["tests.transport.report"]
    redis_server.client().script_load(LockStore.ENQUEUE_SCRIPT)
    with monitored(redis_server) as seen:
        result = report.delay(1)
    scripts = outside_scripts(seen, "evalsha", "eval")
    assert len(scripts) == 1, scripts
    assert scripts[0].startswith(f"EVALSHA {ENQUEUE_SHA} "), scripts
    assert outside_scripts(seen, "set", "lpush") == []
    key = report.lock_key((1,), {}, {})
    locks = redis_server.client(LOCK_DB)
    assert locks.get(key) == result.id.encode()
    assert b"celery_unique_ticket" not in redis_server.client(BROKER_DB).lindex("celery", 0)
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
        assert result.get(timeout=10) == 1
        wait_until(lambda: locks.get(key) is None, what="the lock's release")
    assert RUNS.count(1) == 1


def test_duplicate_is_refused_without_a_message_a_subscription_or_a_lost_connection(
    redis_server: RedisServer,
) -> None:
    """A refused duplicate raises, queues nothing, leaves no subscription, and keeps its pooled connection."""
    app = make_app(redis_server)
    report = app.tasks["tests.transport.report"]
    first = report.delay(1)
    consumer = app.backend.result_consumer
    with pytest.raises(DuplicateTaskError):  # the result backend connects to record the first refusal
        report.apply_async((1,), task_id="refused-first")
    publishing = scripting_connections(redis_server)
    for n in range(20):
        with pytest.raises(DuplicateTaskError) as refused:
            report.apply_async((1,), task_id=f"refused-{n}")
        assert refused.value.task_id == first.id
        assert app.backend.get_key_for_task(f"refused-{n}") not in consumer.subscribed_to
    assert scripting_connections(redis_server) == publishing
    assert app.backend.get_key_for_task(first.id) in consumer.subscribed_to
    assert redis_server.client(BROKER_DB).llen("celery") == 1


def test_refused_call_inside_a_task_is_not_its_child(redis_server: RedisServer) -> None:
    """A duplicate refused inside a running task leaves no child result on that task."""
    app = make_app(redis_server)
    key = app.tasks["tests.transport.report"].lock_key((5,), {}, {})
    redis_server.client(LOCK_DB).set(key, "unfinished-holder", px=60_000)
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
        assert app.tasks["tests.transport.spawn"].delay(5).get(timeout=10) == 0
    assert redis_server.client(BROKER_DB).llen("celery") == 0
    redis_server.client(LOCK_DB).delete(key)


def test_message_without_a_lock_is_pushed_by_kombu(redis_server: RedisServer) -> None:
    """A call without a lock (a plain task, or unique=None) is one LPUSH of kombu's, no script."""
    app = make_app(redis_server)
    with monitored(redis_server) as seen:
        app.tasks["tests.transport.plain"].delay(1)
        app.tasks["tests.transport.report"].apply_async((2,), unique=None)
    assert outside_scripts(seen, "evalsha", "eval") == []
    assert len(outside_scripts(seen, "lpush")) == 2
    assert redis_server.client(LOCK_DB).dbsize() == 0


@pytest.mark.parametrize("task_id", [None, "chosen-1"], ids=["generated id", "chosen id"])
def test_enqueue_whose_reply_was_lost_is_resent_and_queued_once(
    redis_server: RedisServer, task_id: str | None
) -> None:
    """kombu resends the script after its reply was lost: the call is accepted, with one message and lock."""
    with ReplyDropper(redis_server.port) as dropper:
        app = make_app(redis_server, port=dropper.port)
        report = app.tasks["tests.transport.report"]
        redis_server.client().script_load(LockStore.ENQUEUE_SCRIPT)
        dropper.arm(b"EVALSHA", ENQUEUE_SHA.encode())
        result = report.apply_async((1,), task_id=task_id)
        assert dropper.dropped.is_set(), "no reply was dropped"
        assert redis_server.client(BROKER_DB).llen("celery") == 1
        assert redis_server.client(LOCK_DB).get(report.lock_key((1,), {}, {})) == result.id.encode()
        with pytest.raises(DuplicateTaskError):
            report.delay(1)


def test_lock_store_on_another_server_takes_the_lock_then_publishes(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """With the lock store on another server the call locks then publishes, and says so once."""
    with RedisServer() as other:
        app = make_app(redis_server, locks=other.url(LOCK_DB))
        report = app.tasks["tests.transport.report"]
        with caplog.at_level(logging.INFO, logger="celery_unique"), monitored(redis_server) as seen:
            result = report.delay(1)
            with pytest.raises(DuplicateTaskError):
                report.delay(1)
            report.delay(2)
        said = [r for r in caplog.records if "unique tasks take their lock, then publish" in r.getMessage()]
        assert len(said) == 1
        assert said[0].levelno == logging.WARNING
        assert outside_scripts(seen, "evalsha", "eval") == []
        assert len(outside_scripts(seen, "lpush")) == 2
        assert other.client(LOCK_DB).get(report.lock_key((1,), {}, {})) == result.id.encode()
        other.client().flushall()


def test_eager_calls_keep_taking_the_lock_first(redis_server: RedisServer) -> None:
    """Under task_always_eager the call runs here under its lock, as without the transport."""
    app = make_app(redis_server)
    app.conf.task_always_eager = True
    report = app.tasks["tests.transport.report"]
    assert report.delay(3).get() == 3
    assert redis_server.client(LOCK_DB).get(report.lock_key((3,), {}, {})) is None
    assert redis_server.client(BROKER_DB).llen("celery") == 0


def test_lock_held_by_an_unfinished_task_refuses_and_queues_nothing(redis_server: RedisServer) -> None:
    """A lock another task holds (and has not finished) refuses the call, and no message is queued."""
    app = make_app(redis_server)
    report = app.tasks["tests.transport.report"]
    holder = "someone-else"
    redis_server.client(LOCK_DB).set(report.lock_key((4,), {}, {}), holder, px=60_000)
    with pytest.raises(DuplicateTaskError) as refused:
        report.delay(4)
    assert refused.value.task_id == holder
    assert redis_server.client(BROKER_DB).llen("celery") == 0
    redis_server.client(LOCK_DB).delete(report.lock_key((4,), {}, {}))
