"""The lock admin: UniqueLocks, the `celery unique` command and the test fixture."""

from __future__ import annotations

import itertools
import json
import logging
import os
import pickle
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker

from celery_unique import LockStatus, LockStoreError, UniqueLocks, UniqueTask
from celery_unique.cli import _duration, _plural
from celery_unique.config import describe_store
from celery_unique.ids import issued_at
from celery_unique.lock import running_marker_key
from celery_unique.testing import RedisServer, clear_locks
from tests.cluster_support import LocalCluster
from tests.conftest import wait_until

pytest_plugins = ["celery_unique.testing"]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def held(tasks: SimpleNamespace) -> SimpleNamespace:
    """Three held locks: two of send_report (two queues), one of slow."""
    return SimpleNamespace(
        a=tasks.send_report.apply_async((1,), unique=60),
        b=tasks.send_report.apply_async((2,), unique=120, queue="reports"),
        c=tasks.slow.apply_async((3,), unique=60, queue="odd: queue ü"),
    )


@pytest.fixture
def stopped_server() -> RedisServer:
    """A redis-server that was started and then stopped: its port refuses connections."""
    server = RedisServer().start()
    server.close()
    return server


@pytest.fixture
def offline_app(stopped_server: RedisServer) -> Celery:
    """An app whose lock store is the stopped server."""
    app = Celery("offline", set_as_current=False)
    app.conf.update(
        unique_redis_url=stopped_server.url(2), unique_redis_socket_timeout=1,
        broker_url=stopped_server.url(0),
    )
    app.task(base=UniqueTask, name="tests.send_report", shared=False)(_report)
    return app


def _report(user_id: int) -> int:
    return user_id


def _nothing() -> None:
    pass


# -- UniqueLocks ---------------------------------------------------------------


def test_list_reports_every_lock(celery_app: Celery, held: SimpleNamespace) -> None:
    """list() gives key, task name, queue, holder and TTL of every lock."""
    locks = UniqueLocks(celery_app).list()
    assert [(lk.task_name, lk.queue, lk.task_id) for lk in locks] == [
        ("tests.send_report", "celery", held.a.id),
        ("tests.send_report", "reports", held.b.id),
        ("tests.slow", "odd: queue ü", held.c.id),
    ]
    assert 110 < locks[1].ttl <= 120


def test_list_filters(celery_app: Celery, held: SimpleNamespace) -> None:
    """list() filters by task name and by queue, names with odd characters included."""
    admin = UniqueLocks(celery_app)
    assert [lk.task_id for lk in admin.list(task_name="tests.slow")] == [held.c.id]
    assert [lk.task_id for lk in admin.list(queue="reports")] == [held.b.id]
    assert [lk.task_id for lk in admin.list(queue="odd: queue ü")] == [held.c.id]
    assert admin.list(task_name="tests.send_report", queue="odd: queue ü") == []
    assert admin.list(task_name="tests.*") == []
    assert admin.count(task_name="tests.send_report") == 2


def test_release_and_clear(celery_app: Celery, held: SimpleNamespace, locks: redis.Redis) -> None:
    """release(key) says whether it deleted; clear() counts what it deleted."""
    admin = UniqueLocks(celery_app)
    key = admin.list(queue="reports")[0].key
    assert admin.release(key) is True
    assert admin.release(key) is False
    assert admin.clear(task_name="tests.send_report") == 1
    assert admin.clear() == 1
    assert locks.dbsize() == 0


