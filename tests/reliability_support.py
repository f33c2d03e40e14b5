"""Helpers for the reliability and security tests: apps, worker subprocesses, racers, TLS Redis.

Everything here runs against real processes: ``redis-server`` instances
started by the tests, and ``celery worker`` subprocesses with a prefork pool.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from celery_unique import DuplicateTaskError, UniqueTask
from celery_unique.testing import find_redis_server, free_port

ROOT = Path(__file__).resolve().parent.parent

#: Environment variables read by ``tests/reliability_app.py`` in a worker subprocess.
ENV_BROKER = "CELERY_UNIQUE_TEST_BROKER_URL"
ENV_LOCKS = "CELERY_UNIQUE_TEST_LOCK_URL"
ENV_SCRATCH = "CELERY_UNIQUE_TEST_SCRATCH_URL"
ENV_ACKS_LATE = "CELERY_UNIQUE_TEST_ACKS_LATE"

#: The queue the reliability tasks are routed to, so no other test's worker takes them.
QUEUE = "reliability"


def make_app(
    broker_url: str,
    lock_url: str,
    *,
    scratch_url: str | None = None,
    acks_late: bool = False,
    **conf: Any,
) -> Celery:
    """Build a Celery app whose locks live at ``lock_url``, with the reliability tasks."""
    app = Celery("reliability", broker=broker_url, set_as_current=False)
    app.conf.update(
        unique_redis_url=lock_url,
        broker_connection_retry_on_startup=False,
        task_default_queue=QUEUE,
        task_acks_late=acks_late,
        # Without acks_late this setting is inert; with it, a killed pool child
        # makes the worker requeue the message instead of marking it failed.
        task_reject_on_worker_lost=acks_late,
        # Lost unacked messages come back after this many seconds (or on restart).
        # Longer than any task in these tests that is meant to finish, so a
        # healthy run is never redelivered.
        broker_transport_options={"visibility_timeout": 10},
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
    )
    app.conf.update(conf)
    app.conf.reliability_scratch_url = scratch_url or lock_url
    register_tasks(app)
    return app


def register_tasks(app: Celery) -> None:
    """Register the tasks the reliability tests enqueue."""

    @app.task(base=UniqueTask, name="rel.race", shared=False)
    def race(*args: Any) -> None:
        """Never run: the race test only counts published messages."""

    @app.task(base=UniqueTask, name="rel.noop", shared=False)
    def noop(value: Any) -> Any:
        return value

    @app.task(base=UniqueTask, name="rel.crash_once", bind=True, shared=False)
    def crash_once(self: UniqueTask, token: str) -> int:
        # The first run records its pid and waits to be killed; any later run
        # (a redelivery, under the same task id) finishes at once.
        scratch = redis.Redis.from_url(self.app.conf.reliability_scratch_url)
        runs = int(scratch.incr(f"runs:{token}"))
        scratch.rpush(f"ids:{token}", self.request.id)
        if runs == 1:
            scratch.set(f"pid:{token}", os.getpid())
            time.sleep(60)
        scratch.set(f"done:{token}", self.request.id)
        return runs


def worker_env(broker_url: str, lock_url: str, scratch_url: str, *, acks_late: bool) -> dict[str, str]:
    """Return the environment of a worker subprocess for ``tests/reliability_app.py``."""
    env = dict(os.environ)
    env.update({
        ENV_BROKER: broker_url,
        ENV_LOCKS: lock_url,
        ENV_SCRATCH: scratch_url,
        ENV_ACKS_LATE: "1" if acks_late else "0",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    })
    return env


@contextmanager
def celery_worker_process(
    env: dict[str, str],
    log: Path,
    *,
    app: str = "tests.reliability_app",
    queue: str = QUEUE,
    name: str = "reliability",
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a prefork worker (concurrency 1) of ``app`` on ``queue``; kill its process group on exit."""
    args = [
        sys.executable, "-m", "celery", "-A", app, "worker",
        "--pool=prefork", "--concurrency=1", "-Q", queue, "--loglevel=INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "-n", f"{name}-{os.getpid()}-{time.monotonic_ns()}@%h",
    ]
    with log.open("wb") as out:
        # A session of its own, so the master and its pool children die together.
        process = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield process
        finally:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def keys_without_ttl(client: redis.Redis) -> list[bytes]:
    """Return every key of the client's database that never expires (PTTL -1)."""
    return [bytes(key) for key in client.scan_iter(count=1000) if client.pttl(key) == -1]


