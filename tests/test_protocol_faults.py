"""Faults the lock protocol must ride out: a keeper on a Cluster, a store that blinks, a lost reply, gevent.

Each test provokes its fault with real parts: a 3-primary Redis Cluster
(``tests/cluster_support.py``), a lock-store ``redis-server`` stopped and
started again under a running task, a proxy that loses one reply
(``tests/reply_dropper.py``), and a producer patched by gevent in a
subprocess of its own. Workers are real prefork workers
(``tests/lifecycle_support.py``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import states
from redis.crc import key_slot

from celery_unique import DuplicateTaskError, UniqueTask
from celery_unique.config import lock_store
from celery_unique.connection import MAX_CONNECTIONS
from celery_unique.lock import LockStore, running_marker_key
from celery_unique.testing import RedisServer
from tests.cluster_support import SLOTS, LocalCluster
from tests.conftest import BROKER_DB, LOCK_DB, RESULT_DB, wait_until
from tests.lifecycle_support import REDELIVER, SCRATCH_DB, Lifecycle, events, lock_of, stored, wait_event
from tests.reply_dropper import ReplyDropper, app_behind

ROOT = Path(__file__).resolve().parent.parent
#: unique_running_ttl of the marked runs below (REDELIVER's): renewed every third of it.
RUNNING_TTL = REDELIVER["unique_running_ttl"]


def sha(script: str) -> bytes:
    """The SHA1 digest Redis names ``script`` by, as EVALSHA sends it."""
    return hashlib.sha1(script.encode()).hexdigest().encode()


def load_scripts(client: redis.Redis) -> None:
    """Load every lock-store script, so that the first EVALSHA of each runs (no NOSCRIPT reply)."""
    for name in dir(LockStore):
        if name.endswith("_SCRIPT"):
            client.script_load(getattr(LockStore, name))


def running(client: Any, marker: str) -> bytes | None:
    """The value of ``marker`` if it says a copy runs (``r|...``), else None."""
    value: bytes | None = client.get(marker)
    return value if value is not None and value.startswith(b"r|") else None


# -- the keeper -------------------------------------------------------------------------------------


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    """A fresh 3-primary Redis Cluster for the test."""
    with LocalCluster() as running:
        yield running


@pytest.mark.slow
def test_keeper_renews_a_marker_on_a_cluster_while_a_revoked_survivor_runs(
    redis_server: RedisServer, cluster: LocalCluster, tmp_path: Path
) -> None:
    """On a Cluster lock store, a marked run's marker outlives many TTLs, so no call takes its lock over."""
    life = Lifecycle(
        broker=redis_server.url(BROKER_DB),
        backend=redis_server.url(RESULT_DB),
        locks=cluster.url,
        scratch=redis_server.url(SCRATCH_DB),
        conf={**REDELIVER, "unique_redis_cluster": True},
    )
    app, scratch = life.app(), life.scratch_client()
    survivor = app.tasks["life.survivor"]
    store = redis.RedisCluster(host=cluster.nodes[0].host, port=cluster.nodes[0].port)
    log = tmp_path / "worker.log"
    with life.worker(log):
        result = survivor.apply_async(("cluster",), {"after": 0}, unique=60)
        key = lock_of(app, "life.survivor", ("cluster",), {"after": 0})
        marker = running_marker_key(key, result.id)
        wait_event(scratch, "cluster", "start")
        # Late acknowledgement on Redis: marked half a second after its receipt.
        wait_until(lambda: running(store, marker), what="the run marked")
        app.control.revoke(result.id, terminate=True, signal="SIGUSR1")
        wait_event(scratch, "cluster", "signalled")
        wait_until(lambda: stored(app, result.id) == states.REVOKED, what="REVOKED stored")
        # Four TTLs of the marker: it lives only if the keeper renews it.
        for _ in range(int(4 * RUNNING_TTL / 0.5)):
            value: Any = store.get(marker)
            assert value is not None, "the running task's marker expired"
            assert value.startswith(b"r|"), value
            with pytest.raises(DuplicateTaskError) as refused:
                survivor.apply_async(("cluster",), {"after": 0}, unique=60)
            assert refused.value.task_id == result.id
            time.sleep(0.5)
        scratch.set("go:cluster", 1)
        wait_until(lambda: stored(app, result.id) == states.SUCCESS, what="success after surviving")
        wait_until(lambda: store.get(key) is None, what="the lock released at the end")
        assert events(scratch, "cluster") == ["start", "signalled", "end"]
    text = log.read_text()
    assert "could not renew" not in text
    assert "Traceback" not in text
    store.close()


