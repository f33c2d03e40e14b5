"""Reliability: races, killed workers, lock-store and broker faults, bad input, key hygiene.

Every test runs against real ``redis-server`` processes and real Celery
workers. The figures they print (run with ``-s``) are the ones quoted in
``docs/reliability.md``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery
from kombu.exceptions import OperationalError

from celery_unique import LOCK_HEADER, DuplicateTaskError, LockStoreError, UniqueTask
from celery_unique.config import lock_store
from celery_unique.headers import UNTIL_HEADER
from celery_unique.keys import parse_key
from celery_unique.testing import RedisServer
from tests.conftest import BROKER_DB, LOCK_DB, wait_until
from tests.reliability_support import (
    QUEUE,
    RaceSetup,
    celery_worker_process,
    keys_without_ttl,
    make_app,
    racer,
    worker_env,
)

SCRATCH_DB = 3
SOCKET_TIMEOUT = 0.5


@pytest.fixture
def lock_server() -> Iterator[RedisServer]:
    """A redis-server of its own for the locks, so a test can stop, pause or restart it."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def split_app(redis_server: RedisServer, lock_server: RedisServer) -> Celery:
    """An app whose broker is the session Redis and whose locks live on ``lock_server``."""
    return make_app(
        redis_server.url(BROKER_DB),
        lock_server.url(LOCK_DB),
        unique_redis_socket_timeout=SOCKET_TIMEOUT,
    )


def queued(broker: redis.Redis, queue: str = QUEUE) -> int:
    """Messages waiting in ``queue`` (kombu's Redis transport keeps a queue as a list)."""
    return int(broker.llen(queue))


# --- 1. races ----------------------------------------------------------------------------------

RACERS = 8
SAME_ROUNDS = 500
DISTINCT_ROUNDS = 100


