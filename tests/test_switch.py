"""The switch that turns locking off: unique_enabled, CELERY_UNIQUE_ENABLED and the testing helpers.

A lock store on a closed port shows that nothing connects to it: any Redis
call there fails the call with ``LockStoreError``, as the control tests show.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker

from celery_unique import ConfigurationError, DuplicateTaskError, LockStoreError, UniqueTask, config
from celery_unique.config import app_state
from celery_unique.testing import RedisServer, eager_tasks, free_port, locking_disabled
from tests.conftest import BROKER_DB, LOCK_DB, RESULT_DB

pytest_plugins = ["pytester"]

WARNING = "celery_unique: locking is disabled ({}): unique tasks are published without locks"


def make_app(broker: str, lock_store: str, backend: str | None = None, **conf: Any) -> Celery:
    """An app with the unique task ``tests.switch`` (a default TTL of 60 s) and the given settings."""
    app = Celery("switch", broker=broker, backend=backend, set_as_current=False)
    app.conf.update(
        broker_connection_retry_on_startup=False, task_default_queue="celery",
        unique_redis_url=lock_store, **conf,
    )

    @app.task(base=UniqueTask, name="tests.switch", shared=False, unique=60)
    def switch_task(x: int) -> int:
        if x < 0:
            raise RuntimeError(f"negative {x}")
        return x

    return app


def closed_port_url(db: int = 0) -> str:
    """A Redis URL nothing listens on: connecting there is refused at once."""
    return f"redis://127.0.0.1:{free_port()}/{db}"


def enqueue(app: Celery, x: int = 1, **options: Any) -> Any:
    return app.tasks["tests.switch"].apply_async((x,), **options)


def messages(broker: redis.Redis) -> list[dict[str, Any]]:
    """The messages queued on the ``celery`` queue, oldest first."""
    return [json.loads(raw) for raw in reversed(broker.lrange("celery", 0, -1))]


@pytest.fixture
def no_switch_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment does not decide: the app's settings do."""
    monkeypatch.delenv("CELERY_UNIQUE_ENABLED", raising=False)


@pytest.fixture
def disabled_app(redis_server: RedisServer, no_switch_variable: None) -> Celery:
    """An app with unique_enabled=False, its broker on the test Redis and its lock store on a closed port."""
    return make_app(redis_server.url(BROKER_DB), closed_port_url(), unique_enabled=False)


# --- the switch on the producer ------------------------------------------------------------------


def test_locked_call_needs_the_lock_store(redis_server: RedisServer, no_switch_variable: None) -> None:
    """Control: with the switch on, a unique call against the closed lock store fails, publishing nothing."""
    app = make_app(redis_server.url(BROKER_DB), closed_port_url())
    with pytest.raises(LockStoreError):
        enqueue(app)
    assert redis_server.client(BROKER_DB).llen("celery") == 0


def test_disabled_publishes_without_locks(disabled_app: Celery, broker: redis.Redis) -> None:
    """With unique_enabled=False, duplicates publish as plain Celery calls, touching no lock store."""
    first = enqueue(disabled_app)
    second = enqueue(disabled_app, unique=600, unique_until="finish", on_duplicate="raise")
    queued = messages(broker)
    assert [m["headers"]["id"] for m in queued] == [first.id, second.id]
    for message in queued:
        assert "celery_unique_lock" not in message["headers"]
        assert "celery_unique_until" not in message["headers"]
        assert not any(name in message["properties"] for name in ("unique", "unique_until"))
    assert app_state(disabled_app)._store is None  # never even built


def test_disabled_drops_a_forwarded_lock_header(disabled_app: Celery, broker: redis.Redis) -> None:
    """A lock header forwarded from another task's request does not reach the message."""
    enqueue(disabled_app, headers={"celery_unique_lock": "unique:celery:tests.switch:abc", "trace": "t"})
    (message,) = messages(broker)
    assert message["headers"]["trace"] == "t"
    assert "celery_unique_lock" not in message["headers"]


def test_disabled_apply_runs_every_call(disabled_app: Celery) -> None:
    """apply() with the switch off runs duplicates, with no lock store."""
    task = disabled_app.tasks["tests.switch"]
    assert task.apply((5,)).get() == 5
    assert task.apply((5,), unique=60).get() == 5


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"unique": 0.5}, ValueError, r"tests\.switch: unique must be at least 1 second"),
        ({"unique": "60"}, TypeError, r"tests\.switch: unique must be a number"),
        ({"unique_until": "forever"}, ValueError, r"tests\.switch: unique_until must be one of"),
        ({"on_duplicate": "ignore"}, ValueError, r"tests\.switch: on_duplicate must be one of"),
        ({"unique_on": 5}, TypeError, r"tests\.switch: unique_on must be"),
        ({"uniqe": 60}, TypeError, r"tests\.switch: unknown option 'uniqe'"),
    ],
)
def test_disabled_still_checks_options(
    disabled_app: Celery, broker: redis.Redis, options: dict[str, Any], error: type[Exception], match: str
) -> None:
    """With the switch off a bad option still raises, as with it on, and nothing is published."""
    with pytest.raises(error, match=match):
        enqueue(disabled_app, **options)
    with pytest.raises(error, match=match):
        disabled_app.tasks["tests.switch"].apply((1,), **options)
    assert broker.llen("celery") == 0


