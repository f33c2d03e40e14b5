"""The lock admin: UniqueLocks, the `celery unique` command and the test fixture."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import redis
from celery import Celery

from celery_unique import UniqueLocks
from celery_unique.config import app_state
from celery_unique.testing import RedisServer, clear_locks

pytest_plugins = ["celery_unique.testing"]


@pytest.fixture
def held(tasks: SimpleNamespace) -> SimpleNamespace:
    """Three held locks: two of send_report (two queues), one of slow."""
    return SimpleNamespace(
        a=tasks.send_report.apply_async((1,), unique=60),
        b=tasks.send_report.apply_async((2,), unique=120, queue="reports"),
        c=tasks.slow.apply_async((3,), unique=60, queue="odd: queue ü"),
    )


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


def test_release_and_clear(celery_app: Celery, held: SimpleNamespace, locks: redis.Redis) -> None:
    """release(key) says whether it deleted; clear() counts what it deleted."""
    admin = UniqueLocks(celery_app)
    key = admin.list(queue="reports")[0].key
    assert admin.release(key) is True
    assert admin.release(key) is False
    assert admin.clear(task_name="tests.send_report") == 1
    assert admin.clear() == 1
    assert locks.dbsize() == 0


def test_is_locked(celery_app: Celery, tasks: SimpleNamespace, held: SimpleNamespace) -> None:
    """is_locked() names the holder of a call, or None."""
    admin = UniqueLocks(celery_app)
    assert admin.is_locked(tasks.send_report, (1,), {"period": "daily"}) == held.a.id
    assert admin.is_locked(tasks.send_report, (2,), queue="reports") == held.b.id
    assert admin.is_locked(tasks.send_report, (2,)) is None


def test_release_spares_a_lock_that_changed_hands(
    celery_app: Celery, tasks: SimpleNamespace, locks: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """release(key) is owner-checked: if the lock changes hands after it was read, it stays."""
    tasks.send_report.apply_async((1,), unique=60)
    (key,) = (k.decode() for k in locks.keys("*"))
    store = app_state(celery_app).store
    read = store.holder

    def read_then_hand_over(k: str) -> str | None:
        holder = read(k)
        locks.set(k, "newcomer", px=60_000)  # another task takes the lock meanwhile
        return holder

    monkeypatch.setattr(store, "holder", read_then_hand_over)
    assert UniqueLocks(celery_app).release(key) is False
    assert locks.get(key) == b"newcomer"


def test_list_skips_other_keys(celery_app: Celery, held: SimpleNamespace, locks: redis.Redis) -> None:
    """Keys outside the prefix are neither listed nor cleared."""
    locks.set("other:thing", "x")
    assert len(UniqueLocks(celery_app).list()) == 3
    assert UniqueLocks(celery_app).clear() == 3
    assert locks.get("other:thing") == b"x"


def test_clear_locks_fixture(
    request: pytest.FixtureRequest, tasks: SimpleNamespace, locks: redis.Redis
) -> None:
    """The clear_unique_locks fixture clears the app's locks at setup."""
    tasks.send_report.apply_async((1,), unique=60)
    request.getfixturevalue("clear_unique_locks")
    assert locks.dbsize() == 0
    tasks.send_report.apply_async((1,), unique=60)
    assert clear_locks(request.getfixturevalue("celery_app")) == 1


def celery_cli(server: RedisServer, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CLI_BROKER_URL": server.url(0),
        "CLI_LOCK_URL": server.url(2),
    }
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.cli_app", "unique", *args],
        env=env, input=stdin, capture_output=True, text=True, timeout=60, check=False,
    )


def test_cli_list_release_clear(redis_server: RedisServer, held: SimpleNamespace, locks: redis.Redis) -> None:
    """`celery -A app unique list|release|clear` work in a real subprocess."""
    listing = celery_cli(redis_server, "list")
    assert listing.returncode == 0, listing.stderr
    assert "TASK" in listing.stdout
    assert held.a.id in listing.stdout
    assert "3 locks held." in listing.stdout

    only = celery_cli(redis_server, "list", "--queue", "reports")
    assert held.b.id in only.stdout
    assert held.a.id not in only.stdout

    key = locks.keys("*:reports:*")[0].decode()
    released = celery_cli(redis_server, "release", key)
    assert released.returncode == 0
    assert f"Released {key}" in released.stdout
    again = celery_cli(redis_server, "release", key)
    assert again.returncode != 0
    assert "No lock held" in again.stderr

    declined = celery_cli(redis_server, "clear", stdin="n\n")
    assert declined.returncode != 0
    assert locks.dbsize() == 2
    cleared = celery_cli(redis_server, "clear", "--task", "tests.slow", "--yes")
    assert "Released 1 locks." in cleared.stdout
    assert locks.dbsize() == 1
    confirmed = celery_cli(redis_server, "clear", stdin="y\n")
    assert confirmed.returncode == 0
    assert locks.dbsize() == 0
    assert "No locks held." in celery_cli(redis_server, "list").stdout
