"""A throwaway RabbitMQ node for the suite, and a Celery worker that consumes from it.

Fixtures (``tests/conftest.py``)
--------------------------------
``rabbitmq_url``
    An ``amqp://`` URL on a virtual host of the test's own: no other test sees
    its queues, exchanges or messages, so a test may purge or count ``celery``
    freely. Requesting it starts the session's node if it is not up yet.
``rabbitmq_server``
    The session's :class:`RabbitMQServer` (``url()``, ``new_vhost()``,
    ``port``, ``version``).

A missing RabbitMQ skips these tests locally, with the reason, and fails them
under ``CI=true``. Locks and results stay on the suite's Redis::

    def test_x(rabbitmq_url: str, redis_server: RedisServer, tmp_path: Path) -> None:
        app = make_app(rabbitmq_url, redis_server.url(RESULT_DB), redis_server.url(LOCK_DB))
        env = worker_env(rabbitmq_url, redis_server.url(RESULT_DB), redis_server.url(LOCK_DB))
        with celery_worker_process(env, tmp_path / "worker.log"):
            assert app.tasks["rmq.add"].apply_async((1, 2), unique=60).get(timeout=30) == 3

``make_app`` takes any Celery setting as a keyword (``task_acks_late=True``,
...); the worker subprocess (``tests/rabbitmq_app.py``) reads the same settings
from ``worker_env(..., **settings)``. ``message_count(url, queue)`` counts
what waits in a queue. The reliability helpers work on RabbitMQ too: pass
``rabbitmq_url`` as the broker of ``tests.reliability_support.make_app`` and
``worker_env``.

The node
--------
:class:`RabbitMQServer` runs ``rabbitmq-server`` as a plain child process,
never as a system service: its own node name, Erlang cookie, data (mnesia),
log and config files in a temporary directory, its own ``epmd`` on a free
port (``ERL_EPMD_PORT``), and free ports for AMQP and distribution, all on
127.0.0.1. It runs as root or as any user. No plugin is enabled, and the
virtual hosts the tests will use are created at boot from a definitions file
(more are imported with ``rabbitmqctl`` if a session needs them). ``close()``
stops the node, its ``epmd`` and their children and removes the directory.
The binary is ``$RABBITMQ_SERVER``, else Debian's
``/usr/lib/rabbitmq/bin/rabbitmq-server``, else ``rabbitmq-server`` on ``PATH``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import amqp
import kombu
from celery import Celery

from celery_unique import UniqueTask
from celery_unique.testing import Service
from tests.reliability_support import celery_worker_process as worker_process

ROOT = Path(__file__).resolve().parent.parent

#: Debian and Ubuntu install the real scripts here; ``/usr/sbin/rabbitmq-server``
#: is a wrapper that switches to the ``rabbitmq`` user and its system paths.
DEBIAN_SCRIPTS = Path("/usr/lib/rabbitmq/bin")

#: Environment of a worker subprocess for ``tests/rabbitmq_app.py``.
ENV_BROKER = "CELERY_UNIQUE_TEST_RABBITMQ_URL"
ENV_RESULTS = "CELERY_UNIQUE_TEST_RESULT_URL"
ENV_LOCKS = "CELERY_UNIQUE_TEST_LOCK_URL"
ENV_SETTINGS = "CELERY_UNIQUE_TEST_SETTINGS"


def find_rabbitmq_server() -> str:
    """Return the path of a ``rabbitmq-server`` script that runs as the calling user, or raise."""
    chosen = os.environ.get("RABBITMQ_SERVER")
    if chosen:
        if os.access(chosen, os.X_OK):
            return chosen
        raise RuntimeError(f"RABBITMQ_SERVER={chosen} is not an executable file")
    for path in (str(DEBIAN_SCRIPTS / "rabbitmq-server"), shutil.which("rabbitmq-server")):
        if path and os.access(path, os.X_OK):
            return path
    raise RuntimeError(
        "no rabbitmq-server found: install RabbitMQ (apt-get install rabbitmq-server) "
        "or set RABBITMQ_SERVER=/path/to/rabbitmq-server"
    )


def find_epmd() -> str:
    """Return the path of Erlang's ``epmd``, or raise ``RuntimeError``."""
    candidates = [shutil.which("epmd")]
    erl = shutil.which("erl")
    if erl:
        candidates.append(os.path.join(os.path.dirname(os.path.realpath(erl)), "epmd"))
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise RuntimeError("no epmd found: RabbitMQ needs Erlang (apt-get install rabbitmq-server)")


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct loopback TCP ports that nothing listens on right now."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class RabbitMQServer(Service):
    """A RabbitMQ node of its own on ``127.0.0.1``, for tests.

    ``vhosts`` virtual hosts are created at boot, where each costs some CPU;
    past them, ``new_vhost()`` imports as many again with ``rabbitmqctl``,
    which costs a second.
    """

    host = "127.0.0.1"
    user = "guest"
    password = "guest"

    def __init__(self, vhosts: int = 16) -> None:
        self.script = find_rabbitmq_server()
        self.epmd_binary = find_epmd()
        self.port, self.dist_port, self.epmd_port, self.ctl_port = free_ports(4)
        self.node = f"celery-unique-{os.getpid()}-{secrets.token_hex(3)}@localhost"
        self.directory = Path(tempfile.mkdtemp(prefix="celery-unique-rabbitmq-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.epmd: subprocess.Popen[bytes] | None = None
        self.version = ""
        #: Seconds from ``spawn()`` until the node listened for AMQP.
        self.boot_seconds = 0.0
        #: Seconds spent in ``wait_ready()``: what the boot cost the tests.
        self.waited_seconds = 0.0
        self._spawned_at = 0.0
        self._vhost_batch = max(1, vhosts)
        self._vhosts_made = 0
        self._free_vhosts: list[str] = []

    # --- addresses -----------------------------------------------------------------------------

    def url(self, vhost: str = "/") -> str:
        """Return the ``amqp://`` URL of ``vhost`` on this node."""
        return f"amqp://{self.user}:{self.password}@{self.host}:{self.port}/{quote(vhost, safe='')}"

    def new_vhost(self) -> str:
        """Return the name of a virtual host no one has used yet."""
        if not self._free_vhosts:
            self._import_vhosts(self._vhost_batch)
        return self._free_vhosts.pop(0)

    # --- life cycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> RabbitMQServer:
        """Start the node and wait until it accepts AMQP connections."""
        return self.spawn().wait_ready(timeout)

    def spawn(self) -> RabbitMQServer:
        """Start ``epmd`` and the node without waiting for the node to boot (it takes seconds)."""
        if self.process is not None:
            return self
        home, data, logs = (self.directory / name for name in ("home", "mnesia", "log"))
        for path in (home, data, logs):
            path.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20))
        cookie.chmod(0o400)  # Erlang refuses a cookie that others can read
        (self.directory / "enabled_plugins").write_text("[].\n")
        (self.directory / "rabbitmq-env.conf").write_text("")
        self._write_definitions(self.directory / "definitions.json", self._next_vhosts(self._vhost_batch))
        (self.directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = {self.host}:{self.port}\n"
            # Nothing here is worth a disk alarm, which would block publishers.
            "disk_free_limit.absolute = 1MB\n"
            "definitions.import_backend = local_filesystem\n"
            f"definitions.local.path = {self.directory / 'definitions.json'}\n"
        )
        self._spawned_at = time.time()
        # Our own epmd, up before the node: a node that finds none starts a
        # daemonized one, which would outlive it.
        self.epmd = subprocess.Popen(
            [self.epmd_binary, "-port", str(self.epmd_port), "-address", self.host],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not _accepts(self.epmd_port):
            if self.epmd.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"epmd did not start on port {self.epmd_port}")
            time.sleep(0.01)
        with (self.directory / "server.log").open("wb") as out:
            # A session of its own: stop() signals the whole process group.
            self.process = subprocess.Popen(
                [self.script], cwd=self.directory, env=self._environment(),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 60.0) -> RabbitMQServer:
        """Wait until the node accepts an AMQP connection; raise ``RuntimeError`` if it never does."""
        if self.process is None:
            raise RuntimeError("RabbitMQServer.wait_ready() before spawn()")
        started = time.monotonic()
        deadline = started + timeout
        while True:
            returncode = self.process.poll()
            if returncode is not None:
                self.stop()
                raise RuntimeError(f"rabbitmq-server exited with {returncode}: {self.log_tail()}")
            if _accepts(self.port):
                try:
                    self.version = self._handshake()
                except (OSError, amqp.exceptions.AMQPError):
                    pass
                else:
                    self.waited_seconds = time.monotonic() - started
                    self.boot_seconds = self._listening_at() - self._spawned_at
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"rabbitmq-server did not accept AMQP on port {self.port} within {timeout}s: "
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the node and its epmd; nothing of theirs keeps running."""
        for attr in ("process", "epmd"):
            process: subprocess.Popen[bytes] | None = getattr(self, attr)
            if process is None:
                continue
            if process.poll() is None:
                # SIGTERM to the script: it stops the Erlang VM and waits for it.
                process.terminate()
                with suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=30)
            # Whatever is left of the group (the VM, erl_child_setup) goes now.
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            setattr(self, attr, None)

    def close(self) -> None:
        """Stop the node and remove its directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def log_tail(self, lines: int = 15) -> str:
        """Return the last lines of the node's console output and log, for error messages."""
        text = []
        for path in (self.directory / "server.log", self.directory / "log" / f"{self.node}.log"):
            with suppress(OSError):
                text += path.read_text(errors="replace").splitlines()[-lines:]
        return " / ".join(line.strip() for line in text if line.strip()) or "(no output)"

    # --- internals -----------------------------------------------------------------------------

    def _environment(self) -> dict[str, str]:
        # A developer's own RABBITMQ_* or ERL_* settings must not reach this node,
        # nor systemd's socket, which would change how the script runs the VM.
        env = {
            name: value for name, value in os.environ.items()
            if not name.startswith(("RABBITMQ_", "ERL_")) and name != "NOTIFY_SOCKET"
        }
        d = self.directory
        env.update({
            "HOME": str(d / "home"),  # where Erlang reads the cookie
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": self.host,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(d / "plugins-expand"),
            "RABBITMQ_CTL_DIST_PORT_MIN": str(self.ctl_port),
            "RABBITMQ_CTL_DIST_PORT_MAX": str(self.ctl_port),
        })
        return env

    def _handshake(self) -> str:
        connection = amqp.Connection(
            f"{self.host}:{self.port}", userid=self.user, password=self.password,
            virtual_host="/", connect_timeout=2,
        )
        try:
            connection.connect()
            version = connection.server_properties.get("version", "")
        finally:
            connection.collect()
        return version.decode() if isinstance(version, bytes) else str(version)

    def _listening_at(self) -> float:
        # When the node logged its AMQP listener, as a Unix time; now if the
        # line cannot be found (a node booted in the background was ready
        # before anyone asked).
        marker = f"started TCP listener on {self.host}:{self.port}"
        with suppress(OSError, ValueError):
            for line in (self.directory / "log" / f"{self.node}.log").read_text().splitlines():
                if marker in line:
                    return datetime.fromisoformat(line.split(" [", 1)[0]).timestamp()
        return time.time()

    def _next_vhosts(self, count: int) -> list[str]:
        names = [f"test-{self._vhosts_made + i + 1}" for i in range(count)]
        self._vhosts_made += count
        self._free_vhosts += names
        return names

    def _write_definitions(self, path: Path, vhosts: list[str]) -> None:
        everything = {"configure": ".*", "write": ".*", "read": ".*"}
        path.write_text(json.dumps({
            "users": [{"name": self.user, "password": self.password, "tags": ["administrator"]}],
            "vhosts": [{"name": name} for name in ["/", *vhosts]],
            "permissions": [{"user": self.user, "vhost": name, **everything} for name in ["/", *vhosts]],
        }))

    def _import_vhosts(self, count: int) -> None:
        if self.process is None:
            raise RuntimeError("RabbitMQServer.new_vhost() before start()")
        path = self.directory / f"definitions-{self._vhosts_made}.json"
        self._write_definitions(path, self._next_vhosts(count))
        ctl = os.path.join(os.path.dirname(self.script), "rabbitmqctl")
        done = subprocess.run(
            [ctl, "--node", self.node, "--quiet", "import_definitions", str(path)],
            env=self._environment(), capture_output=True, timeout=120, check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl import_definitions failed ({done.returncode}): "
                f"{(done.stdout + done.stderr).decode(errors='replace').strip()}"
            )