# --- races -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RaceSetup:
    """What each racing process needs to build its own app after the fork."""

    broker_url: str
    lock_url: str
    same_rounds: int
    distinct_rounds: int


def racer(setup: RaceSetup, index: int, barrier: Barrier, results: Any) -> None:
    """Enqueue once per round, all racers released by ``barrier``; report outcomes at the end.

    Each round is two barrier waits: the start (after the parent has cleared
    the queue and the locks) and the end (before the parent counts messages).
    """
    # An app per process, built after the fork: no connection is shared with the parent.
    app = make_app(setup.broker_url, setup.lock_url)
    task = app.tasks["rel.race"]
    outcomes: list[str] = []
    rounds = [("same", r) for r in range(setup.same_rounds)]
    rounds += [("distinct", r) for r in range(setup.distinct_rounds)]
    for phase, number in rounds:
        args = (number,) if phase == "same" else (number, index)
        barrier.wait()
        try:
            task.apply_async(args, unique=60)
            outcomes.append("published")
        except DuplicateTaskError:
            outcomes.append("duplicate")
        except Exception as exc:  # reported to the parent, which fails the test
            outcomes.append(f"error: {type(exc).__name__}: {exc}")
        barrier.wait()
    results.put((index, outcomes))


# --- TLS ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate it signed."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


# The extensions Python 3.13's strict verification (VERIFY_X509_STRICT) asks
# of a CA and of the certificates it signs.
_CA_EXTENSIONS = (
    "-addext", "basicConstraints=critical,CA:TRUE",
    "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    "-addext", "subjectKeyIdentifier=hash",
)
_LEAF_EXTENSIONS = """basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
"""


def make_tls_files(directory: Path) -> TlsFiles:
    """Generate a CA, and server and client certificates it signed, with ``openssl``."""
    ca_key, ca_cert = directory / "ca.key", directory / "ca.crt"

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    openssl("req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048", "-keyout", str(ca_key),
            "-out", str(ca_cert), "-days", "1", "-subj", "/CN=celery-unique test CA", *_CA_EXTENSIONS)

    def leaf(name: str, extensions: str) -> tuple[Path, Path]:
        key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.crt"
        ext = directory / f"{name}.ext"
        ext.write_text(_LEAF_EXTENSIONS + extensions)
        openssl("req", "-new", "-nodes", "-newkey", "rsa:2048", "-keyout", str(key),
                "-out", str(csr), "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
                "-CAcreateserial", "-out", str(cert), "-days", "1", "-extfile", str(ext))
        return cert, key

    server_cert, server_key = leaf(
        "server", "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    client_cert, client_key = leaf("client", "extendedKeyUsage=clientAuth\n")
    return TlsFiles(ca_cert, server_cert, server_key, client_cert, client_key)


class TlsUnsupportedError(RuntimeError):
    """The redis-server binary was built without TLS."""


@contextmanager
def tls_redis_server(files: TlsFiles, directory: Path, *, auth_clients: bool = False) -> Iterator[int]:
    """Run a redis-server that speaks only TLS on a free loopback port; yield the port.

    With ``auth_clients`` it also asks clients for a certificate signed by the CA.
    """
    port = free_port()
    args = [
        find_redis_server(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--tls-cert-file", str(files.server_cert), "--tls-key-file", str(files.server_key),
        "--tls-ca-cert-file", str(files.ca_cert), "--tls-auth-clients", "yes" if auth_clients else "no",
        "--save", "", "--appendonly", "no", "--dir", str(directory),
    ]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        probe = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(files.ca_cert),
                            ssl_certfile=str(files.client_cert), ssl_keyfile=str(files.client_key),
                            socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                probe.ping()
                break
            except redis.ConnectionError:
                if process.poll() is not None:
                    output = process.stdout.read().decode(errors="replace") if process.stdout else ""
                    # A build without TLS refuses the tls-* directives at startup.
                    if "tls" in output.lower():
                        lines = [line for line in output.splitlines() if line.strip()]
                        raise TlsUnsupportedError(" / ".join(lines[-2:])) from None
                    raise RuntimeError(f"TLS redis-server exited: {output[-300:]}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError("TLS redis-server did not answer") from None
                time.sleep(0.05)
        probe.close()
        yield port
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=10)
        if process.stdout:
            process.stdout.close()
