"""Real prefork workers for the lifecycle tests, and what their tasks recorded.

``LifecycleWorker`` runs ``celery worker --pool=prefork`` on the app of
``tests/lifecycle_app.py`` in a subprocess of its own session, with the
broker, results and locks in databases of the suite's Redis (or any URLs
given), and kills its whole process group on exit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from tests.conftest import BROKER_DB, LOCK_DB, RESULT_DB, wait_until
from tests.lifecycle_app import (
    ENV_BACKEND,
    ENV_BROKER,
    ENV_CONF,
    ENV_LOCKS,
    ENV_SCRATCH,
    QUEUE,
    make_app,
)

ROOT = Path(__file__).resolve().parent.parent
SCRATCH_DB = 3


@dataclass
class Lifecycle:
    """Where a lifecycle test's broker, results, locks and scratch records live."""

    broker: str
    backend: str | None
    locks: str
    scratch: str
    conf: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def on(cls, server: Any, *, backend: bool = True, **conf: Any) -> Lifecycle:
        """Everything on databases of one ``RedisServer``."""
        return cls(
            broker=server.url(BROKER_DB),
            backend=server.url(RESULT_DB) if backend else None,
            locks=server.url(LOCK_DB),
            scratch=server.url(SCRATCH_DB),
            conf=conf,
        )

    def app(self, **conf: Any) -> Celery:
        """The producer's app, configured as the worker's."""
        return make_app(self.broker, self.backend, self.locks, self.scratch, {**self.conf, **conf})

    def scratch_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.scratch)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            ENV_BROKER: self.broker,
            ENV_BACKEND: self.backend or "",
            ENV_LOCKS: self.locks,
            ENV_SCRATCH: self.scratch,
            ENV_CONF: json.dumps(self.conf),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        })
        return env

    @contextmanager
    def worker(
        self,
        log: Path,
        *,
        concurrency: int = 1,
        extra: tuple[str, ...] = (),
        app: str = "tests.lifecycle_app",
    ) -> Iterator[subprocess.Popen[bytes]]:
        """Run a prefork worker on the lifecycle queue until the block ends; wait until it answers a ping.

        "ready." is logged before the worker's broadcast consumer has surely
        subscribed, and a revoke broadcast before that is lost: the ping
        proves the subscription.
        """
        name = f"life-{os.getpid()}-{time.monotonic_ns()}@{socket.gethostname()}"
        args = [
            sys.executable, "-m", "celery", "-A", app, "worker",
            "--pool=prefork", f"--concurrency={concurrency}", "-Q", QUEUE, "--loglevel=INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-n", name, *extra,
        ]
        with log.open("wb") as out:
            process = subprocess.Popen(
                args, cwd=ROOT, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_until(
                lambda: b"ready." in log.read_bytes() or process.poll() is not None,
                timeout=30, what="worker ready",
            )
            if process.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{log.read_text(errors='replace')[-3000:]}")
            control = self.app().control
            wait_until(
                lambda: process.poll() is not None or control.ping(destination=[name], timeout=0.5),
                timeout=30, what="worker answers a ping",
            )
            yield process
        finally:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


#: Redis broker settings that redeliver an unacknowledged message after 2 s,
#: checked every second (kombu's restore runs every 10 s by default).
REDELIVER: dict[str, Any] = {
    "task_acks_late": True,
    "broker_transport_options": {
        "visibility_timeout": 2, "unacked_restore_interval": 1, "unacked_restore_throttle": 1,
    },
    "unique_running_ttl": 1,
}


def lock_of(app: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> str:
    """The lock key of a call of the task ``name`` on ``app``."""
    return str(app.tasks[name].lock_key(args, kwargs or {}, {}))


def stored(app: Any, task_id: str) -> str:
    """The state the result backend holds now (AsyncResult caches a finished state)."""
    return str(app.backend.get_task_meta(task_id, cache=False)["status"])


def wait_event(scratch: redis.Redis, token: str, event: str, timeout: float = 20) -> None:
    """Wait until a run of ``token``'s task has recorded ``event``."""
    wait_until(lambda: event in events(scratch, token), timeout=timeout, what=f"{token} {event}")


def events(scratch: redis.Redis, token: str) -> list[str]:
    """The events a token's task runs recorded: ``start``, ``end``, ... (pids dropped)."""
    return [entry.decode().split(":", 1)[0] for entry in scratch.lrange(f"log:{token}", 0, -1)]


def pids(scratch: redis.Redis, token: str, event: str = "start") -> list[int]:
    """The pids of the processes that recorded ``event`` for ``token``."""
    entries = [entry.decode().split(":") for entry in scratch.lrange(f"log:{token}", 0, -1)]
    return [int(parts[1]) for parts in entries if parts[0] == event]


def park(app: Any, x: int) -> Any:
    """Hold ``life.double(x)``'s lock with a task that waits a minute before it runs."""
    return app.tasks["life.double"].apply_async((x,), unique=60, countdown=60)


def redeliver_copy(
    broker: redis.Redis, app: Any, name: str, task_id: str, key: str, args: tuple[Any, ...]
) -> None:
    """Put a copy of a task's first attempt on the lifecycle queue as kombu's Redis transport restores one.

    It is published to a queue no worker reads, taken off it, flagged
    ``redelivered`` in its headers and delivery info (what kombu's
    ``_do_restore_message`` does to an unacknowledged message after
    ``visibility_timeout``), and pushed onto the lifecycle queue.
    """
    from celery import Task

    holding = f"holding-{task_id}"
    headers = {"celery_unique_lock": key}
    Task.apply_async(app.tasks[name], args, task_id=task_id, queue=holding, headers=headers)
    raw = wait_until(lambda: broker.rpop(holding), what="the copy published")
    message = json.loads(raw)
    message["headers"]["redelivered"] = True
    message["properties"]["delivery_info"].update(redelivered=True, routing_key=QUEUE)
    broker.lpush(QUEUE, json.dumps(message))