def message_count(broker_url: str, queue: str) -> int:
    """Return how many messages wait in ``queue`` (0 if it does not exist)."""
    with kombu.Connection(broker_url, connect_timeout=5) as connection:
        try:
            _, count, _ = connection.default_channel.queue_declare(queue, passive=True)
        except amqp.exceptions.NotFound:
            return 0
        return int(count)


# --- a Celery app and worker on RabbitMQ -------------------------------------------------------


def make_app(broker_url: str, result_url: str, lock_url: str, **settings: Any) -> Celery:
    """Build a Celery app on ``broker_url`` with results and locks on Redis, and the ``rmq.*`` tasks."""
    app = Celery("rabbitmq", broker=broker_url, backend=result_url, set_as_current=False)
    app.conf.update(
        unique_redis_url=lock_url,
        broker_connection_retry_on_startup=False,
        task_default_queue="celery",
        worker_prefetch_multiplier=1,
    )
    app.conf.update(settings)
    register_tasks(app)
    return app


def register_tasks(app: Celery) -> None:
    """Register the tasks the RabbitMQ tests enqueue."""

    @app.task(base=UniqueTask, name="rmq.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y


def worker_env(broker_url: str, result_url: str, lock_url: str, **settings: Any) -> dict[str, str]:
    """Return the environment of a worker subprocess for ``tests/rabbitmq_app.py``."""
    env = dict(os.environ)
    env.update({
        ENV_BROKER: broker_url,
        ENV_RESULTS: result_url,
        ENV_LOCKS: lock_url,
        ENV_SETTINGS: json.dumps(settings),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    })
    return env


@contextmanager
def celery_worker_process(
    env: dict[str, str], log: Path, queue: str = "celery"
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a prefork worker of ``tests.rabbitmq_app`` on ``queue``; kill its process group on exit."""
    with worker_process(env, log, app="tests.rabbitmq_app", queue=queue, name="rabbitmq") as process:
        yield process
