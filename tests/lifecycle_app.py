"""The Celery app of the lifecycle tests' ``celery worker`` subprocesses.

Configured from the environment (see ``tests/lifecycle_support.py``): the
broker, result backend and lock store URLs, a scratch Redis where tasks record
what they did, and a JSON object of extra settings. Every task records its
starts and ends under its ``token`` argument, so tests can count runs.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery, chain, group
from celery.exceptions import Ignore, Reject, SoftTimeLimitExceeded

from celery_unique import UniqueTask

ENV_BROKER = "CELERY_UNIQUE_LIFE_BROKER"
ENV_BACKEND = "CELERY_UNIQUE_LIFE_BACKEND"
ENV_LOCKS = "CELERY_UNIQUE_LIFE_LOCKS"
ENV_SCRATCH = "CELERY_UNIQUE_LIFE_SCRATCH"
ENV_CONF = "CELERY_UNIQUE_LIFE_CONF"
#: The queue the lifecycle tasks are routed to.
QUEUE = "lifecycle"


def make_app(
    broker: str, backend: str | None, locks: str, scratch: str, conf: dict[str, Any] | None = None
) -> Celery:
    """Build the lifecycle app: the producer side in tests, the worker side in subprocesses."""
    app = Celery("lifecycle", broker=broker, backend=backend, set_as_current=False)
    app.conf.update(
        unique_redis_url=locks,
        unique_redis_socket_timeout=1.0,
        broker_connection_retry_on_startup=False,
        task_default_queue=QUEUE,
        worker_prefetch_multiplier=1,
        result_expires=600,
    )
    # tox's transport environment (tests/conftest.py): the package's atomic
    # transport, for a Redis broker (a RabbitMQ one keeps its own).
    if os.environ.get("CELERY_UNIQUE_TEST_TRANSPORT") and broker.startswith("redis"):
        app.conf.broker_transport = os.environ["CELERY_UNIQUE_TEST_TRANSPORT"]
    app.conf.update(conf or {})
    app.conf.lifecycle_scratch_url = scratch
    register(app)
    return app


def scratch_of(task: Any) -> redis.Redis:
    """The scratch Redis where tasks record their runs."""
    return redis.Redis.from_url(task.app.conf.lifecycle_scratch_url)


def record(task: Any, token: str, event: str) -> None:
    """Append ``event`` (with this process's pid) to the token's log in the scratch Redis."""
    scratch_of(task).rpush(f"log:{token}", f"{event}:{os.getpid()}:{task.request.id}")


def wait_for_go(task: Any, token: str, started: bool = False) -> None:
    """Record "start", then wait for the test's go-ahead, recording each SoftTimeLimitExceeded.

    The signal may arrive at any point, even while "start" is being recorded:
    every step is inside the ``try``, so the task always survives it.
    """
    scratch = scratch_of(task)
    deadline = time.monotonic() + 60
    while True:
        try:
            if not started:
                started = True
                record(task, token, "start")
            while time.monotonic() < deadline and not scratch.exists(f"go:{token}"):
                time.sleep(0.05)
            return
        except SoftTimeLimitExceeded:
            record(task, token, "signalled")


def register(app: Celery) -> None:
    """Register the lifecycle tasks on ``app``."""

    @app.task(base=UniqueTask, name="life.work", bind=True, shared=False)
    def work(self: UniqueTask, token: str, seconds: float = 0.0, fail: bool = False) -> str:
        record(self, token, "start")
        time.sleep(seconds)
        record(self, token, "end")
        if fail:
            raise RuntimeError(f"{token} failed on purpose")
        return token

    @app.task(
        base=UniqueTask, name="life.work_soon_retried", bind=True, shared=False, default_retry_delay=0.5
    )
    def work_soon_retried(self: UniqueTask, token: str, seconds: float = 0.0) -> str:
        # As life.work, retried half a second later (task_retry_on_worker_lost).
        record(self, token, "start")
        time.sleep(seconds)
        record(self, token, "end")
        return token

    @app.task(base=UniqueTask, name="life.survivor", bind=True, shared=False)
    def survivor(self: UniqueTask, token: str, after: float = 1.0, fail: bool = False) -> str:
        # Survives the SoftTimeLimitExceeded a SIGUSR1 raises, then goes on for
        # ``after`` seconds, waiting for the test's go-ahead to end.
        wait_for_go(self, token)
        time.sleep(after)
        record(self, token, "end")
        if fail:
            raise RuntimeError(f"{token} failed after surviving")
        return token

    @app.task(base=UniqueTask, name="life.replacer", bind=True, shared=False)
    def replacer(self: UniqueTask, token: str, seconds: float = 0.0, fail: bool = False) -> Any:
        record(self, token, "replacing")
        return self.replace(plain_work.s(token, seconds, fail))

    @app.task(name="life.plain_work", bind=True, shared=False)
    def plain_work(self: Any, token: str, seconds: float = 0.0, fail: bool = False) -> str:
        record(self, token, "start")
        time.sleep(seconds)
        record(self, token, "end")
        if fail:
            raise RuntimeError(f"{token} replacement failed on purpose")
        return token

    @app.task(base=UniqueTask, name="life.self_stored", bind=True, shared=False)
    def self_stored(self: UniqueTask, token: str, state: str = "SUCCESS") -> None:
        # Celery's documented pattern: store a state yourself, then Ignore.
        record(self, token, "start")
        meta: dict[str, Any] = {"token": token}
        if state == "FAILURE":
            meta = {"exc_type": "RuntimeError", "exc_message": [f"{token} stored its failure"]}
        self.update_state(state=state, meta=meta)
        raise Ignore()

    @app.task(base=UniqueTask, name="life.reject", bind=True, shared=False, acks_late=True)
    def reject(self: UniqueTask, token: str, requeue: bool = False) -> None:
        record(self, token, "start")
        raise Reject(f"{token} rejected", requeue=requeue)

    @app.task(base=UniqueTask, name="life.flaky", bind=True, shared=False, max_retries=2)
    def flaky(self: UniqueTask, token: str, failures: int = 1) -> int:
        record(self, token, "start")
        if self.request.retries < failures:
            raise self.retry(countdown=0.2)
        return int(self.request.retries)

    @app.task(base=UniqueTask, name="life.double", shared=False)
    def double(x: int) -> int:
        return 2 * x

    @app.task(base=UniqueTask, name="life.total", shared=False)
    def total(values: list[int]) -> int:
        return sum(values)

    @app.task(base=UniqueTask, name="life.quick_retry", bind=True, shared=False, max_retries=5)
    def quick_retry(self: UniqueTask, token: str, failures: int = 1) -> int:
        # Retries at once (countdown 0): the retry is published while this attempt still runs.
        record(self, token, "start")
        if self.request.retries < failures:
            raise self.retry(countdown=0)
        record(self, token, "end")
        return int(self.request.retries)

    @app.task(base=UniqueTask, name="life.group_replacer", bind=True, shared=False)
    def group_replacer(self: UniqueTask, token: str, seconds: float = 0.0) -> Any:
        record(self, token, "replacing")
        return self.replace(group(plain_work.s(f"{token}-a", seconds), plain_work.s(f"{token}-b", seconds)))

    @app.task(base=UniqueTask, name="life.chain_replacer", bind=True, shared=False)
    def chain_replacer(self: UniqueTask, token: str, seconds: float = 0.0) -> Any:
        record(self, token, "replacing")
        return self.replace(chain(plain_work.si(f"{token}-a", seconds), plain_work.si(token, seconds)))

    @app.task(name="life.plain_replacer", bind=True, shared=False)
    def plain_replacer(self: Any, token: str, seconds: float = 0.0) -> Any:
        # A plain task (sent with send_unique) that replaces itself.
        record(self, token, "replacing")
        return self.replace(plain_work.s(token, seconds))

    @app.task(base=UniqueTask, name="life.hard_limited", bind=True, shared=False, time_limit=1)
    def hard_limited(self: UniqueTask, token: str, seconds: float = 5.0) -> str:
        record(self, token, "start")
        time.sleep(seconds)
        record(self, token, "end")
        return token

    @app.task(
        base=UniqueTask, name="life.autoretry", bind=True, shared=False,
        autoretry_for=(KeyError,), max_retries=2, default_retry_delay=0.2,
    )
    def autoretry(self: UniqueTask, token: str, failures: int = 1) -> int:
        record(self, token, "start")
        if self.request.retries < failures:
            raise KeyError(token)
        return int(self.request.retries)

    @app.task(base=UniqueTask, name="life.survivor_retry", bind=True, shared=False, max_retries=1)
    def survivor_retry(self: UniqueTask, token: str) -> str:
        # Survives a SIGUSR1, then retries.
        record(self, token, "start")
        if self.request.retries:
            record(self, token, "retried")
            return token
        wait_for_go(self, token, started=True)
        raise self.retry(countdown=0.5)

    @app.task(base=UniqueTask, name="life.slow_retry", bind=True, shared=False, max_retries=1)
    def slow_retry(self: UniqueTask, token: str) -> int:
        # Retries once, three seconds later.
        record(self, token, "start")
        if not self.request.retries:
            raise self.retry(countdown=3)
        return int(self.request.retries)

    @app.task(base=UniqueTask, name="life.requeue_once", bind=True, shared=False, acks_late=True)
    def requeue_once(self: UniqueTask, token: str) -> str:
        # Rejects its message with requeue the first time it runs, then succeeds.
        record(self, token, "start")
        if scratch_of(self).incr(f"runs:{token}") == 1:
            raise Reject(f"{token} requeued", requeue=True)
        return token

    @app.task(base=UniqueTask, name="life.exits", bind=True, shared=False)
    def exits(self: UniqueTask, token: str) -> None:
        # Raises a BaseException that is not an Exception out of its body.
        record(self, token, "start")
        raise SystemExit(f"{token} exits")

    @app.task(name="life.run_state", shared=False)
    def run_state() -> dict[str, int]:
        # What this worker process keeps about runs: markers to renew or to make.
        from celery_unique.config import app_state
        from celery_unique.keeper import keeper

        return {"renewed": keeper(app_state(app)).renewing()}

    @app.task(base=UniqueTask, name="life.retry_then_clean_up", bind=True, shared=False, max_retries=1)
    def retry_then_clean_up(self: UniqueTask, token: str, cleanup: float = 1.0) -> int:
        # Retries at once, then spends a while cleaning up (a with block's exit) before it ends.
        record(self, token, "start")
        if self.request.retries:
            return int(self.request.retries)
        try:
            raise self.retry(countdown=0)
        finally:
            time.sleep(cleanup)

    @app.task(base=UniqueTask, name="life.retry_no_throw", bind=True, shared=False, max_retries=1)
    def retry_no_throw(self: UniqueTask, token: str, countdown: float = 2.0) -> str:
        # Publishes its retry with throw=False, then returns: Celery stores
        # SUCCESS for the first attempt while the retry waits.
        record(self, token, "start")
        if not self.request.retries:
            self.retry(countdown=countdown, throw=False)
            return "retried"
        return "done"

    @app.task(name="life.errback", shared=False)
    def errback(request: Any, exc: Any, traceback: Any, token: str) -> None:
        scratch = redis.Redis.from_url(app.conf.lifecycle_scratch_url)
        scratch.rpush(f"errback:{token}", f"{type(exc).__name__}: {exc}")


def _from_environment() -> Celery | None:
    if ENV_BROKER not in os.environ:
        return None
    return make_app(
        os.environ[ENV_BROKER],
        os.environ.get(ENV_BACKEND) or None,
        os.environ[ENV_LOCKS],
        os.environ[ENV_SCRATCH],
        json.loads(os.environ.get(ENV_CONF) or "{}"),
    )


app = _from_environment()