@pytest.mark.slow
# The racers are forked so that they start at once; on Python 3.12+ forking
# the test process (which has pytest-xdist's threads) warns, and the children
# touch none of those threads.
@pytest.mark.filterwarnings(r"ignore:This process \(pid=\d+\) is multi-threaded:DeprecationWarning")
def test_concurrent_enqueues_publish_exactly_once(
    redis_server: RedisServer, broker: redis.Redis, locks: redis.Redis
) -> None:
    """8 processes released together enqueue one call: one publish per round, the rest refused."""
    setup = RaceSetup(redis_server.url(BROKER_DB), redis_server.url(LOCK_DB), SAME_ROUNDS, DISTINCT_ROUNDS)
    ctx = multiprocessing.get_context("fork")
    # The parent is a party too: it clears state before each start and counts after each end.
    barrier = ctx.Barrier(RACERS + 1, timeout=60)
    results = ctx.Queue()
    procs = [ctx.Process(target=racer, args=(setup, i, barrier, results)) for i in range(RACERS)]
    for proc in procs:
        proc.start()
    published_per_round: list[int] = []
    try:
        for _ in range(SAME_ROUNDS + DISTINCT_ROUNDS):
            broker.delete(QUEUE)
            locks.flushdb()
            barrier.wait()  # start: all racers call apply_async now
            barrier.wait()  # end: every racer has its answer
            published_per_round.append(queued(broker))
        outcomes = dict(results.get(timeout=30) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    same = Counter(o for i in range(RACERS) for o in outcomes[i][:SAME_ROUNDS])
    distinct = Counter(o for i in range(RACERS) for o in outcomes[i][SAME_ROUNDS:])
    same_messages = published_per_round[:SAME_ROUNDS]
    distinct_messages = published_per_round[SAME_ROUNDS:]
    print(
        f"\nrace, same call: {SAME_ROUNDS} rounds x {RACERS} processes: "
        f"{sum(same_messages)} messages, {same['published']} published, "
        f"{same['duplicate']} rejected, {sum(m - 1 for m in same_messages if m > 1)} duplicates"
        f"\nrace, distinct calls: {DISTINCT_ROUNDS} rounds x {RACERS} processes: "
        f"{sum(distinct_messages)} messages, {distinct['published']} published, "
        f"{distinct['duplicate']} rejected"
    )
    assert set(same) | set(distinct) <= {"published", "duplicate"}, (same, distinct)
    assert same_messages == [1] * SAME_ROUNDS
    for number in range(SAME_ROUNDS):
        answers = Counter(outcomes[i][number] for i in range(RACERS))
        assert answers == {"published": 1, "duplicate": RACERS - 1}, (number, answers)
    assert distinct_messages == [RACERS] * DISTINCT_ROUNDS
    assert distinct == {"published": RACERS * DISTINCT_ROUNDS}


# --- 2. a worker killed mid-task ---------------------------------------------------------------


@pytest.mark.slow
def test_killed_worker_with_acks_late_reruns_and_releases(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """SIGKILL of the pool child mid-task: the message is redelivered, runs and releases its lock."""
    broker_url, lock_url = redis_server.url(BROKER_DB), redis_server.url(LOCK_DB)
    scratch = redis_server.client(SCRATCH_DB)
    app = make_app(broker_url, lock_url, acks_late=True)
    token = uuid.uuid4().hex
    env = worker_env(broker_url, lock_url, redis_server.url(SCRATCH_DB), acks_late=True)
    with celery_worker_process(env, tmp_path / "worker.log"):
        result = app.tasks["rel.crash_once"].apply_async((token,), unique=120)
        key = app.tasks["rel.crash_once"].lock_key((token,), {}, {})
        pid = int(wait_until(lambda: scratch.get(f"pid:{token}"), timeout=30, what="task started"))
        started = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        done = wait_until(lambda: scratch.get(f"done:{token}"), timeout=30, what="redelivered run")
        redelivered_after = time.monotonic() - started
        wait_until(lambda: not locks.exists(key), timeout=10, what="lock released")
        # The same call is accepted again: no DuplicateTaskError from a stale lock.
        again = app.tasks["rel.crash_once"].apply_async((token,), unique=120)
        wait_until(lambda: scratch.get(f"done:{token}") == again.id.encode(), timeout=30, what="rerun")
    ids = [i.decode() for i in scratch.lrange(f"ids:{token}", 0, -1)]
    print(f"\nkilled worker, acks_late: redelivered and finished {redelivered_after:.2f}s after SIGKILL")
    assert done == result.id.encode()
    # Killed run, redelivered run (same id), then the fresh enqueue.
    assert ids == [result.id, result.id, again.id]


@pytest.mark.slow
def test_killed_worker_without_acks_late_loses_the_message_lock_waits_for_ttl(
    redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """Without acks_late a killed task is lost; its lock stays, refuses duplicates, then expires."""
    broker_url, lock_url = redis_server.url(BROKER_DB), redis_server.url(LOCK_DB)
    scratch = redis_server.client(SCRATCH_DB)
    app = make_app(broker_url, lock_url, acks_late=False)
    task = app.tasks["rel.crash_once"]
    token = uuid.uuid4().hex
    ttl = 4
    env = worker_env(broker_url, lock_url, redis_server.url(SCRATCH_DB), acks_late=False)
    with celery_worker_process(env, tmp_path / "worker.log"):
        result = task.apply_async((token,), unique=ttl)
        key = task.lock_key((token,), {}, {})
        pid = int(wait_until(lambda: scratch.get(f"pid:{token}"), timeout=30, what="task started"))
        os.kill(pid, signal.SIGKILL)
        time.sleep(1.5)  # time enough for a redelivery, were there one
        assert int(scratch.get(f"runs:{token}") or 0) == 1
        assert locks.get(key) == result.id.encode()
        with pytest.raises(DuplicateTaskError) as info:
            task.apply_async((token,), unique=ttl)
        assert info.value.task_id == result.id
        wait_until(lambda: not locks.exists(key), timeout=ttl + 2, what="lock expired with its TTL")
    assert scratch.get(f"done:{token}") is None
    assert queued(redis_server.client(BROKER_DB)) == 0


# --- 3. lock-store faults ----------------------------------------------------------------------


def test_lock_store_down_fails_fast_and_publishes_nothing(
    split_app: Celery, lock_server: RedisServer, broker: redis.Redis
) -> None:
    """Lock Redis stopped: LockStoreError within the socket timeout, nothing published."""
    task = split_app.tasks["rel.noop"]
    task.apply_async((0,), unique=60)  # a warm pool: the failure is a dropped connection
    broker.delete(QUEUE)
    lock_server.stop()
    started = time.monotonic()
    with pytest.raises(LockStoreError) as info:
        task.apply_async((1,), unique=60)
    elapsed = time.monotonic() - started
    print(f"\nlock store down: LockStoreError after {elapsed * 1000:.0f} ms")
    assert elapsed < SOCKET_TIMEOUT
    assert isinstance(info.value.__cause__, redis.ConnectionError)
    assert info.value.task_name == "rel.noop"
    assert queued(broker) == 0


@pytest.mark.slow
def test_stalled_lock_store_gives_a_clear_error_and_leaves_no_orphan(
    split_app: Celery, lock_server: RedisServer, broker: redis.Redis
) -> None:
    """Lock Redis paused (CLIENT PAUSE ALL): LockStoreError, and no lock appears after the pause."""
    task = split_app.tasks["rel.noop"]
    key = task.lock_key((1,), {}, {})
    admin = lock_server.client(LOCK_DB)
    pause_ms = 2000
    admin.execute_command("CLIENT", "PAUSE", pause_ms, "ALL")
    paused_at = time.monotonic()
    with pytest.raises(LockStoreError) as info:
        task.apply_async((1,), unique=60)
    elapsed = time.monotonic() - paused_at
    assert isinstance(info.value.__cause__, redis.TimeoutError)
    assert "TimeoutError" in str(info.value)
    assert queued(broker) == 0
    # After the pause, give any postponed SET time to run: none may leave a lock behind.
    time.sleep(max(0.0, pause_ms / 1000 - (time.monotonic() - paused_at)) + 1.0)
    assert admin.exists(key) == 0
    assert admin.dbsize() == 0
    print(f"\nstalled lock store: LockStoreError after {elapsed * 1000:.0f} ms "
          f"(socket timeout {SOCKET_TIMEOUT * 1000:.0f} ms); no orphan lock after the pause")
    # And the library recovers without a restart.
    task.apply_async((1,), unique=60)
    assert admin.exists(key) == 1


@pytest.mark.slow
def test_stalled_lock_store_errors_within_the_socket_timeout(
    split_app: Celery, lock_server: RedisServer
) -> None:
    """A stalled lock store is reported within unique_redis_socket_timeout, as documented."""
    task = split_app.tasks["rel.noop"]
    lock_server.client().execute_command("CLIENT", "PAUSE", 1500, "ALL")
    started = time.monotonic()
    with pytest.raises(LockStoreError):
        task.apply_async((1,), unique=60)
    # A quarter of the timeout is slack for a busy machine, not a second round trip.
    assert time.monotonic() - started < SOCKET_TIMEOUT * 1.25
    time.sleep(1.5)


def test_lock_store_restart_without_persistence(split_app: Celery, lock_server: RedisServer) -> None:
    """Lock Redis restarted empty on the same port: the next enqueue works, no stale-connection error."""
    task = split_app.tasks["rel.noop"]
    first = task.apply_async((1,), unique=60)
    store = lock_store(split_app)
    key = task.lock_key((1,), {}, {})
    assert store.holder(key) == first.id
    lock_server.stop()
    lock_server.start()
    # The pooled connection and the loaded script are both gone; neither may surface.
    second = task.apply_async((1,), unique=60)
    assert store.holder(key) == second.id
    assert store.release(key, second.id) is True


def test_script_flush_between_calls(split_app: Celery, lock_server: RedisServer) -> None:
    """SCRIPT FLUSH between acquire and release: both scripts reload themselves."""
    task = split_app.tasks["rel.noop"]
    admin = lock_server.client(LOCK_DB)
    store = lock_store(split_app)
    result = task.apply_async((1,), unique=60)
    key = task.lock_key((1,), {}, {})
    admin.script_flush()
    assert store.release(key, result.id) is True
    admin.script_flush()
    task.apply_async((1,), unique=60)
    admin.script_flush()
    with pytest.raises(DuplicateTaskError):
        task.apply_async((1,), unique=60)


# --- 4. broker faults --------------------------------------------------------------------------


@pytest.fixture
def dead_broker_app(lock_server: RedisServer) -> Iterator[Celery]:
    """An app whose broker server is stopped while its lock store is up."""
    with RedisServer() as broker_server:
        app = make_app(broker_server.url(BROKER_DB), lock_server.url(LOCK_DB))
        broker_server.stop()
        yield app


def test_broker_down_releases_the_lock(dead_broker_app: Celery, lock_server: RedisServer) -> None:
    """Broker down after the lock is taken: kombu's OperationalError reaches the caller, lock released."""
    started = time.monotonic()
    with pytest.raises(OperationalError):
        dead_broker_app.tasks["rel.noop"].apply_async((1,), unique=60, retry=False)
    # kombu still retries the connection itself (broker_transport_options defaults) before this.
    print(f"\nbroker down, retry=False: OperationalError after {(time.monotonic() - started) * 1000:.0f} ms")
    assert lock_server.client(LOCK_DB).dbsize() == 0


def test_broker_down_with_publish_retries_releases_the_lock(
    dead_broker_app: Celery, lock_server: RedisServer
) -> None:
    """Publish retries exhausted against a dead broker: the lock is still released."""
    policy = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.1, "interval_max": 0.2}
    started = time.monotonic()
    with pytest.raises(OperationalError):
        dead_broker_app.tasks["rel.noop"].apply_async((1,), unique=60, retry=True, retry_policy=policy)
    elapsed = time.monotonic() - started
    print(f"\nbroker down, 2 publish retries: OperationalError after {elapsed * 1000:.0f} ms")
    # The retries really happened (0.1 s + 0.2 s of waiting), and the lock is gone after them.
    assert elapsed >= 0.25
    assert lock_server.client(LOCK_DB).dbsize() == 0


# --- 5. bad input ------------------------------------------------------------------------------


def _nested(depth: int) -> list[Any]:
    root: list[Any] = []
    node = root
    for _ in range(depth - 1):
        child: list[Any] = []
        node.append(child)
        node = child
    return root


def _too_deep_for_json() -> int:
    """A nesting depth that ``json`` cannot encode on this interpreter.

    The C encoder stops at the C recursion limit, which is not
    ``sys.getrecursionlimit()`` and grew in 3.12 and 3.13 (5,000 encodes on
    3.13), so probe for it rather than guess.
    """
    depth = sys.getrecursionlimit()
    while depth < 10_000_000:
        depth *= 2
        try:
            json.dumps(_nested(depth))
        except RecursionError:
            return depth
    raise AssertionError(f"json encoded lists nested {depth} deep: no recursion limit to test against")


def test_non_serializable_argument_locks_and_publishes_nothing(
    split_app: Celery, lock_server: RedisServer, broker: redis.Redis
) -> None:
    """An argument with no JSON form: TypeError naming task and argument, nothing locked or published."""
    with pytest.raises(TypeError, match=r"rel\.noop: argument 'value'"):
        split_app.tasks["rel.noop"].apply_async((object(),), unique=60)
    assert lock_server.client(LOCK_DB).dbsize() == 0
    assert queued(broker) == 0


@pytest.mark.slow
def test_ten_megabyte_argument_keeps_a_short_key(
    split_app: Celery, lock_server: RedisServer, broker: redis.Redis
) -> None:
    """A 10 MB argument is locked and published once; its key stays short."""
    task = split_app.tasks["rel.noop"]
    big = "x" * (10 * 1024 * 1024)
    result = task.apply_async((big,), unique=60)
    with pytest.raises(DuplicateTaskError):
        task.apply_async((big,), unique=60)
    keys = lock_server.client(LOCK_DB).keys("*")
    assert len(keys) == 1
    assert len(keys[0]) < 100, keys[0]
    assert lock_server.client(LOCK_DB).get(keys[0]) == result.id.encode()
    assert queued(broker) == 1


def test_nested_500_deep_argument_works(
    split_app: Celery, lock_server: RedisServer, broker: redis.Redis
) -> None:
    """An argument nested 500 deep gets a key, a lock and one message, and is refused a second time."""
    task = split_app.tasks["rel.noop"]
    task.apply_async((_nested(500),), unique=60)
    with pytest.raises(DuplicateTaskError):
        task.apply_async((_nested(500),), unique=60)
    assert lock_server.client(LOCK_DB).dbsize() == 1
    assert queued(broker) == 1


def test_nested_beyond_recursion_limit_names_the_task(
    split_app: Celery, lock_server: RedisServer, broker: redis.Redis
) -> None:
    """An argument too deep for JSON: a TypeError naming the task, nothing locked or published."""
    try:
        with pytest.raises(TypeError, match=r"rel\.noop"):
            split_app.tasks["rel.noop"].apply_async((_nested(_too_deep_for_json()),), unique=60)
    finally:
        # Whatever the error, it came before the lock store and the broker.
        assert lock_server.client(LOCK_DB).dbsize() == 0
        assert queued(broker) == 0


@pytest.mark.parametrize(
    "value",
    ["naïve café ✓ 日本語 🎉", "lone \ud800 surrogate", "\udfff", {"k\ud83d": "\u0000\u2028"}],
    ids=["unicode", "lone-high-surrogate", "lone-low-surrogate", "surrogate-key"],
)
def test_unicode_arguments(
    split_app: Celery, lock_server: RedisServer, broker: redis.Redis, value: Any
) -> None:
    """Unicode arguments, lone surrogates included, lock and publish once; a repeat is refused."""
    task = split_app.tasks["rel.noop"]
    task.apply_async((value,), unique=60)
    with pytest.raises(DuplicateTaskError):
        task.apply_async((value,), unique=60)
    assert lock_server.client(LOCK_DB).dbsize() == 1
    assert queued(broker) == 1


def test_lone_surrogates_do_not_collide(split_app: Celery) -> None:
    """Distinct lone surrogates give distinct keys (no lossy encoding before hashing)."""
    task = split_app.tasks["rel.noop"]
    keys = {task.lock_key((v,), {}, {}) for v in ("\ud800", "\udfff", "?", "\ufffd", "")}
    assert len(keys) == 5


ODD_TASK = "odd: task name ✓ *[x]"
ODD_QUEUE = "odd: queue ü {1} ?"


def test_odd_task_and_queue_names_round_trip(
    split_app: Celery, lock_server: RedisServer, broker: redis.Redis
) -> None:
    """Task and queue names with ':', spaces, globs and unicode: one lock, one message, keys round-trip."""

    @split_app.task(base=UniqueTask, name=ODD_TASK, shared=False)
    def odd(x: int) -> int:
        return x

    result = odd.apply_async((1,), unique=60, queue=ODD_QUEUE)
    with pytest.raises(DuplicateTaskError) as info:
        odd.apply_async((1,), unique=60, queue=ODD_QUEUE)
    assert info.value.task_id == result.id
    keys = [k.decode() for k in lock_server.client(LOCK_DB).keys("*")]
    assert len(keys) == 1
    parsed = parse_key(keys[0])
    assert (parsed.prefix, parsed.queue, parsed.task_name) == ("unique", ODD_QUEUE, ODD_TASK)
    assert info.value.key == keys[0]
    assert queued(broker, ODD_QUEUE) == 1
    # The escaped key is a literal SCAN pattern for itself and for nothing else.
    assert [k.decode() for k in lock_server.client(LOCK_DB).scan_iter(match=keys[0])] == keys


def test_forged_lock_header_cannot_release_another_tasks_lock(
    celery_app: Celery, tasks: SimpleNamespace, worker: Any, locks: redis.Redis
) -> None:
    """A caller-supplied celery_unique_lock header naming a victim's lock: the victim lock survives."""
    # The victim waits in a queue no worker consumes, so only a forged release could free it.
    victim = tasks.send_report.apply_async((1,), unique=600, queue="parked")
    victim_key = tasks.send_report.lock_key((1,), {}, {"queue": "parked"})
    assert locks.get(victim_key) == victim.id.encode()
    # The release-timing header is forged too, so the forged release is tried as early as possible.
    forged = {LOCK_HEADER: victim_key, UNTIL_HEADER: "start"}
    # Without unique= the header reaches the worker as given; the release is owner-checked.
    plain = tasks.send_report.apply_async((2,), headers=forged)
    # With unique= the library overwrites the header with the call's own key.
    locked = tasks.send_report.apply_async((3,), headers=forged, unique=600)
    assert plain.get(timeout=10) == "report 2 daily"
    assert locked.get(timeout=10) == "report 3 daily"
    own_key = tasks.send_report.lock_key((3,), {}, {})
    wait_until(lambda: not locks.exists(own_key), what="the forger's own lock released")
    assert locks.get(victim_key) == victim.id.encode()
    with pytest.raises(DuplicateTaskError):
        tasks.send_report.apply_async((1,), unique=600, queue="parked")


# --- 6. hygiene --------------------------------------------------------------------------------


def test_no_lock_without_ttl_after_a_workload(
    celery_app: Celery, tasks: SimpleNamespace, worker: Any, locks: redis.Redis
) -> None:
    """After successes, failures, retries, countdowns and refusals, every lock key has a TTL."""
    # A planted key without TTL proves the scan can fail.
    locks.set("unique:planted", "x")
    assert keys_without_ttl(locks) == [b"unique:planted"]
    locks.delete("unique:planted")

    results = [tasks.send_report.apply_async((i,), unique=60) for i in range(20)]
    results.append(tasks.fail.apply_async((1,), unique=60))
    results.append(tasks.flaky.apply_async((1,), {"failures": 1}, unique=60))
    parked = tasks.send_report.apply_async((99,), unique=60, countdown=30)
    for i in range(5):
        with pytest.raises(DuplicateTaskError):
            tasks.send_report.apply_async((99,), unique=60, countdown=30)
        tasks.send_report.apply_async((100 + i,), unique=1.5, queue="parked")
    for result in results:
        result.get(timeout=15, propagate=False)
    time.sleep(0.2)
    remaining = locks.dbsize()
    assert keys_without_ttl(locks) == []
    print(f"\nhygiene: {remaining} locks left after the workload, 0 without a TTL")
    # The failed task's, the countdown's and the parked ones are expected to remain, with TTLs.
    assert remaining >= 2
    parked.revoke()
