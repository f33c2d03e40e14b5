"""Fixtures: a real redis-server started by the suite, Celery apps and workers on it.

The broker is database 0, results database 1 and locks database 2 of one
throwaway server. Workers are Celery's classic in-process test workers
(``celery.contrib.testing``), or real ``celery worker`` subprocesses where a
test needs a prefork pool. Tests that need RabbitMQ as the broker get a node
of the suite's own through ``rabbitmq_url`` (see ``tests/rabbitmq.py``).
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from types import SimpleNamespace
from typing import Any

import amqp
import celery
import kombu
import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from kombu.asynchronous import set_event_loop

from celery_unique import UniqueTask
from celery_unique.testing import LockDatabase, RedisServer, wait_for
from tests.rabbitmq import RabbitMQServer

CI = bool(os.environ.get("CI"))
# The Django project runs its own suite in a subprocess with its own settings
# (tests/test_django.py): this suite must neither collect nor import it.
collect_ignore = ["django_project"]
BROKER_DB, RESULT_DB, LOCK_DB = 0, 1, 2
#: Set by tox's ``transport`` environment: the test apps publish through the
#: package's atomic transport (tests/lifecycle_app.py reads it too).
TRANSPORT = os.environ.get("CELERY_UNIQUE_TEST_TRANSPORT") or None
#: Why a test of what a refused call never reaches is skipped there.
builds_before_locking = (
    "through the atomic transport a refused call's message is built and published to kombu "
    "before the lock is tried (docs/reliability.md, The atomic transport)"
)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session; a missing Redis fails in CI, skips locally."""
    try:
        server = RedisServer().start()
    except RuntimeError as exc:
        if CI:
            raise
        pytest.skip(f"no Redis server: {exc}")
    try:
        yield server
    finally:
        # AsyncResults left in reference cycles unsubscribe from the result
        # backend when collected; collected after the server stops, they retry
        # for seconds (about 20 on Celery 5.3) at the end of the session.
        gc.collect()
        server.close()


def pytest_report_header() -> str:
    """Name the versions under test: the matrix runs the suite on several."""
    return (
        f"celery {celery.__version__}, kombu {kombu.__version__}, "
        f"py-amqp {amqp.__version__}, redis-py {redis.__version__}"
        + (f", broker_transport {TRANSPORT}" if TRANSPORT else "")
    )


_RABBITMQ = pytest.StashKey[RabbitMQServer]()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Boot RabbitMQ in the background as soon as a selected test is known to need it."""
    fixtures = [getattr(item, "fixturenames", ()) for item in items]
    if config.option.collectonly or not any("rabbitmq_server" in names for names in fixtures):
        return
    # A vhost for each test, made at boot: each costs CPU there, so no more.
    vhosts = sum("rabbitmq_url" in names for names in fixtures) + 1
    with suppress(RuntimeError):  # the fixture says what is missing (skip, or fail in CI)
        config.stash[_RABBITMQ] = RabbitMQServer(vhosts=vhosts).spawn()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Say how long the RabbitMQ node took to boot, if the session started one."""
    server = config.stash.get(_RABBITMQ, None)
    if server is not None and server.boot_seconds:
        terminalreporter.write_line(
            f"RabbitMQ {server.version}: booted in {server.boot_seconds:.1f}s, in the background "
            f"from collection on; tests waited {server.waited_seconds:.1f}s for it"
        )


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop a RabbitMQ node booted for tests that then did not run (an interrupted session)."""
    server = config.stash.get(_RABBITMQ, None)
    if server is not None:
        server.close()


@pytest.fixture(scope="session")
def rabbitmq_server(pytestconfig: pytest.Config) -> Iterator[RabbitMQServer]:
    """One real RabbitMQ node for the session, if a test needs it; missing, it fails in CI, skips locally."""
    try:
        server = pytestconfig.stash.get(_RABBITMQ, None) or RabbitMQServer().spawn()
        pytestconfig.stash[_RABBITMQ] = server
        server.wait_ready()
    except RuntimeError as exc:
        if CI:
            raise
        pytest.skip(f"no RabbitMQ server: {exc}")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def rabbitmq_url(rabbitmq_server: RabbitMQServer) -> str:
    """An ``amqp://`` URL on a virtual host of this test's own: no other test sees its messages."""
    return rabbitmq_server.url(rabbitmq_server.new_vhost())


@pytest.fixture(autouse=True)
def _fresh_event_loop() -> Iterator[None]:
    """Each test's in-process worker gets an event loop of its own.

    Before Celery 5.6 a worker reuses kombu's process-wide event loop, and
    with it the timer of the first worker of the process, which no longer
    runs: a later worker never runs a countdown, eta or retry.
    """
    yield
    set_event_loop(None)


