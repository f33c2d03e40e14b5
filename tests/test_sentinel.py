"""Redis Sentinel as the lock store: locking through Sentinel, and a failover mid-stream.

The broker and the result backend stay on the session's plain Redis; only the
locks go through Sentinel, to a primary with one asynchronous replica (see
``tests/topology.py``). The failover test prints the figures quoted in
``docs/scaling.md`` (run with ``-s``).
"""

from __future__ import annotations

import gc
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker

from celery_unique import ConfigurationError, DuplicateTaskError, LockStoreError, UniqueTask
from celery_unique.testing import RedisServer, free_port
from tests.conftest import BROKER_DB, LOCK_DB, RESULT_DB, wait_until
from tests.topology import SentinelTopology

QUEUE = "sentinel"
MASTER = "mymaster"
SOCKET_TIMEOUT = 0.5


@pytest.fixture(autouse=True)
def _collect_results() -> Iterator[None]:
    """Collect this test's AsyncResults while the session Redis is still up.

    They sit in reference cycles; one collected after the session's server has
    stopped tries to unsubscribe from it and raises in ``__del__``.
    """
    yield
    gc.collect()


def make_app(redis_server: RedisServer, lock_url: str, **conf: Any) -> Celery:
    """An app with broker and results on the session Redis and its locks at ``lock_url``."""
    app = Celery("sentinel", set_as_current=False)
    app.conf.update(
        broker_url=redis_server.url(BROKER_DB),
        result_backend=redis_server.url(RESULT_DB),
        unique_redis_url=lock_url,
        broker_connection_retry_on_startup=False,
        task_default_queue=QUEUE,
    )
    app.conf.update(conf)

    # Not shared: a shared task would be added to every app created later,
    # shadowing the next test's own registration.
    @app.task(base=UniqueTask, name="tests.sentinel.report", shared=False)
    def report(user_id: int) -> str:
        return f"report {user_id}"

    return app


def queued(broker: redis.Redis) -> int:
    """Messages waiting in the test queue (kombu's Redis transport keeps a list)."""
    return int(broker.llen(QUEUE))


def test_sentinel_url_needs_master_name(redis_server: RedisServer, broker: redis.Redis) -> None:
    """A sentinel:// lock-store URL without master_name raises ConfigurationError naming it."""
    # Nothing listens on this port: the error must come from the settings,
    # before any connection is tried.
    app = make_app(redis_server, f"sentinel://127.0.0.1:{free_port()}/{LOCK_DB}")
    with pytest.raises(ConfigurationError, match="master_name"):
        app.tasks["tests.sentinel.report"].apply_async((1,), unique=60)
    assert queued(broker) == 0


def test_locks_live_on_the_primary_through_sentinel(
    redis_server: RedisServer, broker: redis.Redis
) -> None:
    """Through Sentinel a lock lands on the primary, refuses a duplicate and is released on success."""
    with SentinelTopology(sentinels=1) as topology:
        # A dead Sentinel listed first: the client must move on to the live one.
        url = topology.sentinel_url(LOCK_DB, extra_ports=(free_port(),))
        app = make_app(
            redis_server,
            url,
            unique_redis_transport_options={"master_name": MASTER},
            unique_redis_socket_timeout=SOCKET_TIMEOUT,
        )
        report = app.tasks["tests.sentinel.report"]
        primary = topology.primary.client(LOCK_DB)
        replica = topology.replica.client(LOCK_DB)

        first = report.apply_async((1,), unique=60)
        with pytest.raises(DuplicateTaskError) as refused:
            report.apply_async((1,), unique=60)
        key = refused.value.key
        assert refused.value.task_id == first.id
        assert primary.get(key) == first.id.encode()
        assert 0 < int(primary.pttl(key)) <= 60_000
        # The replica has it only through replication: the client writes to the primary alone.
        wait_until(lambda: replica.get(key) == first.id.encode(), 5, "the lock on the replica")
        assert queued(broker) == 1

        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
            assert first.get(timeout=10) == "report 1"
            # The release runs in task_success, just after the result is stored.
            wait_until(lambda: not primary.exists(key), 5, "the lock to be released")
            # A countdown keeps the running worker from finishing it (and
            # releasing its lock) before the lock is read.
            again = report.apply_async((1,), unique=60, countdown=1)
            assert primary.get(key) == again.id.encode()
            assert again.get(timeout=10) == "report 1"
            wait_until(lambda: not primary.exists(key), 5, "the second lock to be released")
        primary.close()
        replica.close()
    assert topology.leftover() == []