@contextmanager
def lock_store_of(kind: str) -> Iterator[tuple[str, dict[str, Any], Any, Callable[[str], RedisServer]]]:
    """A lock store of its own: its URL, the settings it needs, a client, and the server holding a key."""
    if kind == "server":
        with RedisServer() as server:
            client: Any = server.client()
            yield server.url(0), {}, client, lambda key: server
            client.close()
        return
    with LocalCluster() as cluster:
        seed = cluster.nodes[0]
        client = redis.RedisCluster(host=seed.host, port=seed.port)
        share = SLOTS // len(cluster.nodes)  # LocalCluster's even split
        yield cluster.url, {"unique_redis_cluster": True}, client, (
            lambda key: cluster.nodes[min(key_slot(key.encode()) // share, len(cluster.nodes) - 1)]
        )
        client.close()


def read(client: Any, key: str) -> bytes | None:
    """``GET key``, or None while the store cannot answer (a node coming back)."""
    try:
        value: bytes | None = client.get(key)
    except redis.RedisError:
        return None
    return value


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["server", "cluster"])
def test_keeper_logs_a_store_that_blinks_and_puts_the_marker_back(
    redis_server: RedisServer, tmp_path: Path, kind: str
) -> None:
    """A lock store stopped under a marked run is logged by the keeper, which puts the marker back after."""
    with lock_store_of(kind) as (url, settings, client, server_of):
        life = Lifecycle(
            broker=redis_server.url(BROKER_DB),
            backend=redis_server.url(RESULT_DB),
            locks=url,
            scratch=redis_server.url(SCRATCH_DB),
            conf={**REDELIVER, **settings},
        )
        app, scratch = life.app(), life.scratch_client()
        log = tmp_path / "worker.log"
        with life.worker(log):
            result = app.tasks["life.survivor"].apply_async(("blink",), {"after": 0}, unique=60)
            key = lock_of(app, "life.survivor", ("blink",), {"after": 0})
            marker = running_marker_key(key, result.id)
            wait_event(scratch, "blink", "start")
            value = wait_until(lambda: running(client, marker), what="the run marked")
            server = server_of(marker)
            server.stop()
            wait_until(lambda: "could not renew markers" in log.read_text(), what="the keeper's warning")
            server.start()  # empty: no persistence (a cluster node keeps its slots in nodes.conf)
            wait_until(lambda: read(client, marker) == value, timeout=20, what="the marker put back")
            # The task still runs: it waits for the go below.
            assert events(scratch, "blink") == ["start"]
            scratch.set("go:blink", 1)
            assert result.get(timeout=20) == "blink"
        assert "Traceback" not in log.read_text()


# -- a lost reply -----------------------------------------------------------------------------------


@pytest.mark.parametrize("task_id", [None, "chosen-8"], ids=["generated id", "chosen id"])
def test_take_over_whose_reply_was_lost_holds_the_lock_and_publishes_once(
    redis_server: RedisServer, broker: redis.Redis, task_id: str | None
) -> None:
    """A take-over of a finished holder whose reply was lost is resent, holds the lock and publishes once."""
    with ReplyDropper(redis_server.port) as dropper:
        app = app_behind(dropper, redis_server.url, "take-over")

        @app.task(base=UniqueTask, name="tests.take_over.report", shared=False)
        def report(user_id: int) -> int:
            return user_id

        key = report.lock_key((1,), {}, {})
        # A holder that finished without releasing its lock (its worker did
        # not import celery_unique): the lock, and its SUCCESS.
        assert lock_store(app).acquire(key, "finished-holder", 60_000) is None
        app.backend.mark_as_done("finished-holder", 1)
        load_scripts(redis_server.client(LOCK_DB))
        dropper.arm(b"EVALSHA", sha(LockStore.TAKE_OVER_SCRIPT))

        result: Any = report.apply_async((1,), task_id=task_id, unique=60)

        assert dropper.dropped.is_set(), "no reply was dropped: the test did not lose the take-over's reply"
        assert redis_server.client(LOCK_DB).get(key) == result.id.encode()
        assert broker.llen("celery") == 1
        assert app.backend.get_task_meta(result.id, cache=False)["status"] == states.PENDING


# -- gevent -----------------------------------------------------------------------------------------


def test_gevent_producer_shares_a_few_lock_store_connections(
    redis_server: RedisServer, broker: redis.Redis
) -> None:
    """300 greenlets of a gevent-patched producer enqueue 300 calls over about MAX_CONNECTIONS connections."""
    calls = 300
    with RedisServer() as lock_server:
        client = lock_server.client()
        before = int(client.info("stats")["total_connections_received"])
        done = subprocess.run(
            [sys.executable, "-m", "tests.gevent_producer", redis_server.url(BROKER_DB), lock_server.url(0),
             str(calls)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
            timeout=60, check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[-1] == str(calls)
        opened = int(client.info("stats")["total_connections_received"]) - before
        assert client.dbsize() == calls
        assert broker.llen("celery") == calls
        # The enqueue path's own connections, never more out at once than
        # MAX_CONNECTIONS, and room for a pooled one or two.
        assert opened <= MAX_CONNECTIONS + 5, f"{opened} lock-store connections for {calls} greenlets"
        print(f"\ngevent producer: {calls} unique calls from {calls} greenlets over {opened} connections")
        client.close()