def test_unique_none_is_not_checked_when_disabled(disabled_app: Celery, broker: redis.Redis) -> None:
    """A call that asks for no lock is as unchecked with the switch off as with it on."""
    enqueue(disabled_app, unique=None, unique_until="forever")
    assert broker.llen("celery") == 1


def test_the_worker_does_nothing_for_unlocked_messages(
    redis_server: RedisServer, no_switch_variable: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker runs the messages published with the switch off, with no lock-store call or warning."""
    app = make_app(
        redis_server.url(BROKER_DB), closed_port_url(), redis_server.url(RESULT_DB), unique_enabled=False
    )
    results = [enqueue(app, 3), enqueue(app, 3)]
    with caplog.at_level(logging.WARNING, logger="celery_unique"), start_worker(
        app, pool="solo", perform_ping_check=False, shutdown_timeout=20
    ):
        assert [result.get(timeout=10) for result in results] == [3, 3]
    assert [r for r in caplog.records if r.name.startswith("celery_unique")] == []
    assert app_state(app)._store is None


# --- where the switch is read from ---------------------------------------------------------------


@pytest.mark.parametrize(("value", "enabled"), [
    ("0", False), ("false", False), ("No", False), (" off ", False),
    ("1", True), ("TRUE", True), ("yes", True), ("on", True),
])
def test_environment_variable_wins_over_the_setting(
    redis_server: RedisServer, locks: redis.Redis, monkeypatch: pytest.MonkeyPatch,
    value: str, enabled: bool,
) -> None:
    """CELERY_UNIQUE_ENABLED, when set, decides against unique_enabled either way."""
    monkeypatch.setenv("CELERY_UNIQUE_ENABLED", value)
    app = make_app(redis_server.url(BROKER_DB), redis_server.url(LOCK_DB), unique_enabled=not enabled)
    enqueue(app)
    if enabled:
        with pytest.raises(DuplicateTaskError):
            enqueue(app)
    else:
        enqueue(app)
    assert locks.dbsize() == (1 if enabled else 0)


def test_empty_environment_variable_leaves_the_setting(
    redis_server: RedisServer, locks: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty CELERY_UNIQUE_ENABLED is not set: unique_enabled decides."""
    monkeypatch.setenv("CELERY_UNIQUE_ENABLED", "")
    app = make_app(redis_server.url(BROKER_DB), redis_server.url(LOCK_DB), unique_enabled=False)
    enqueue(app)
    assert locks.dbsize() == 0


def test_bad_environment_variable(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CELERY_UNIQUE_ENABLED that is no yes or no is a ConfigurationError naming it and its value."""
    monkeypatch.setenv("CELERY_UNIQUE_ENABLED", "maybe")
    app = make_app(redis_server.url(BROKER_DB), redis_server.url(LOCK_DB))
    with pytest.raises(ConfigurationError, match=r"CELERY_UNIQUE_ENABLED environment variable .* 'maybe'"):
        enqueue(app)
    assert redis_server.client(BROKER_DB).llen("celery") == 0


@pytest.mark.parametrize(
    ("namespace", "named"), [(None, "unique_enabled"), ("CELERY", "CELERY_UNIQUE_ENABLED")]
)
def test_bad_setting_is_named_as_the_app_spells_it(
    no_switch_variable: None, namespace: str | None, named: str
) -> None:
    """unique_enabled must be a bool; the error names it as the app's settings do."""
    app = Celery("switch", set_as_current=False)
    if namespace:
        settings = type("Settings", (), {"CELERY_UNIQUE_ENABLED": "no", "CELERY_BROKER_URL": "memory://"})
        app.config_from_object(settings, namespace=namespace)
    else:
        app.conf.update(broker_url="memory://", unique_enabled="no")
    with pytest.raises(ConfigurationError, match=rf"^{named} must be True or False, not 'no'$"):
        app_state(app)


# --- the warning ---------------------------------------------------------------------------------

SCRIPT = """
import logging
import sys

from celery import Celery
from celery_unique.config import app_state

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
{body}
"""


def run_outside_pytest(body: str, **env: str) -> str:
    """Run ``body`` in a fresh interpreter with no trace of pytest; return what it logged."""
    hidden = ("PYTEST_CURRENT_TEST", "CELERY_UNIQUE_ENABLED")
    environ = {k: v for k, v in os.environ.items() if k not in hidden}
    process = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(body=textwrap.dedent(body))],
        env={**environ, **env}, capture_output=True, text=True, timeout=60, check=True,
    )
    return process.stdout


def test_warns_once_per_process() -> None:
    """Outside pytest, the first read of a disabled config logs one WARNING; later apps log none."""
    out = run_outside_pytest("""
        for name in ("a", "b"):
            app = Celery(name, broker="memory://", set_as_current=False)
            app.conf.unique_enabled = False
            app_state(app)
    """)
    assert out.splitlines() == ["WARNING " + WARNING.format("unique_enabled=False")]


