"""celery_unique.testing: lock cleanup and eager runs for a project's own tests."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import redis
from celery import Celery

from celery_unique import DuplicateTaskError
from celery_unique.testing import RedisServer, eager_tasks

pytest_plugins = ["pytester"]


def test_eager_tasks_runs_inline_and_restores_settings(
    celery_app: Celery, tasks: SimpleNamespace, locks: redis.Redis
) -> None:
    """In the block tasks run in the caller and their errors reach it; after it, settings are back."""
    celery_app.conf.task_eager_propagates = False
    tasks.send_report.apply_async((1,), unique=60)  # queued, not run: its lock is held
    with eager_tasks(celery_app) as app:
        assert app is celery_app
        assert locks.dbsize() == 0
        result = tasks.send_report.apply_async((1,), unique=60)
        assert result.get() == "report 1 daily"
        with pytest.raises(RuntimeError, match="cannot report on 2"):
            tasks.fail.apply_async((2,), unique=60)
    assert celery_app.conf.task_always_eager is False
    assert celery_app.conf.task_eager_propagates is False
    assert "task_always_eager" not in celery_app.conf.changes
    assert locks.dbsize() == 0


def test_eager_tasks_clears_locks_when_the_block_fails(
    celery_app: Celery, tasks: SimpleNamespace, locks: redis.Redis
) -> None:
    """A block that raises still gets its settings restored and its locks cleared."""
    def failing_test() -> None:
        with eager_tasks(celery_app):
            # A lock another task holds, as a failed or queued task leaves one.
            locks.set(tasks.send_report.lock_key((3,), None, {}), "another-task", ex=60)
            tasks.send_report.apply_async((3,), unique=60)

    with pytest.raises(DuplicateTaskError):
        failing_test()
    assert celery_app.conf.task_always_eager is False
    assert locks.dbsize() == 0


CONFTEST = """
import pytest
from celery import Celery
from celery_unique import UniqueTask

pytest_plugins = ["celery_unique.testing"]

app = Celery("proj", broker="{broker}")
app.conf.unique_redis_url = "{locks}"


@app.task(base=UniqueTask, unique=60)
def ping(n):
    return n


@pytest.fixture(scope="session")
def celery_unique_app():
    return app
"""

FIXTURE_TESTS = """
import redis
from conftest import app, ping

LOCKS = redis.Redis.from_url("{locks}")


def test_a_leaves_a_lock(clear_unique_locks):
    ping.delay(1)
    assert LOCKS.dbsize() == 1


def test_b_finds_it_cleared_and_leaves_one():
    assert LOCKS.dbsize() == 0
    ping.delay(2)


def test_c_starts_clean(clear_unique_locks):
    assert LOCKS.dbsize() == 0


def test_d_runs_eagerly(eager_unique_tasks):
    assert eager_unique_tasks is app
    assert ping.delay(1).get() == 1
    assert ping.delay(1).get() == 1


def test_e_settings_are_back():
    assert app.conf.task_always_eager is False
"""


def test_fixtures_use_the_projects_app(pytester: pytest.Pytester, redis_server: RedisServer) -> None:
    """clear_unique_locks and eager_unique_tasks act on the app of the project's celery_unique_app."""
    urls = {"broker": redis_server.url(0), "locks": redis_server.url(2)}
    pytester.makeconftest(CONFTEST.format(**urls))
    pytester.makepyfile(test_project=FIXTURE_TESTS.format(**urls))
    result = pytester.runpytest_subprocess("-p", "no:celery", "-p", "no:django", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)
    assert redis_server.client(2).dbsize() == 0


def test_fixtures_without_an_app_say_what_to_define(pytester: pytest.Pytester) -> None:
    """Without celery_unique_app (or Celery's celery_app) the fixture fails saying what to define."""
    pytester.makeconftest('pytest_plugins = ["celery_unique.testing"]\n')
    pytester.makepyfile(test_project="def test_x(clear_unique_locks):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:celery", "-p", "no:django", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*define a 'celery_unique_app' fixture returning your Celery app*"])