FAULTS = {
    # A crash: the port refuses connections at once.
    "kill": SentinelTopology.kill_primary,
    # A hang: connections are accepted and never answered, so only the
    # socket timeout stops a call.
    "stall": SentinelTopology.stall_primary,
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_failover_mid_stream(redis_server: RedisServer, broker: redis.Redis, fault: str) -> None:
    """A lost primary gives a bounded window of LockStoreErrors, then locking resumes on the new one."""
    before_kill = 200  # enqueues on the first primary
    pace = 0.02  # seconds between enqueues once the primary is gone
    window_limit = 30.0  # seconds the stream may keep failing before the test gives up
    call_limit = 3 * SOCKET_TIMEOUT + 1  # no single enqueue may take longer

    with SentinelTopology(sentinels=3) as topology:
        app = make_app(
            redis_server,
            topology.sentinel_url(LOCK_DB),
            unique_redis_transport_options={"master_name": MASTER},
            unique_redis_socket_timeout=SOCKET_TIMEOUT,
        )
        report = app.tasks["tests.sentinel.report"]
        durations: list[float] = []
        taken: dict[str, str] = {}  # lock key -> holder, for the calls made before the kill

        def enqueue(user_id: int) -> Any:
            start = time.monotonic()
            try:
                return report.apply_async((user_id,), unique=60)
            finally:
                durations.append(time.monotonic() - start)

        for user_id in range(before_kill):
            result = enqueue(user_id)
            taken[result.id] = str(user_id)
        keys = {task_id: report.lock_key((int(uid),), {}, {}) for task_id, uid in taken.items()}
        assert queued(broker) == before_kill

        # Straight after the last acknowledged write, as a crash would come.
        FAULTS[fault](topology)
        killed_at = time.monotonic()
        errors: list[BaseException] = []
        recovered = None
        user_id = before_kill
        while time.monotonic() - killed_at < window_limit:
            try:
                recovered = enqueue(user_id)
                break
            except Exception as exc:  # any other type fails the assertion below
                errors.append(exc)
            user_id += 1
            time.sleep(pace)
        window = time.monotonic() - killed_at

        assert recovered is not None, f"no enqueue succeeded within {window_limit}s of the kill"
        assert errors, "the kill went unnoticed: the test did not exercise a failover"
        not_lock_store = [e for e in errors if not isinstance(e, LockStoreError)]
        assert not not_lock_store, f"failed enqueues that were not LockStoreError: {not_lock_store[:3]}"
        assert max(durations) < call_limit, f"an enqueue took {max(durations):.2f}s"
        # A failed enqueue publishes nothing.
        assert queued(broker) == before_kill + 1

        # Sentinel promoted the replica, and the lock just taken lives there.
        assert topology.master_port() == topology.replica.port
        new_primary = topology.replica.client(LOCK_DB)
        assert new_primary.info("replication")["role"] == "master"
        recovered_key = report.lock_key((user_id,), {}, {})
        assert new_primary.get(recovered_key) == recovered.id.encode()
        with pytest.raises(DuplicateTaskError) as refused:
            report.apply_async((user_id,), unique=60)
        assert refused.value.task_id == recovered.id

        # Locks taken before the kill that never reached the replica are lost:
        # their calls would be accepted again, once each.
        lost = [task_id for task_id, key in keys.items() if new_primary.get(key) != task_id.encode()]
        for task_id in list(taken)[:5]:
            if task_id in lost:
                continue
            with pytest.raises(DuplicateTaskError) as held:
                report.apply_async((int(taken[task_id]),), unique=60)
            assert held.value.task_id == task_id
        new_primary.close()
        causes = Counter(type(e.__cause__).__name__ for e in errors)
        print(
            f"\nsentinel failover, primary {fault}ed ({topology.binary}, 3 sentinels, down-after 1000 ms, "
            f"socket timeout {SOCKET_TIMEOUT}s, one attempt every {pace}s):"
            f"\n  failover window {window:.2f}s, {len(errors)} enqueues failed with LockStoreError,"
            f" slowest enqueue {max(durations) * 1000:.0f} ms"
            f"\n  causes: {', '.join(f'{n} {name}' for name, n in causes.most_common())}"
            f"\n  locks lost to asynchronous replication: {len(lost)} of {before_kill}"
        )
    assert topology.leftover() == []


def test_sentinel_url_with_acl_user(redis_server: RedisServer, broker: redis.Redis) -> None:
    """The user name and password of a sentinel:// URL (user:pw@) log in to the data nodes."""
    with SentinelTopology(sentinels=1) as topology:
        for node in (topology.primary, topology.replica):
            admin = node.client()
            admin.execute_command("ACL", "SETUSER", "locker", "on", ">s3cret", "~*", "+@all")
            # The default user keeps its commands (Sentinel and replication
            # use it) but loses every key: only "locker" can take a lock.
            admin.execute_command("ACL", "SETUSER", "default", "resetkeys")
            admin.close()
        url = ";".join(
            f"sentinel://locker:s3cret@127.0.0.1:{sentinel.port}/{LOCK_DB}" for sentinel in topology.sentinels
        )
        app = make_app(
            redis_server,
            url,
            unique_redis_transport_options={"master_name": MASTER},
            unique_redis_socket_timeout=SOCKET_TIMEOUT,
        )
        report = app.tasks["tests.sentinel.report"]
        first = report.apply_async((1,), unique=60)
        with pytest.raises(DuplicateTaskError) as refused:
            report.apply_async((1,), unique=60)
        as_locker = redis.Redis(
            host="127.0.0.1", port=topology.primary.port, db=LOCK_DB, username="locker", password="s3cret"
        )
        assert as_locker.get(refused.value.key) == first.id.encode()
        as_locker.close()
        assert queued(broker) == 1
    assert topology.leftover() == []


def _sentinel_failover(topology: SentinelTopology) -> None:
    """Ask a Sentinel for a failover: the old primary stays up and becomes a replica."""
    client = topology.sentinels[0].client()
    client.execute_command("SENTINEL", "FAILOVER", MASTER)
    client.close()
    wait_until(
        lambda: topology.primary.client().info("replication")["role"] == "slave",
        30,
        "the old primary to be demoted",
    )


RELEASE_FAULTS = {
    # A crash: the worker's pooled connection is closed under it.
    "kill": SentinelTopology.kill_primary,
    # A switchover: the pooled connection stays open, to a server that is
    # now a replica and answers a write with READONLY.
    "failover": _sentinel_failover,
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", sorted(RELEASE_FAULTS))
def test_release_after_failover_reaches_the_new_primary(redis_server: RedisServer, fault: str) -> None:
    """A lock taken on the old primary is released on the new one when its task succeeds after a failover."""
    scratch = redis_server.client(3)
    with SentinelTopology(sentinels=3) as topology:
        app = make_app(
            redis_server,
            topology.sentinel_url(LOCK_DB),
            unique_redis_transport_options={"master_name": MASTER},
            unique_redis_socket_timeout=SOCKET_TIMEOUT,
        )

        @app.task(base=UniqueTask, name="tests.sentinel.until_go", shared=False)
        def until_go(token: str) -> str:
            # Runs until the test says go: across the whole failover.
            scratch.set(f"started:{token}", 1)
            wait_until(lambda: scratch.get(f"go:{token}"), 60, "the test to say go")
            return token

        result = until_go.apply_async(("t1",), unique=120)
        key = until_go.lock_key(("t1",), {}, {})
        old_primary = topology.primary.client(LOCK_DB)
        assert old_primary.get(key) == result.id.encode()
        new_primary = topology.replica.client(LOCK_DB)
        # Replicated before the failover, so the new primary has the lock.
        wait_until(lambda: new_primary.get(key) == result.id.encode(), 5, "the lock on the replica")
        old_primary.close()

        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
            wait_until(lambda: scratch.get("started:t1"), 10, "the task to start")
            RELEASE_FAULTS[fault](topology)
            # Every Sentinel, not just one: a client asks them in turn, and a
            # lagging one still names the old primary for a moment.
            wait_until(
                lambda: set(topology.master_ports()) == {topology.replica.port}, 30, "the failover"
            )
            assert new_primary.info("replication")["role"] == "master"
            assert new_primary.get(key) == result.id.encode()
            scratch.set("go:t1", 1)
            assert result.get(timeout=20) == "t1"
            # The worker's pooled connection went to the old primary: the
            # release must have reconnected through the Sentinels.
            wait_until(lambda: not new_primary.exists(key), 10, "the release on the new primary")
            scratch.delete("go:t1")  # the second run waits for its own go
            again = until_go.apply_async(("t1",), unique=120)
            assert new_primary.get(key) == again.id.encode()
            scratch.set("go:t1", 1)
            assert again.get(timeout=20) == "t1"
        new_primary.close()
    assert topology.leftover() == []