@pytest.fixture(autouse=True)
def _collect_results() -> Iterator[None]:
    """Collect this test's AsyncResults and apps while its Redis is still up.

    They sit in reference cycles, and one collected after the session's server
    has stopped tries to unsubscribe from it and raises in ``__del__``.
    What survives is frozen (``gc.freeze``): the next test's collection then
    walks only what that test made, not the whole session's heap again.
    """
    yield
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _clean_redis(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test starts with empty databases and leaves no lock without a TTL."""
    if "redis_server" not in request.fixturenames:
        yield
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    server.client().flushall()
    yield
    # A lock without a TTL would block its call forever: none may exist,
    # whatever the test did. Lock keys have at least three ':' separators.
    client = server.client(LOCK_DB)
    immortal = [key for key in client.scan_iter(match="*:*:*:*") if client.pttl(key) == -1]
    assert not immortal, f"locks without a TTL: {immortal}"


@pytest.fixture(scope="session")
def celery_config(redis_server: RedisServer) -> dict[str, Any]:
    """Settings of the classic ``celery_app`` fixture: everything on the test Redis."""
    return {
        "broker_url": redis_server.url(BROKER_DB),
        "result_backend": redis_server.url(RESULT_DB),
        "unique_redis_url": redis_server.url(LOCK_DB),
        "broker_connection_retry_on_startup": False,
        "task_default_queue": "celery",
        **({"broker_transport": TRANSPORT} if TRANSPORT else {}),
    }


@pytest.fixture
def eager(celery_app: Celery) -> Iterator[Celery]:
    """The test app with task_always_eager and task_eager_propagates on."""
    celery_app.conf.update(task_always_eager=True, task_eager_propagates=True)
    yield celery_app
    celery_app.conf.update(task_always_eager=False, task_eager_propagates=False)


@pytest.fixture
def locks(redis_server: RedisServer) -> redis.Redis:
    """A client on the lock database, to look at locks directly (markers hidden)."""
    return LockDatabase(host=redis_server.host, port=redis_server.port, db=LOCK_DB)


@pytest.fixture
def broker(redis_server: RedisServer) -> redis.Redis:
    """A client on the broker database, to count published messages."""
    return redis_server.client(BROKER_DB)


@pytest.fixture
def tasks(celery_app: Celery) -> SimpleNamespace:
    """The tasks the tests enqueue, registered on the test app."""
    ns = SimpleNamespace()

    @celery_app.task(base=UniqueTask, name="tests.send_report")
    def send_report(user_id: int, period: str = "daily") -> str:
        return f"report {user_id} {period}"

    @celery_app.task(base=UniqueTask, name="tests.send_report_hourly", unique=600)
    def send_report_hourly(user_id: int) -> str:
        return f"hourly {user_id}"

    @celery_app.task(base=UniqueTask, name="tests.fail")
    def fail(user_id: int) -> None:
        raise RuntimeError(f"cannot report on {user_id}")

    @celery_app.task(base=UniqueTask, name="tests.slow")
    def slow(user_id: int, seconds: float = 1.0) -> int:
        time.sleep(seconds)
        return user_id

    @celery_app.task(base=UniqueTask, name="tests.flaky", bind=True, max_retries=3)
    def flaky(self: UniqueTask, user_id: int, failures: int = 1) -> int:
        if self.request.retries < failures:
            raise self.retry(countdown=0.2)
        return self.request.retries

    @celery_app.task(base=UniqueTask, name="tests.held_by", bind=True)
    def held_by(self: UniqueTask, user_id: int) -> str | None:
        # Which task id holds this very call's lock while it runs.
        from celery_unique.config import lock_store

        key = self.request.headers["celery_unique_lock"]
        return lock_store(self.app).holder(key)

    for name, value in list(locals().items()):
        if name not in ("ns", "celery_app"):
            setattr(ns, name, value)
    return ns


@pytest.fixture
def worker(celery_app: Celery, tasks: SimpleNamespace) -> Iterator[Any]:
    """A real Celery worker (solo pool, in a thread) consuming the test app's queues.

    It is ready once it answers a ping: a revoke broadcast before its
    control consumer subscribed would be lost.
    """
    with start_worker(
        celery_app, pool="solo", perform_ping_check=False, shutdown_timeout=20
    ) as w:
        control = celery_app.control
        wait_until(lambda: control.ping(destination=[w.hostname], timeout=0.5), timeout=20,
                   what="worker answers a ping")
        yield w


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll ``predicate`` until it returns a true value; fail after ``timeout`` s."""
    value = wait_for(predicate, timeout)
    if not value:
        raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
    return value