def test_batches_cover_every_lock(
    celery_app: Celery, tasks: SimpleNamespace, locks: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With batches much smaller than the number of locks, list, count and clear see every lock."""
    monkeypatch.setattr(UniqueLocks, "BATCH", 7)
    ids = {tasks.send_report.apply_async((i,), unique=60).id for i in range(55)}
    admin = UniqueLocks(celery_app)
    assert {lock.task_id for lock in admin.list()} == ids
    assert admin.count() == 55
    assert admin.clear() == 55
    assert locks.dbsize() == 0


def test_iter_locks_reads_batch_by_batch(
    celery_app: Celery, tasks: SimpleNamespace, locks: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """iter_locks() reads one batch at a time: locks released after the first batch are not yielded."""
    monkeypatch.setattr(UniqueLocks, "BATCH", 5)
    for i in range(60):
        tasks.send_report.apply_async((i,), unique=60)
    locks_iter = UniqueLocks(celery_app).iter_locks()
    first = next(locks_iter)
    locks.flushdb()  # every lock released while the caller looks at the first one
    rest = list(locks_iter)
    assert first.task_name == "tests.send_report"
    assert len(rest) < 59


def test_is_locked(celery_app: Celery, tasks: SimpleNamespace, held: SimpleNamespace) -> None:
    """is_locked() names the holder of a call, or None."""
    admin = UniqueLocks(celery_app)
    assert admin.is_locked(tasks.send_report, (1,), {"period": "daily"}) == held.a.id
    assert admin.is_locked(tasks.send_report, (2,), queue="reports") == held.b.id
    assert admin.is_locked(tasks.send_report, (2,)) is None


def _hand_over_after_read(monkeypatch: pytest.MonkeyPatch, locks: redis.Redis, key: str) -> None:
    """Make ``key`` change hands just after the admin reads its holder, as a racing enqueue would."""
    read = UniqueLocks._holders

    def read_then_hand_over(self: UniqueLocks, *args: Any) -> Any:
        holders = read(self, *args)
        if key in holders:
            locks.set(key, "newcomer", px=60_000)
        return holders

    monkeypatch.setattr(UniqueLocks, "_holders", read_then_hand_over)


def test_release_spares_a_lock_that_changed_hands(
    celery_app: Celery, tasks: SimpleNamespace, locks: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """release(key) is owner-checked: if the lock changes hands after it was read, it stays."""
    tasks.send_report.apply_async((1,), unique=60)
    (key,) = (k.decode() for k in locks.keys("*"))
    _hand_over_after_read(monkeypatch, locks, key)
    assert UniqueLocks(celery_app).release(key) is False
    assert locks.get(key) == b"newcomer"


def test_clear_spares_a_lock_that_changed_hands(
    celery_app: Celery, held: SimpleNamespace, locks: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """clear() is owner-checked: a lock that changes hands between reading and deleting stays."""
    key = UniqueLocks(celery_app).list(queue="reports")[0].key
    _hand_over_after_read(monkeypatch, locks, key)
    assert UniqueLocks(celery_app).clear() == 2
    assert [k.decode() for k in locks.keys("*")] == [key]
    assert locks.get(key) == b"newcomer"


def test_list_skips_other_keys(celery_app: Celery, held: SimpleNamespace, locks: redis.Redis) -> None:
    """Keys outside the prefix or the key layout are neither listed nor cleared."""
    others = {
        "other:thing": "x",
        "unique:eu:celery:tests.send_report:abc": "x",  # an app with prefix "unique:eu"
        "unique:celery:tests*any:abc": "x",  # not escaped as format_key escapes
        "unique:celery:tests%41:abc": "x",  # escaped where format_key does not escape
        "unique:celery:tests.send_report:": "x",  # no digest
    }
    for key, value in others.items():
        locks.set(key, value, px=60_000)
    locks.rpush("unique:celery:tests.send_report:a-list", "x")
    locks.pexpire("unique:celery:tests.send_report:a-list", 60_000)
    admin = UniqueLocks(celery_app)
    assert len(admin.list()) == 3
    assert admin.count() == 3
    assert admin.clear() == 3
    assert locks.dbsize() == len(others) + 1


def test_holder_that_is_not_utf8(celery_app: Celery, locks: redis.Redis) -> None:
    """A lock whose value is not UTF-8 (not written by a task) is listed escaped, and cleared."""
    key = "unique:celery:tests.send_report:abc"
    locks.set(key, b"\xff\xfe", px=60_000)
    admin = UniqueLocks(celery_app)
    assert [lock.task_id for lock in admin.list()] == ["\\xff\\xfe"]
    assert admin.clear() == 1
    assert locks.dbsize() == 0


def test_release_refuses_keys_that_are_not_locks(
    redis_server: RedisServer, broker: redis.Redis
) -> None:
    """release() of a key that is not a lock of the app is a ValueError naming it, and deletes nothing."""
    # Locks in the broker's own database, as when unique_redis_url is not set.
    app = Celery("shared", broker=redis_server.url(0), set_as_current=False)
    app.conf.broker_connection_retry_on_startup = False
    task = app.task(name="tests.plain", shared=False)(_nothing)
    task.delay()  # the broker's own keys: the queue list and kombu's binding set
    broker.set("unique:celery:tests.plain", "x")  # the right prefix, but a part short
    broker.set("other:celery:tests.plain:abc", "x")  # another app's prefix
    before = sorted(broker.keys("*"))
    assert b"celery" in before
    admin = UniqueLocks(app)
    for key in [k.decode() for k in before]:
        with pytest.raises(ValueError, match="is not a lock key of this app") as info:
            admin.release(key)
        assert repr(key) in str(info.value)
    assert sorted(broker.keys("*")) == before


def test_release_of_a_lock_shaped_key_of_another_type(celery_app: Celery, locks: redis.Redis) -> None:
    """A key laid out like a lock but holding a list is not released, and raises no WRONGTYPE."""
    key = "unique:celery:tests.send_report:a-list"
    locks.rpush(key, "x")
    locks.pexpire(key, 60_000)
    assert UniqueLocks(celery_app).release(key) is False
    assert locks.type(key) == b"list"


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda admin, task: admin.list(), id="list"),
        pytest.param(lambda admin, task: list(admin.iter_locks()), id="iter_locks"),
        pytest.param(lambda admin, task: admin.count(), id="count"),
        pytest.param(lambda admin, task: admin.clear(task_name="tests.send_report"), id="clear"),
        pytest.param(lambda admin, task: admin.release("unique:celery:tests.send_report:abc"), id="release"),
        pytest.param(lambda admin, task: admin.is_locked(task, (1,)), id="is_locked"),
    ],
)
def test_every_admin_call_raises_lock_store_error(offline_app: Celery, call: Any) -> None:
    """With the lock store stopped, each public admin call raises LockStoreError, the Redis error as cause."""
    admin = UniqueLocks(offline_app)
    with pytest.raises(LockStoreError, match="did not answer") as info:
        call(admin, offline_app.tasks["tests.send_report"])
    assert isinstance(info.value.__cause__, redis.ConnectionError)
    assert "unique:" in info.value.key
    copy = pickle.loads(pickle.dumps(info.value))
    assert str(copy) == str(info.value)


def test_lock_store_error_with_a_node_pickles() -> None:
    """A LockStoreError naming a node keeps it through pickling; one without keeps its three args."""
    error = LockStoreError("", "unique:*:*:*", "ConnectionError: refused", node="10.0.0.3:7002")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.node, copy.key, str(copy)) == ("10.0.0.3:7002", error.key, str(error))
    assert "node 10.0.0.3:7002" in str(copy)
    assert LockStoreError("t", "k", "r").args == ("t", "k", "r")


def test_clear_locks_fixture(
    request: pytest.FixtureRequest, tasks: SimpleNamespace, locks: redis.Redis
) -> None:
    """The clear_unique_locks fixture clears the app's locks at setup."""
    tasks.send_report.apply_async((1,), unique=60)
    request.getfixturevalue("clear_unique_locks")
    assert locks.dbsize() == 0
    tasks.send_report.apply_async((1,), unique=60)
    assert clear_locks(request.getfixturevalue("celery_app")) == 1


@pytest.fixture
def tagged_app(redis_server: RedisServer) -> Celery:
    """An app whose key prefix is a hash tag, "{locks}": its running markers match its SCAN pattern."""
    app = Celery("tagged", set_as_current=False)
    app.conf.update(
        broker_url=redis_server.url(0), result_backend=redis_server.url(1),
        unique_redis_url=redis_server.url(2), unique_key_prefix="{locks}",
        broker_connection_retry_on_startup=False,
    )
    app.task(base=UniqueTask, name="tests.send_report", shared=False)(_report)
    return app


def test_running_markers_are_not_locks(tagged_app: Celery, redis_server: RedisServer) -> None:
    """count, list, describe and clear skip running markers, also when the SCAN pattern matches them."""
    task = tagged_app.tasks["tests.send_report"]
    for i in range(3):
        task.apply_async((i,), unique=60)
    admin = UniqueLocks(tagged_app)
    store = redis_server.client(2)
    for lock in admin.list():
        store.set(running_marker_key(lock.key, lock.task_id), "r|0|0||9999999999999|worker/1|m:1", px=60_000)
    assert len(list(store.scan_iter(match="{locks}:*:*:*"))) == 6  # what the admin's SCAN finds
    assert admin.count() == 3
    assert len(admin.list()) == 3
    assert [status.running for status in admin.describe()] == [True] * 3
    assert admin.clear() == 3
    assert store.dbsize() == 3  # the markers, left to their TTL


# -- describe: age and holder state ---------------------------------------------


@pytest.fixture
def gate(celery_app: Celery) -> Iterator[threading.Event]:
    """A task, tests.gated, that runs until the test opens the gate (at the latest when it ends)."""
    opened = threading.Event()

    @celery_app.task(base=UniqueTask, name="tests.gated", track_started=True)
    def gated(user_id: int) -> int:
        opened.wait(30)
        return user_id

    yield opened
    opened.set()


@pytest.fixture
def gated_worker(celery_app: Celery, tasks: SimpleNamespace, gate: threading.Event) -> Iterator[Any]:
    """A real worker (solo pool, in a thread) that knows tests.gated too."""
    with start_worker(celery_app, pool="solo", perform_ping_check=False, shutdown_timeout=20) as w:
        yield w
        gate.set()


def test_describe_tells_what_each_holder_is_doing(
    celery_app: Celery, tasks: SimpleNamespace, gated_worker: Any, locks: redis.Redis
) -> None:
    """describe() gives each lock's age and its holder's stored state (STARTED while it runs)."""
    before = time.time()
    failed = tasks.fail.apply_async((1,), unique=60)  # unique_until="success": kept on FAILURE
    done = tasks.send_report.apply_async((2,), unique=60)
    wait_until(lambda: failed.state == "FAILURE" and done.state == "SUCCESS", what="both ended")
    # A release that never happened (a worker without celery_unique): put it
    # back, once the real one (just after the result is stored) is done.
    done_key = tasks.send_report.lock_key((2,), None, {})
    wait_until(lambda: locks.get(done_key) is None, what="the release after SUCCESS")
    locks.set(done_key, done.id, px=60_000)
    queued = tasks.send_report.apply_async((3,), unique=60, queue="nobody")
    chosen = tasks.send_report.apply_async((4,), unique=60, queue="nobody", task_id="report-4")
    running = celery_app.tasks["tests.gated"].apply_async((5,), unique=60)
    admin = UniqueLocks(celery_app)
    wait_until(lambda: any(s.state == "STARTED" for s in admin.describe()), what="the gated task to run")
    after = time.time()
    statuses = {status.task_id: status for status in admin.describe()}
    assert {task_id: (s.state, s.running) for task_id, s in statuses.items()} == {
        failed.id: ("FAILURE", False),
        done.id: ("SUCCESS", False),
        queued.id: ("PENDING", False),
        chosen.id: ("PENDING", False),
        # An unmarked run (Celery's defaults) has no marker: task_track_started tells.
        running.id: ("STARTED", False),
    }
    assert statuses["report-4"].issued_at is None
    assert statuses["report-4"].age is None
    for task_id in (failed.id, done.id, queued.id, running.id):
        status = statuses[task_id]
        assert status.issued_at is not None
        assert before - 0.001 <= status.issued_at.timestamp() <= after
        assert status.age is not None
        assert 0 <= status.age <= time.time() - before + 0.001
    listed = {lock.task_id: lock for lock in admin.list()}
    assert statuses["report-4"][:4] == listed["report-4"][:4]  # LockInfo's fields first, in order


def test_describe_reads_states_in_one_round_trip(redis_server: RedisServer) -> None:
    """describe() reads the states of a batch's holders with one MGET, never a GET per holder."""
    with RedisServer() as results:
        app = Celery("batched", set_as_current=False)
        app.conf.update(
            broker_url=redis_server.url(0), result_backend=results.url(1),
            unique_redis_url=redis_server.url(2), broker_connection_retry_on_startup=False,
            task_ignore_result=True,
        )
        task = app.task(base=UniqueTask, name="tests.send_report", shared=False)(_report)
        ids = [task.apply_async((i,), unique=60).id for i in range(30)]
        for task_id in ids[:10]:
            app.backend.mark_as_done(task_id, 1)
        results.client().config_resetstat()
        statuses = UniqueLocks(app).describe()
        stats = results.client().info("commandstats")
    assert sorted(s.state for s in statuses) == ["PENDING"] * 20 + ["SUCCESS"] * 10
    assert stats["cmdstat_mget"]["calls"] == 1
    assert "cmdstat_get" not in stats


def test_describe_without_a_result_backend(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """With no result backend, describe() leaves states unknown, warns of nothing, and still tells ages."""
    app = Celery("no_results", set_as_current=False)
    app.conf.update(
        broker_url=redis_server.url(0), unique_redis_url=redis_server.url(2),
        broker_connection_retry_on_startup=False,
    )
    task = app.task(base=UniqueTask, name="tests.send_report", shared=False)(_report)
    task.apply_async((1,), unique=60)
    with caplog.at_level(logging.WARNING, logger="celery_unique.admin"):
        (status,) = UniqueLocks(app).describe()
    assert (status.state, status.running) == (None, False)
    assert status.age is not None
    assert caplog.records == []


def test_describe_with_the_result_backend_down(
    redis_server: RedisServer, stopped_server: RedisServer, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A result backend that does not answer leaves every state unknown, in one warning for all batches."""
    monkeypatch.setattr(UniqueLocks, "BATCH", 5)
    for backend in (None, stopped_server.url(1)):  # one app takes the locks, the other reads them
        app = Celery("results_down", set_as_current=False)
        app.conf.update(
            broker_url=redis_server.url(0), unique_redis_url=redis_server.url(2),
            broker_connection_retry_on_startup=False, result_backend=backend,
        )
        task = app.task(base=UniqueTask, name="tests.send_report", shared=False)(_report)
        if backend is None:
            for i in range(40):
                task.apply_async((i,), unique=60)
    with caplog.at_level(logging.WARNING, logger="celery_unique.admin"):
        statuses = UniqueLocks(app).describe()
    assert len(statuses) == 40
    assert {s.state for s in statuses} == {None}
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["the result backend failed"]
    assert "ConnectionError" in caplog.records[0].getMessage()


def test_describe_of_a_lock_that_changed_hands(
    celery_app: Celery, tasks: SimpleNamespace, locks: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock that changes hands between describe()'s two reads shows its new holder, running unknown."""
    tasks.send_report.apply_async((1,), unique=60)
    (key,) = (k.decode() for k in locks.keys("*"))
    _hand_over_after_read(monkeypatch, locks, key)
    (status,) = UniqueLocks(celery_app).describe()
    assert (status.task_id, status.state, status.running, status.age) == ("newcomer", "PENDING", None, None)


def test_lock_status_keeps_lock_info_fields_first() -> None:
    """LockStatus starts with LockInfo's fields, in order, and its four new ones default to unknown."""
    from celery_unique import LockInfo

    assert LockStatus._fields[:5] == LockInfo._fields
    status = LockStatus("k", "t", "q", "id", 1.0)
    assert (status.issued_at, status.age, status.state, status.running) == (None, None, None, None)


# -- Redis Cluster with a primary down ----------------------------------------


@pytest.fixture
def wounded_cluster(redis_server: RedisServer) -> Iterator[SimpleNamespace]:
    """A fresh 3-primary cluster holding 30 locks, with an app on it; the test stops a node."""
    with LocalCluster() as cluster:
        app = Celery("wounded", set_as_current=False)
        app.conf.update(
            broker_url=redis_server.url(0), broker_connection_retry_on_startup=False,
            unique_redis_url=cluster.url, unique_redis_cluster=True, unique_redis_socket_timeout=1,
        )
        task = app.task(base=UniqueTask, name="tests.cluster_report", shared=False)(_report)
        for i in range(30):
            task.apply_async((i,), unique=60)
        yield SimpleNamespace(cluster=cluster, app=app, task=task)


def test_cluster_with_a_primary_down(wounded_cluster: SimpleNamespace) -> None:
    """With a primary down, list and clear raise LockStoreError naming it, before and after the
    cluster notices; clear releases nothing on the primaries still up."""
    cluster: LocalCluster = wounded_cluster.cluster
    admin = UniqueLocks(wounded_cluster.app)
    assert admin.count() == 30
    down, *up = cluster.nodes[::-1]
    held_up = [node.client().dbsize() for node in up]
    down.stop()

    def check() -> None:
        for call in (admin.list, admin.count, admin.clear, lambda: list(admin.iter_locks())):
            with pytest.raises(LockStoreError) as info:
                call()
            assert info.value.node == f"127.0.0.1:{down.port}", info.value
            assert f"node 127.0.0.1:{down.port}" in str(info.value)
        assert [node.client().dbsize() for node in up] == held_up

    check()  # the other primaries still serve their slots
    wait_until(
        lambda: up[0].client().cluster("INFO")["cluster_state"] == "fail",
        timeout=20, what="the cluster to mark the primary down",
    )
    check()  # every primary now answers CLUSTERDOWN to key commands


# -- the command line ------------------------------------------------------------


def celery_cli(
    server: RedisServer,
    *args: str,
    stdin: str | None = None,
    lock_url: str | None = None,
    settings: dict[str, Any] | None = None,
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CLI_BROKER_URL": server.url(0),
        "CLI_LOCK_URL": lock_url or server.url(2),
        "CLI_SETTINGS": json.dumps(settings or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.cli_app", "unique", *args],
        env=env, input=stdin, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )


def test_cli_list_release_clear(redis_server: RedisServer, held: SimpleNamespace, locks: redis.Redis) -> None:
    """`celery -A app unique list|release|clear` work in a real subprocess, with plurals."""
    listing = celery_cli(redis_server, "list")
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines()[0] == f"Lock store: {redis_server.url(2)} (unique_redis_url)"
    assert listing.stdout.splitlines()[1].split() == ["TASK", "QUEUE", "HOLDER", "AGE", "TTL", "STATE", "KEY"]
    assert held.a.id in listing.stdout
    assert "3 locks held." in listing.stdout

    only = celery_cli(redis_server, "list", "--queue", "reports")
    assert held.b.id in only.stdout
    assert held.a.id not in only.stdout
    assert "1 lock held (queue reports)." in only.stdout

    key = locks.keys("*:reports:*")[0].decode()
    released = celery_cli(redis_server, "release", key)
    assert released.returncode == 0
    assert f"Released {key}" in released.stdout
    again = celery_cli(redis_server, "release", key)
    assert again.returncode == 1
    assert f"Error: No lock held at {key} in {redis_server.url(2)} (unique_redis_url)." in again.stderr

    declined = celery_cli(redis_server, "clear", stdin="n\n")
    assert declined.returncode != 0
    assert "Release 2 locks?" in declined.stdout
    assert locks.dbsize() == 2
    cleared = celery_cli(redis_server, "clear", "--task", "tests.slow", "--yes")
    assert "Released 1 lock (task tests.slow)." in cleared.stdout
    assert locks.dbsize() == 1
    confirmed = celery_cli(redis_server, "clear", stdin="y\n")
    assert confirmed.returncode == 0
    assert "Release 1 lock?" in confirmed.stdout
    assert "Released 1 lock." in confirmed.stdout
    assert locks.dbsize() == 0
    assert "No locks held." in celery_cli(redis_server, "list").stdout


def test_cli_release_refuses_a_key_that_is_not_a_lock(redis_server: RedisServer, broker: redis.Redis) -> None:
    """`unique release` of a broker key exits 2 naming the key, and leaves the key alone."""
    broker.rpush("celery", "a message")
    result = celery_cli(redis_server, "release", "celery", lock_url=redis_server.url(0))
    assert result.returncode == 2
    assert "'celery' is not a lock key of this app" in result.stderr
    assert "Traceback" not in result.stderr
    assert broker.llen("celery") == 1


@pytest.mark.parametrize(
    "args",
    [
        ("list",), ("list", "--json"), ("count",), ("count", "--json"), ("clear", "--yes"), ("clear",),
        ("release", "unique:celery:tests.send_report:abc"),
    ],
)
def test_cli_lock_store_down_is_one_line(
    redis_server: RedisServer, stopped_server: RedisServer, args: tuple[str, ...]
) -> None:
    """With the lock store stopped, each subcommand prints one `Error:` line and exits 1, and no JSON."""
    result = celery_cli(redis_server, *args, lock_url=stopped_server.url(2))
    assert result.returncode == 1, result
    assert result.stderr.startswith("Error: the lock store did not answer"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    if "--json" in args:
        assert result.stdout == ""


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"unique_redis_socket_timeout": "fast"}, "Error: unique_redis_socket_timeout must be"),
        ({"unique_redis_url": "http://127.0.0.1/2"}, "Error: unique_redis_url is not a Redis URL"),
        ({"unique_redis_url": None, "broker_url": "amqp://127.0.0.1//"}, "Error: celery_unique needs a"),
    ],
)
def test_cli_bad_setting_is_one_line(
    redis_server: RedisServer, settings: dict[str, Any], message: str
) -> None:
    """A bad setting prints one `Error:` line naming it and exits 1."""
    result = celery_cli(redis_server, "list", settings=settings)
    assert result.returncode == 1, result
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_cli_names_the_store_without_its_password(redis_server: RedisServer) -> None:
    """list and clear name the lock store they read, the password hidden."""
    with RedisServer() as guarded:
        guarded.client().config_set("requirepass", "s3cret")
        url = f"redis://:s3cret@127.0.0.1:{guarded.port}/2"
        for args in (("list",), ("clear", "--yes")):
            result = celery_cli(redis_server, *args, lock_url=url)
            assert result.returncode == 0, result.stderr
            assert result.stdout.splitlines() == [
                f"Lock store: redis://:***@127.0.0.1:{guarded.port}/2 (unique_redis_url)",
                "No locks held.",
            ]


def test_cli_store_line_hides_the_password_and_names_the_broker_fallback() -> None:
    """The CLI's store line is describe_store's: password hidden, the broker fallback named."""
    app = Celery("fallback", broker="redis://:pw@127.0.0.1:1/0", set_as_current=False)
    assert describe_store(app) == "redis://:***@127.0.0.1:1/0 (from broker_url)"


def test_plural() -> None:
    """Counts are spelt with the right plural."""
    assert [_plural(n, "lock") for n in (0, 1, 2)] == ["0 locks", "1 lock", "2 locks"]


def test_cli_task_short_names(
    redis_server: RedisServer, held: SimpleNamespace, tasks: SimpleNamespace
) -> None:
    """--task takes an unambiguous short name, and lists the candidates when it is ambiguous or unknown."""
    short = celery_cli(redis_server, "list", "--task", "slow")
    assert short.returncode == 0, short.stderr
    assert held.c.id in short.stdout
    assert "1 lock held (task tests.slow)." in short.stdout

    ambiguous = celery_cli(redis_server, "list", "--task", "send_report")
    assert ambiguous.returncode == 2
    assert "could be any of reports.daily.send_report, tests.send_report" in ambiguous.stderr

    dotted = celery_cli(redis_server, "list", "--task", "daily.send_report")
    assert dotted.returncode == 0, dotted.stderr
    assert "No locks held (task reports.daily.send_report)." in dotted.stdout

    typo = celery_cli(redis_server, "clear", "--task", "send_reprot", "--yes")
    assert typo.returncode == 2
    assert "did you mean reports.daily.send_report or tests.send_report?" in typo.stderr
    assert "Traceback" not in typo.stderr

    # A task the CLI's app does not register, with locks held under its full name.
    failing = tasks.fail.apply_async((1,), unique=60)
    unregistered = celery_cli(redis_server, "clear", "--task", "tests.fail", "--yes")
    assert unregistered.returncode == 0, unregistered.stderr
    assert "Released 1 lock (task tests.fail)." in unregistered.stdout
    assert failing.id not in celery_cli(redis_server, "list").stdout


def results_of(server: RedisServer) -> dict[str, Any]:
    """The CLI app's settings for the suite's result backend."""
    return {"result_backend": server.url(1)}


def table_cells(listing: str) -> dict[str, list[str]]:
    """Cut the table `unique list` printed into cells by its header's columns, rows keyed by holder.

    Fails unless each column starts at the same place in every row, two spaces after the previous one.
    """
    lines = listing.splitlines()
    header, rows = lines[1], lines[2:-1]
    starts = [header.index(name) for name in ("QUEUE", "HOLDER", "AGE", "TTL", "STATE", "KEY")]
    cells = {}
    for row in rows:
        assert all(row[start - 2:start] == "  " and row[start] != " " for start in starts), row
        bounds = [0, *starts, len(row)]
        cell = [row[a:b].strip() for a, b in itertools.pairwise(bounds)]
        cells[cell[2]] = cell
    return cells


def test_cli_list_shows_age_ttl_and_state(
    redis_server: RedisServer, celery_app: Celery, held: SimpleNamespace, locks: redis.Redis
) -> None:
    """`unique list` shows each lock's age, TTL and holder state in aligned columns, `-` where unknown."""
    celery_app.backend.mark_as_done(held.a.id, "report")  # finished, its release missed
    slow_key = next(k.decode() for k in locks.keys("*") if b"tests.slow" in k)
    locks.set(running_marker_key(slow_key, held.c.id), "r|0|0||9999999999999|worker/1|m:1", px=60_000)
    chosen = celery_app.tasks["tests.send_report"].apply_async((9,), unique=60, task_id="report-9")
    listing = celery_cli(redis_server, "list", settings=results_of(redis_server))
    assert listing.returncode == 0, listing.stderr
    cells = table_cells(listing.stdout)
    assert re.fullmatch(r"\d+s", cells[held.a.id][3])  # taken seconds ago
    assert re.fullmatch(r"5\ds", cells[held.a.id][4])  # unique=60
    assert cells[held.a.id][5] == "SUCCESS"
    assert re.fullmatch(r"1m5\ds", cells[held.b.id][4])  # unique=120
    assert cells[held.b.id][5] == "PENDING"
    assert cells[held.c.id][1:6:4] == ["odd: queue ü", "PENDING, running"]
    assert cells[chosen.id][3:6:2] == ["-", "PENDING"]  # a caller's id tells no age
    assert listing.stdout.splitlines()[-1] == "4 locks held."

    unknown = celery_cli(redis_server, "list")  # no result backend: states unknown
    states = {holder: cell[5] for holder, cell in table_cells(unknown.stdout).items()}
    assert states == {held.a.id: "-", held.b.id: "-", held.c.id: "running", chosen.id: "-"}


def test_cli_list_json(
    redis_server: RedisServer, celery_app: Celery, held: SimpleNamespace, locks: redis.Redis
) -> None:
    """`unique list --json` prints one JSON document with every field of the table, as raw numbers."""
    celery_app.backend.mark_as_done(held.a.id, "report")
    chosen = celery_app.tasks["tests.send_report"].apply_async((9,), unique=60, task_id="report-9")
    result = celery_cli(
        redis_server, "list", "--json", "--task", "tests.send_report", "--queue", "celery",
        settings=results_of(redis_server),
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    document = json.loads(result.stdout)
    assert list(document) == ["lock_store", "filter", "count", "locks"]
    assert document["lock_store"] == f"{redis_server.url(2)} (unique_redis_url)"
    assert document["filter"] == {"task_name": "tests.send_report", "queue": "celery"}
    assert document["count"] == 2
    by_id = {lock["task_id"]: lock for lock in document["locks"]}
    made, unknown = by_id[held.a.id], by_id[chosen.id]
    assert list(made) == [
        "key", "slot", "task_name", "queue", "task_id", "ttl", "issued_at", "age", "state", "running"
    ]
    key = next(k.decode() for k in locks.keys("*") if locks.get(k) == held.a.id.encode())
    assert (made["key"], made["task_name"], made["queue"]) == (key, "tests.send_report", "celery")
    assert made["slot"] == 1
    assert isinstance(made["ttl"], float)
    assert 0 < made["ttl"] <= 60
    assert isinstance(made["age"], float)
    assert made["age"] >= 0
    issued = datetime.fromisoformat(made["issued_at"])
    assert issued == issued_at(held.a.id)
    assert (made["state"], made["running"]) == ("SUCCESS", False)
    assert (unknown["issued_at"], unknown["age"], unknown["state"]) == (None, None, "PENDING")

    empty = json.loads(celery_cli(redis_server, "list", "--json", "--queue", "none").stdout)
    assert (empty["count"], empty["locks"]) == (0, [])


def test_cli_list_with_the_result_backend_down(
    redis_server: RedisServer, stopped_server: RedisServer, held: SimpleNamespace
) -> None:
    """With the result backend down, `unique list` still lists, states `-`, and warns once on stderr."""
    for args in (("list",), ("list", "--json")):
        result = celery_cli(redis_server, *args, settings={"result_backend": stopped_server.url(1)})
        assert result.returncode == 0, result.stderr
        assert result.stderr.startswith("Warning: the result backend failed (ConnectionError"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert {lock["state"] for lock in json.loads(result.stdout)["locks"]} == {None}


def test_cli_count(redis_server: RedisServer, held: SimpleNamespace, locks: redis.Redis) -> None:
    """`unique count` counts the locks, filtered, as text or JSON, and leaves running markers out."""
    slow_key = next(k.decode() for k in locks.keys("*") if b"tests.slow" in k)
    locks.set(running_marker_key(slow_key, held.c.id), "r|0|0||9999999999999|worker/1|m:1", px=60_000)
    every = celery_cli(redis_server, "count")
    assert every.returncode == 0, every.stderr
    store = f"Lock store: {redis_server.url(2)} (unique_redis_url)"
    assert every.stdout.splitlines() == [store, "3 locks held."]
    one = celery_cli(redis_server, "count", "--task", "send_report", "--queue", "reports")
    assert one.returncode == 2  # send_report is ambiguous in the CLI's app
    one = celery_cli(redis_server, "count", "--task", "tests.send_report", "--queue", "reports")
    assert one.stdout.splitlines()[-1] == "1 lock held (task tests.send_report, queue reports)."
    counted = celery_cli(redis_server, "count", "--json", "--task", "slow")
    assert json.loads(counted.stdout) == {
        "lock_store": f"{redis_server.url(2)} (unique_redis_url)",
        "filter": {"task_name": "tests.slow", "queue": None},
        "count": 1,
    }


def test_cli_reap_and_purge_json(
    redis_server: RedisServer, celery_app: Celery, held: SimpleNamespace, locks: redis.Redis
) -> None:
    """`unique reap --json` and `unique purge --json` print what they released; purge asks on stderr."""
    celery_app.backend.mark_as_done(held.a.id, "report")
    reaped = celery_cli(redis_server, "reap", "--json", settings=results_of(redis_server))
    assert reaped.returncode == 0, reaped.stderr
    assert json.loads(reaped.stdout) == {
        "lock_store": f"{redis_server.url(2)} (unique_redis_url)",
        "filter": {"task_name": None, "queue": None},
        "released": 1,
    }
    assert locks.dbsize() == 2

    declined = celery_cli(redis_server, "purge", "--json", "-Q", "reports", stdin="n\n")
    assert declined.returncode == 1
    assert declined.stdout == ""
    assert "Delete every message of 1 queue (reports)" in declined.stderr
    purged = celery_cli(redis_server, "purge", "--json", "-Q", "reports", stdin="y\n")
    assert purged.returncode == 0, purged.stderr
    assert json.loads(purged.stdout) == {
        "lock_store": f"{redis_server.url(2)} (unique_redis_url)",
        "queues": ["reports"], "messages": 1, "released": 1,
    }
    # One lock left, and the purged task's marker ("x|...": a copy of it is dropped).
    assert locks.dbsize() == 1
    raw = redis.Redis(connection_pool=locks.connection_pool)
    assert [key for key in raw.keys("unique:run:*") if (raw.get(key) or b"").startswith(b"x|")]
    nothing = celery_cli(redis_server, "purge", "--json", "-f", "-Q", "reports", "-X", "reports")
    assert json.loads(nothing.stdout)["queues"] == []


def test_duration() -> None:
    """Ages and TTLs are spelt in their two largest units, rounded down; unknown is `-`."""
    seconds = (None, 0, 59.9, 60, 307, 3599.99, 3600, 10_920, 86_399, 86_400, 187_200)
    assert [_duration(s) for s in seconds] == [
        "-", "0s", "59s", "1m00s", "5m07s", "59m59s", "1h00m", "3h02m", "23h59m", "1d00h", "2d04h"
    ]


# -- the benchmark ---------------------------------------------------------------


def test_admin_benchmark_quick_run(redis_server: RedisServer) -> None:
    """`python -m benchmarks.admin --quick` exits 0, prints each figure, and leaves no key behind."""
    client = redis_server.client(5)
    client.flushdb()
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.admin", "--quick"],
        cwd=ROOT, env={**os.environ, "REDIS_URL": redis_server.url(5)},
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    figures = (
        "UniqueLocks.list", "UniqueLocks.describe", "UniqueLocks.clear",
        "celery unique list", "celery unique list --json", "celery unique clear --yes",
    )
    for figure in figures:
        assert f"{figure}:" in result.stdout, result.stdout
    assert client.dbsize() == 0
