"""A walk-through of unique tasks against a real Redis and a real Celery worker.

    python -m example_project.demo

With ``$REDIS_URL`` unset it starts a throwaway ``redis-server`` on a free
port; otherwise it uses that server (databases 0, 1 and 2). Either way it
starts its own ``celery worker`` for the example project, runs the steps,
prints OK or FAIL for each check, and stops everything it started. The exit
status is 0 only if every check passed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import redis
from celery.result import AsyncResult

from celery_unique import DuplicateTaskError, UniqueTask
from celery_unique.config import lock_store
from celery_unique.testing import RedisServer, wait_for
from example_project.app import app, use_redis
from example_project.config import WORKER_QUEUES
from example_project.tasks import export_to_crm, send_report, sync_feed

PROJECT_ROOT = Path(__file__).resolve().parent.parent
WORKER_START_TIMEOUT = 30.0
WORKER_STOP_TIMEOUT = 15.0
TASK_TIMEOUT = 15.0


# --- output -----------------------------------------------------------------


def say(text: str = "") -> None:
    """Print a line at once, even when stdout is a pipe."""
    print(text, flush=True)


class Checklist:
    """Numbered steps, each with OK/FAIL checks; remembers whether all passed."""

    def __init__(self) -> None:
        self.steps = 0
        self.failures = 0

    def step(self, title: str, explanation: str) -> None:
        self.steps += 1
        say()
        say(f"{self.steps}. {title}")
        say(f"   {explanation}")

    def check(self, passed: bool, text: str) -> bool:
        if not passed:
            self.failures += 1
        say(f"   [{'OK' if passed else 'FAIL'}] {text}")
        return passed

    def note(self, text: str) -> None:
        say(f"          {text}")

    @property
    def passed(self) -> bool:
        return self.failures == 0


def describe(task: UniqueTask, args: tuple[Any, ...], **options: Any) -> str:
    """Spell a call as its ``apply_async`` line, for the output."""
    parts = [repr(args), *(f"{name}={value!r}" for name, value in options.items())]
    return f"{task.name.rsplit('.', 1)[-1]}.apply_async({', '.join(parts)})"


# --- the worker -------------------------------------------------------------


class Worker:
    """A ``celery worker`` subprocess for the example project, in its own process group."""

    def __init__(self, server_url: str, log_path: Path, queues: Sequence[str] = WORKER_QUEUES) -> None:
        self.server_url = server_url
        self.log_path = log_path
        self.queues = tuple(queues)
        # Unique per run, so a ping answer can only come from this worker even
        # when other workers share the broker.
        self.name = f"demo-{os.getpid()}-{time.monotonic_ns()}"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        env = dict(os.environ, REDIS_URL=self.server_url)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
        command = [
            sys.executable, "-m", "celery", "-A", "example_project.app", "worker",
            "--pool=prefork", "--concurrency=2", "--loglevel=INFO",
            "-Q", ",".join(self.queues), "-n", f"{self.name}@%h",
            # Nothing here needs other workers' state; skipping it starts faster.
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]
        with self.log_path.open("wb") as log:
            # A new session keeps Ctrl-C in the terminal from reaching the
            # worker directly: the demo stops it, in order, and its pool with it.
            self.process = subprocess.Popen(
                command, cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def wait_ready(self, timeout: float = WORKER_START_TIMEOUT) -> bool:
        """Wait until the worker answers a ping; False if it died or stayed silent."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            replies = app.control.ping(timeout=0.5)
            if any(name.startswith(f"{self.name}@") for reply in replies for name in reply):
                return True
        return False

    def stop(self) -> None:
        """Warm-shut the worker down, then kill whatever is left of its process group."""
        if self.process is None:
            return
        group = self.process.pid  # the session leader's pid is its group id
        _signal_group(group, signal.SIGTERM)
        try:
            self.process.wait(timeout=WORKER_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _signal_group(group, signal.SIGKILL)
            self.process.wait()
        # A pool child that outlived its parent would be orphaned, not stopped.
        _signal_group(group, signal.SIGKILL)
        self.process = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _signal_group(group: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signum)


@contextlib.contextmanager
def running_worker(server_url: str) -> Iterator[Worker]:
    """Start a worker, wait until it is ready, and stop it however the block ends."""
    fd, name = tempfile.mkstemp(prefix="example-project-worker-", suffix=".log")
    os.close(fd)
    worker = Worker(server_url, Path(name))
    keep_log = True
    try:
        worker.start()
        say(f"   worker pid {worker.pid}, queues {','.join(worker.queues)}, log {worker.log_path}")
        if not worker.wait_ready():
            raise RuntimeError(f"the worker did not become ready:\n{worker.log_tail()}")
        say("   worker ready (answered a ping)")
        yield worker
        keep_log = False
    finally:
        pid = worker.pid
        with shielded_from_signals():
            worker.stop()
            say(f"   worker pid {pid} stopped")
        if keep_log:
            say(f"   worker log kept at {worker.log_path}")
        else:
            worker.log_path.unlink(missing_ok=True)


# --- the walk-through -------------------------------------------------------


class Walkthrough:
    """The demo's steps, run against a worker that consumes ``WORKER_QUEUES``."""

    def __init__(self, checklist: Checklist) -> None:
        self.checks = checklist
        self.store = lock_store(app)
        # Every lock this demo took, so that it can give back the ones still held.
        self.taken: list[tuple[str, str]] = []
        self.results: list[AsyncResult] = []

    # helpers

    def enqueue(self, task: UniqueTask, args: tuple[Any, ...], **options: Any) -> AsyncResult:
        """``task.apply_async(args, **options)``, remembering the lock it takes."""
        result = task.apply_async(args, **options)
        self.taken.append((self.key(task, args, **options), result.id))
        self.results.append(result)
        return result

    def key(self, task: UniqueTask, args: tuple[Any, ...], **options: Any) -> str:
        return task.lock_key(args, None, options)

    def expect_duplicate(self, task: UniqueTask, args: tuple[Any, ...], holder: str, **options: Any) -> None:
        """Check that enqueueing again is refused, naming ``holder``."""
        call = describe(task, args, **options)
        try:
            result = self.enqueue(task, args, **options)
        except DuplicateTaskError as exc:
            self.checks.check(
                exc.task_id == holder,
                f"refused {call}: DuplicateTaskError, holder {exc.task_id}",
            )
            self.checks.note(f"lock key {exc.key}")
        else:
            self.checks.check(False, f"{call} was accepted as {result.id}; expected a refusal")

    def lock_released(self, key: str, timeout: float = 5.0) -> bool:
        # The worker stores the result a moment before it releases the lock.
        return wait_for(lambda: self.store.holder(key) is None, timeout) is not None

    def finish(self, result: AsyncResult) -> None:
        result.get(timeout=TASK_TIMEOUT, propagate=False)

    def stop_waiting(self) -> None:
        """Unsubscribe from every result while Redis is still there.

        A result still subscribed when the process exits unsubscribes from
        its destructor, and would retry against a Redis already stopped.
        """
        for result in self.results:
            app.backend.remove_pending_result(result)
        self.results.clear()

    def release_leftovers(self) -> None:
        """Release the locks this run still holds (owner-checked) so a rerun starts clean."""
        released = sum(self.store.release(key, task_id) for key, task_id in self.taken)
        if released:
            say(f"   released {released} {'lock' if released == 1 else 'locks'} this run still held")

    # steps

    def duplicate_refused(self) -> AsyncResult:
        self.checks.step(
            "An identical enqueue is refused while the first is queued",
            "send_report(42) twice with unique=60: the second raises DuplicateTaskError.",
        )
        first = self.enqueue(send_report, (42,), unique=60)
        self.checks.check(True, f"accepted {describe(send_report, (42,), unique=60)}: task {first.id}")
        self.expect_duplicate(send_report, (42,), first.id, unique=60)
        # Arguments are bound to the signature, so another spelling is the same call.
        self.expect_duplicate(send_report, (42, "daily"), first.id, unique=60)
        return first

    def other_queue_accepted(self) -> None:
        self.checks.step(
            "The same call on another queue is another task",
            "send_report(42) with queue='priority' while the first is still held.",
        )
        result = self.enqueue(send_report, (42,), unique=60, queue="priority")
        call = describe(send_report, (42,), unique=60, queue="priority")
        self.checks.check(True, f"accepted {call}: task {result.id}")
        self.checks.note(f"lock key {self.key(send_report, (42,), queue='priority')}")
        self.finish(result)

    def accepted_after_success(self, first: AsyncResult) -> None:
        self.checks.step(
            "When the task succeeds its lock is released",
            "Wait for the first send_report(42), then enqueue it again.",
        )
        value = first.get(timeout=TASK_TIMEOUT)
        self.checks.check(first.successful(), f"task {first.id} succeeded: {value!r}")
        key = self.key(send_report, (42,), unique=60)
        self.checks.check(self.lock_released(key), "its lock is gone")
        again = self.enqueue(send_report, (42,), unique=60)
        self.checks.check(True, f"accepted {describe(send_report, (42,), unique=60)} again: task {again.id}")
        self.finish(again)

    def countdown_extends_lock(self) -> None:
        self.checks.step(
            "With a countdown the lock lasts until processing time + TTL",
            "sync_feed(url) with unique=5, countdown=2: PTTL about 7000 ms, not 5000.",
        )
        args = ("https://example.com/feed.xml",)
        result = self.enqueue(sync_feed, args, unique=5, countdown=2)
        key = self.key(sync_feed, args, unique=5, countdown=2)
        pttl = self.store.ttl_ms(key)
        self.checks.check(
            pttl is not None and 5000 < pttl <= 7000,
            f"accepted {describe(sync_feed, args, unique=5, countdown=2)}: task {result.id},"
            f" lock PTTL {pttl} ms (countdown 2000 ms + TTL 5000 ms)",
        )
        self.expect_duplicate(sync_feed, args, result.id, unique=5)
        self.finish(result)
        self.checks.check(result.successful(), f"task ran after its countdown and returned {result.result!r}")
        self.checks.check(self.lock_released(key), "its lock is gone")

    def failure_keeps_lock(self) -> None:
        self.checks.step(
            "A failed task keeps its lock until the TTL",
            "export_to_crm(7) with unique=3 always fails; its lock stays for the 3 s.",
        )
        result = self.enqueue(export_to_crm, (7,), unique=3)
        self.finish(result)
        self.checks.check(result.failed(), f"task {result.id} failed: {result.result!r}")
        key = self.key(export_to_crm, (7,))
        pttl = self.store.ttl_ms(key)
        self.checks.check(
            self.store.holder(key) == result.id and pttl is not None and pttl > 0,
            f"its lock is still held by it, PTTL {pttl} ms",
        )
        self.expect_duplicate(export_to_crm, (7,), result.id, unique=3)
        expired = wait_for(lambda: self.store.holder(key) is None, timeout=5.0)
        self.checks.check(expired is not None, "the lock expired with its TTL")
        again = self.enqueue(export_to_crm, (7,), unique=3)
        self.checks.check(True, f"accepted {describe(export_to_crm, (7,), unique=3)} again: task {again.id}")
        self.finish(again)

    def run(self) -> None:
        first = self.duplicate_refused()
        self.other_queue_accepted()
        self.accepted_after_success(first)
        self.countdown_extends_lock()
        self.failure_keeps_lock()


def run_demo(server_url: str) -> bool:
    """Run the walk-through against the Redis server at ``server_url``; True if all passed.

    It uses databases 0 (broker), 1 (results) and 2 (locks) of that server,
    and starts and stops its own worker.
    """
    use_redis(server_url)
    # Celery retries a lost result connection for about 20 s; after Ctrl-C
    # has stopped a throwaway Redis that is only a wait before exiting.
    app.conf.result_backend_transport_options = {"retry_policy": {"max_retries": 1}}
    checks = Checklist()
    say(f"Redis: {server_url}")
    with running_worker(server_url):
        walk_through(checks)
    say()
    if checks.passed:
        say(f"All {checks.steps} steps behaved as expected.")
    else:
        say(f"{checks.failures} check(s) FAILED.")
    return checks.passed


def walk_through(checks: Checklist) -> None:
    """Run every step, recording a surprise as a failed check, then give back held locks."""
    walk = Walkthrough(checks)
    interrupted: KeyboardInterrupt | None = None
    try:
        walk.run()
    except KeyboardInterrupt as exc:
        # Re-raised as a fresh exception below: the caught one's traceback would
        # keep the steps' results alive until after Redis is stopped, and each
        # one unsubscribes from Redis when it is freed.
        interrupted = KeyboardInterrupt(*exc.args)
    except Exception as exc:
        checks.check(False, f"step stopped by {type(exc).__name__}: {exc}".rstrip())
    finally:
        with shielded_from_signals():
            with contextlib.suppress(redis.RedisError):
                walk.release_leftovers()
            with contextlib.suppress(Exception):
                walk.stop_waiting()
    # Ctrl-C in a terminal also stops a throwaway redis-server, and the step
    # may then fail on the lost connection before it sees the interrupt.
    if interrupted is None and _signals_received:
        interrupted = KeyboardInterrupt(_signals_received[0])
    if interrupted is not None:
        raise interrupted


# --- process plumbing -------------------------------------------------------


#: Names of the stop signals this process received, in order.
_signals_received: list[str] = []


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    # Unwind as Ctrl-C does, so every finally block stops what it started.
    name = signal.Signals(signum).name
    _signals_received.append(name)
    raise KeyboardInterrupt(name)


@contextlib.contextmanager
def shielded_from_signals() -> Iterator[None]:
    """Hold off Ctrl-C, SIGTERM and SIGHUP while cleaning up, so cleanup finishes."""
    if threading.current_thread() is not threading.main_thread():
        # Only the main thread may set handlers; a caller's thread gets no shield.
        yield
        return
    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """Yield ``$REDIS_URL``, or the URL of a throwaway redis-server stopped on exit."""
    given = os.environ.get("REDIS_URL")
    if given:
        yield given
        return
    server = RedisServer()
    try:
        server.start()
        say(f"   throwaway redis-server pid {server.process.pid if server.process else '-'}"
            f" on port {server.port}")
        yield f"redis://{server.host}:{server.port}"
    finally:
        with shielded_from_signals():
            server.close()
            say("   redis-server stopped")


def main() -> int:
    """Run the demo; return the process exit status."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    say("celery-unique demo: unique tasks with a real Redis and a real worker")
    try:
        with redis_server() as url:
            return 0 if run_demo(url) else 1
    except KeyboardInterrupt as exc:
        say(f"\ninterrupted ({exc or 'SIGINT'}); everything the demo started is stopped")
        return 130
    except Exception as exc:
        say(f"\nFAIL: the demo could not run: {type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
