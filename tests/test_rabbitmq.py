"""RabbitMQ as the broker: unique tasks through a real node and a prefork worker, and the node itself.

Locks and results stay on the suite's Redis; only the messages go through
RabbitMQ. The helpers are in ``tests/rabbitmq.py``.
"""

from __future__ import annotations

import gc
import subprocess
from collections.abc import Iterator
from pathlib import Path

import kombu
import pytest
import redis

from celery_unique import DuplicateTaskError
from celery_unique.testing import RedisServer
from tests.conftest import LOCK_DB, RESULT_DB, wait_until
from tests.rabbitmq import (
    RabbitMQServer,
    celery_worker_process,
    make_app,
    message_count,
    worker_env,
)


@pytest.fixture(autouse=True)
def _collect_results() -> Iterator[None]:
    """Collect this test's AsyncResults while its Redis is still up (see test_reliability.py)."""
    yield
    gc.collect()


def test_unique_task_through_rabbitmq(
    rabbitmq_url: str, redis_server: RedisServer, locks: redis.Redis, tmp_path: Path
) -> None:
    """Through RabbitMQ: a queued call refuses duplicates; once run and released, it is accepted again."""
    result_url, lock_url = redis_server.url(RESULT_DB), redis_server.url(LOCK_DB)
    app = make_app(rabbitmq_url, result_url, lock_url)
    add = app.tasks["rmq.add"]
    key = add.lock_key((1, 2), {}, {})

    # Given a unique call queued in RabbitMQ with no worker yet,
    first = add.apply_async((1, 2), unique=60)
    assert locks.get(key) == first.id.encode()
    assert message_count(rabbitmq_url, "celery") == 1
    # when the same call comes again, it is refused and publishes nothing.
    with pytest.raises(DuplicateTaskError) as info:
        add.apply_async((1, 2), unique=60)
    assert info.value.task_id == first.id
    assert message_count(rabbitmq_url, "celery") == 1

    # Then a prefork worker consuming from RabbitMQ runs it, stores the result
    # in Redis and releases the lock, after which the call is accepted again.
    with celery_worker_process(worker_env(rabbitmq_url, result_url, lock_url), tmp_path / "worker.log"):
        assert first.get(timeout=60) == 3
        assert redis_server.client(RESULT_DB).exists(f"celery-task-meta-{first.id}")
        wait_until(lambda: not locks.exists(key), what="lock released after success")
        again = add.apply_async((1, 2), unique=60)
        assert again.id != first.id
        assert again.get(timeout=60) == 3
        wait_until(lambda: not locks.exists(key), what="second lock released")
    assert message_count(rabbitmq_url, "celery") == 0


def test_each_test_gets_a_vhost_of_its_own(rabbitmq_server: RabbitMQServer, rabbitmq_url: str) -> None:
    """A message published on one test's vhost is not seen on the next test's vhost."""
    with kombu.Connection(rabbitmq_url) as connection:
        queue = kombu.Queue("celery", routing_key="celery")
        connection.Producer().publish({"n": 1}, routing_key="celery", declare=[queue])
    assert message_count(rabbitmq_url, "celery") == 1
    other = rabbitmq_server.url(rabbitmq_server.new_vhost())
    assert other != rabbitmq_url
    assert message_count(other, "celery") == 0


def _processes_of(session_ids: list[int], directory: Path) -> str:
    """``pgrep`` lines of every process in these sessions or naming this directory."""
    queries = [["-s", str(sid)] for sid in session_ids] + [["-f", str(directory)]]
    found = [subprocess.run(["pgrep", "-a", *q], capture_output=True, text=True).stdout for q in queries]
    return "\n".join(line for text in found for line in text.splitlines() if line.strip())


@pytest.mark.usefixtures("rabbitmq_server")  # skips or fails like every RabbitMQ test
def test_a_node_stops_with_its_epmd_and_children() -> None:
    """A node of its own runs its own epmd, makes vhosts past its boot pool, and leaves no process behind."""
    server = RabbitMQServer(vhosts=1)
    try:
        server.start()
        assert server.process is not None
        assert server.epmd is not None
        sessions = [server.process.pid, server.epmd.pid]
        running = _processes_of(sessions, server.directory)
        assert "beam" in running, running
        assert f"epmd -port {server.epmd_port}" in running, running
        # The second vhost is past the boot pool: imported with rabbitmqctl.
        server.new_vhost()
        imported = server.url(server.new_vhost())
        assert message_count(imported, "celery") == 0
    finally:
        server.close()
    assert _processes_of(sessions, server.directory) == ""
    assert not server.directory.exists()
