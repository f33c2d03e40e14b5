"""The lock store on a real 3-primary Redis Cluster, with real workers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery, group
from celery.contrib.testing.worker import start_worker

from celery_unique import ConfigurationError, DuplicateTaskError, UniqueLocks, UniqueTask, apply_many, fan_out
from celery_unique.config import lock_store
from celery_unique.keys import waiting_key
from celery_unique.lock import Attempt
from celery_unique.testing import RedisServer
from tests.cluster_support import LocalCluster
from tests.conftest import wait_until
from tests.test_bulk import script_calls
from tests.test_protocol_faults import load_scripts


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """A Redis Cluster of three primaries on loopback ports, stopped after the module."""
    with LocalCluster() as running:
        yield running


@pytest.fixture
def cluster_app(redis_server: RedisServer, cluster: LocalCluster) -> Celery:
    """An app whose broker is the suite's Redis and whose locks live on the cluster."""
    for node in cluster.nodes:
        node.client().flushall()
    app = Celery("cluster", set_as_current=False)
    app.conf.update(
        broker_url=redis_server.url(0),
        result_backend=redis_server.url(1),
        broker_connection_retry_on_startup=False,
        unique_redis_url=cluster.url,
        unique_redis_cluster=True,
    )

    @app.task(base=UniqueTask, name="tests.cluster_report", shared=False)
    def cluster_report(user_id: int) -> int:
        return user_id

    return app


def test_locks_spread_over_every_primary(cluster_app: Celery, cluster: LocalCluster) -> None:
    """Locks of many calls land on all three primaries, and each duplicate is refused."""
    task: Any = cluster_app.tasks["tests.cluster_report"]
    results = [task.apply_async((i,), unique=60) for i in range(60)]
    for i in (0, 17, 59):
        with pytest.raises(DuplicateTaskError) as info:
            task.apply_async((i,), unique=60)
        assert info.value.task_id == results[i].id
    per_node = [node.client().dbsize() for node in cluster.nodes]
    assert sum(per_node) == 60
    assert all(count > 0 for count in per_node), per_node


def test_admin_scans_every_primary(cluster_app: Celery, cluster: LocalCluster) -> None:
    """UniqueLocks lists and clears locks on all primaries."""
    task: Any = cluster_app.tasks["tests.cluster_report"]
    ids = {task.apply_async((i,), unique=60).id for i in range(30)}
    admin = UniqueLocks(cluster_app)
    assert {lock.task_id for lock in admin.list()} == ids
    assert admin.clear(task_name="tests.cluster_report") == 30
    assert sum(node.client().dbsize() for node in cluster.nodes) == 0


def test_worker_releases_on_the_cluster(cluster_app: Celery, cluster: LocalCluster) -> None:
    """A real worker's success releases cluster locks, owner-checked; the call is accepted again."""
    task: Any = cluster_app.tasks["tests.cluster_report"]
    with start_worker(cluster_app, pool="solo", perform_ping_check=False):
        results = [task.apply_async((i,), unique=60) for i in range(10)]
        assert [r.get(timeout=10) for r in results] == list(range(10))
        # Locks only: each run leaves its running marker ("{<lock key>}:run:<id>",
        # in the lock's slot) for a while, to keep a redelivered copy from running.
        def held() -> int:
            return sum(
                1 for node in cluster.nodes for key in node.client().scan_iter() if not key.startswith(b"{")
            )

        wait_until(lambda: held() == 0, what="all cluster locks released")
        assert task.apply_async((3,), unique=60).get(timeout=10) == 3


def test_describe_reads_markers_on_the_cluster(cluster_app: Celery, cluster: LocalCluster) -> None:
    """describe() reads holders, markers and states on every primary, one script call per hash slot."""
    opened = threading.Event()

    # Late acknowledgement with a short visibility timeout: the run is marked
    # half a second after its message came.
    cluster_app.conf.broker_transport_options = {"visibility_timeout": 2}

    @cluster_app.task(base=UniqueTask, name="tests.cluster_gated", shared=False, acks_late=True)
    def gated(user_id: int) -> int:
        opened.wait(30)
        return user_id

    task: Any = cluster_app.tasks["tests.cluster_report"]
    queued = {task.apply_async((i,), unique=60, queue="nobody").id for i in range(30)}
    admin = UniqueLocks(cluster_app)
    # Only the default queue: Celery 5.3's worker also consumes from a queue
    # the app made for a call's queue= ("nobody"), and would run them.
    with start_worker(cluster_app, pool="solo", perform_ping_check=False, queues=["celery"]):
        try:
            running = gated.apply_async((1,), unique=60)
            wait_until(lambda: any(s.running for s in admin.describe()), what="the gated task to run")
            statuses = {s.task_id: s for s in admin.describe()}
        finally:
            opened.set()
    assert set(statuses) == {*queued, running.id}
    assert {(s.state, s.running) for i, s in statuses.items() if i in queued} == {("PENDING", False)}
    assert statuses[running.id].running is True
    assert all(s.age is not None for s in statuses.values())