def test_warning_names_the_environment_variable() -> None:
    """When the environment variable turned locking off, the warning says so."""
    out = run_outside_pytest(
        'app_state(Celery("a", broker="memory://", set_as_current=False))', CELERY_UNIQUE_ENABLED="no"
    )
    assert out.splitlines() == ["WARNING " + WARNING.format("environment variable CELERY_UNIQUE_ENABLED=no")]


def test_no_warning_when_enabled_or_turned_off_by_the_helpers() -> None:
    """An enabled app logs nothing, and neither do the testing helpers that turn locking off."""
    out = run_outside_pytest("""
        from celery_unique import UniqueTask
        from celery_unique.testing import eager_tasks, locking_disabled

        app = Celery("a", broker="memory://", set_as_current=False)
        app.conf.unique_redis_url = "redis://127.0.0.1:1/0"

        @app.task(base=UniqueTask, unique=60, shared=False)
        def ping(n):
            return n

        app_state(app)
        with locking_disabled(app):
            ping.delay(1)
        with eager_tasks(app, locks=False):
            assert ping.delay(2).get() == 2
        print("done")
    """)
    assert "locking is disabled" not in out
    assert out.splitlines()[-1] == "done"


def test_no_warning_under_pytest(
    no_switch_variable: None, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under pytest a disabled config is read without a warning: turning it off is what tests do."""
    # As if no read in this process had warned yet.
    monkeypatch.setattr(config, "_warned_disabled", threading.Event())
    app = Celery("quiet", broker="memory://", set_as_current=False)
    app.conf.unique_enabled = False
    with caplog.at_level(logging.WARNING, logger="celery_unique"):
        app_state(app)
    assert caplog.records == []


# --- the testing helpers -------------------------------------------------------------------------


@pytest.fixture
def unreachable_app(no_switch_variable: None) -> Celery:
    """An app whose broker, result backend and lock store are all on closed ports."""
    return make_app(closed_port_url(0), closed_port_url(2), closed_port_url(1))


def test_eager_tasks_needs_the_lock_store(unreachable_app: Celery) -> None:
    """Control: eager_tasks(app) clears the locks, so it fails without a lock store."""
    with pytest.raises(LockStoreError), eager_tasks(unreachable_app):
        pass


def test_eager_tasks_without_locks_needs_no_redis(unreachable_app: Celery) -> None:
    """eager_tasks(app, locks=False) runs unique tasks, duplicates too, with every Redis unreachable."""
    task = unreachable_app.tasks["tests.switch"]
    with eager_tasks(unreachable_app, locks=False):
        assert task.delay(1).get() == 1
        assert task.delay(1).get() == 1
        assert task.apply_async((2,), unique_until="finish").get() == 2
        with pytest.raises(RuntimeError, match="negative -1"):
            task.delay(-1)
        with pytest.raises(ValueError, match="unique must be at least 1 second"):
            task.apply_async((3,), unique=0.1)
    assert unreachable_app.conf.task_always_eager is False
    assert app_state(unreachable_app).config.enabled
    assert app_state(unreachable_app)._store is None


def test_locking_disabled_wins_and_puts_the_switch_back(
    redis_server: RedisServer, locks: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """locking_disabled(app) turns locking off even against CELERY_UNIQUE_ENABLED=1, until the block ends."""
    monkeypatch.setenv("CELERY_UNIQUE_ENABLED", "1")
    app = make_app(redis_server.url(BROKER_DB), redis_server.url(LOCK_DB))
    with locking_disabled(app) as same:
        assert same is app
        enqueue(app)
        enqueue(app)
        assert locks.dbsize() == 0
    enqueue(app)
    with pytest.raises(DuplicateTaskError):
        enqueue(app)
    assert redis_server.client(BROKER_DB).llen("celery") == 3


CONFTEST = """
import pytest
from celery import Celery
from celery_unique import UniqueTask

pytest_plugins = ["celery_unique.testing"]

app = Celery("proj", broker="{closed}/0", backend="{closed}/1")
app.conf.unique_redis_url = "{closed}/2"


@app.task(base=UniqueTask, unique=60)
def ping(n):
    return n


@pytest.fixture(scope="session")
def celery_unique_app():
    return app
"""

FIXTURE_TESTS = """
from conftest import app, ping


def test_runs_eagerly_without_redis(eager_tasks_without_locks):
    assert eager_tasks_without_locks is app
    assert ping.delay(1).get() == 1
    assert ping.delay(1).get() == 1


def test_settings_are_back():
    assert app.conf.task_always_eager is False
"""


def test_fixture_without_locks(pytester: pytest.Pytester) -> None:
    """The eager_tasks_without_locks fixture runs a project's unique tasks with no Redis reachable."""
    pytester.makeconftest(CONFTEST.format(closed=f"redis://127.0.0.1:{free_port()}"))
    pytester.makepyfile(test_project=FIXTURE_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:celery", "-p", "no:django", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