def test_a_batch_takes_its_locks_in_one_script_call_per_slot(
    cluster_app: Celery, cluster: LocalCluster
) -> None:
    """apply_many and a group in fan_out() on a Cluster: one script call per hash slot, every lock taken."""
    task: Any = cluster_app.tasks["tests.cluster_report"]
    nodes = [node.client() for node in cluster.nodes]
    for node in nodes:
        load_scripts(node)
    slot_of = redis.RedisCluster.from_url(cluster.url).keyslot
    held = task.apply_async((3,), unique=60)
    before = sum(script_calls(node) for node in nodes)
    outcomes = apply_many([task.s(i).set(unique=60) for i in range(12)])
    with fan_out():
        fanned = group(task.s(i).set(unique=60) for i in range(12, 24)).apply_async()
    keys = [task.lock_key((i,), {}, {}) for i in range(24)]
    slots = len({slot_of(key) for key in keys[:12]}) + len({slot_of(key) for key in keys[12:]})
    assert sum(script_calls(node) for node in nodes) - before == slots
    assert slots > 2  # the keys spread: a single call would not do
    assert isinstance(outcomes[3], DuplicateTaskError)
    assert outcomes[3].task_id == held.id
    ids = [o.id for o in outcomes[:3] + outcomes[4:]] + [r.id for r in fanned.results]
    holders = UniqueLocks(cluster_app)
    assert {lock.task_id for lock in holders.list()} == {*ids, held.id}


def test_a_limit_needs_a_hash_tag_on_the_cluster(cluster_app: Celery) -> None:
    """unique_limit above 1 with an untagged prefix is refused on a Cluster, naming task and setting."""
    task: Any = cluster_app.tasks["tests.cluster_report"]
    with pytest.raises(ConfigurationError, match=r"cluster_report: unique_limit=2 .* unique_key_prefix"):
        task.apply_async((1,), unique=60, unique_limit=2)
    # unique_limit=1 is the plain lock, as ever.
    task.apply_async((1,), unique=60, unique_limit=1)


def test_a_limit_under_a_tagged_prefix_runs_on_the_cluster(
    cluster_app: Celery, cluster: LocalCluster
) -> None:
    """With a hash-tagged prefix, the slots share a hash slot: N calls run, the one too many is refused."""
    cluster_app.conf.unique_key_prefix = "{locks}"
    task: Any = cluster_app.tasks["tests.cluster_report"]
    with start_worker(cluster_app, pool="solo", perform_ping_check=False):
        results = [task.apply_async((5,), unique=60, unique_limit=3, countdown=1) for _ in range(3)]
        with pytest.raises(DuplicateTaskError) as info:
            task.apply_async((5,), unique=60, unique_limit=3)
        assert info.value.task_id == results[0].id
        key = task.lock_key((5,), {}, {})
        client = redis.RedisCluster.from_url(cluster.url)
        assert [client.get(f"{key}~{i}" if i > 1 else key) for i in (1, 2, 3)] == [
            r.id.encode() for r in results
        ]
        assert [r.get(timeout=10) for r in results] == [5, 5, 5]
        wait_until(lambda: UniqueLocks(cluster_app).count() == 0, what="every slot released")
        assert task.apply_async((5,), unique=60, unique_limit=3).get(timeout=10) == 5


def test_a_waiting_call_runs_its_scripts_on_one_slot_of_the_cluster(cluster_app: Celery) -> None:
    """queue_one on the cluster, an untagged prefix: the waiting key shares its lock's slot in each script."""
    task: Any = cluster_app.tasks["tests.cluster_report"]
    holder = task.apply_async((1,), unique=60, countdown=60)  # sent without "replace": it is never replaced
    waits = {"unique": 60, "countdown": 60, "on_duplicate": "replace", "unique_while_running": "queue_one"}
    first, latest = task.apply_async((1,), **waits), task.apply_async((1,), **waits)
    key = task.lock_key((1,), {}, {})
    store = lock_store(cluster_app)
    assert first.state == "REVOKED"
    assert store.client.get(waiting_key(key)) == latest.id.encode()
    behind = Attempt(latest.id, nonce=str(store.marker(key, latest.id)).split("|")[3])
    assert store.begin(key, behind, "worker/1", "elsewhere:1", 30_000)[0] == "behind"
    assert UniqueLocks(cluster_app).release(key)
    assert store.begin(key, behind, "worker/1", "elsewhere:1", 30_000)[0] == "run"
    assert store.holder(key) == latest.id
    assert store.client.get(waiting_key(key)) is None
    assert holder.id != latest.id
