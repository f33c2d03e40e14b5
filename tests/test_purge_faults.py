"""Purge where messages or queues are not what it usually meets: task protocol 1, a queue not declared yet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import amqp
import kombu
import redis
from celery import Celery

from celery_unique import UniqueTask
from celery_unique.testing import RedisServer
from tests.conftest import BROKER_DB, LOCK_DB, RESULT_DB
from tests.rabbitmq import make_app, message_count, worker_env
from tests.test_admin import celery_cli

ROOT = Path(__file__).resolve().parent.parent


def test_purge_releases_the_locks_of_task_protocol_1_messages(
    redis_server: RedisServer, broker: redis.Redis, locks: redis.Redis
) -> None:
    """`celery unique purge` releases the locks of task_protocol = 1 messages, whose id is in the body."""
    app = Celery("protocol-1", broker=redis_server.url(BROKER_DB), set_as_current=False)
    app.conf.update(
        unique_redis_url=redis_server.url(LOCK_DB),
        task_protocol=1,
        task_default_queue="celery",
        broker_connection_retry_on_startup=False,
    )

    @app.task(base=UniqueTask, name="tests.send_report", shared=False)
    def send_report(user_id: int) -> str:
        return f"report {user_id}"

    keys = [send_report.lock_key((user,), {}, {}) for user in (1, 2)]
    for user in (1, 2):
        send_report.apply_async((user,), unique=60)
    for raw in broker.lrange("celery", 0, -1):
        headers = json.loads(raw)["headers"]
        assert "id" not in headers, "not a protocol 1 message"  # the id is in the body
        assert headers["celery_unique_lock"] in keys

    purged = celery_cli(redis_server, "purge", "-f", "-Q", "celery", settings={"task_protocol": 1})

    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.splitlines()[-1] == "Purged 2 messages from 1 queue; released 2 locks."
    assert broker.llen("celery") == 0
    assert not any(locks.exists(key) for key in keys)
    # What is left is the "purged" markers, one per message, dropping any other copy.
    left: list[Any] = [locks.get(key) for key in locks.scan_iter()]
    assert sorted(value[:2] for value in left) == [b"x|", b"x|"]
    for user in (1, 2):
        send_report.apply_async((user,), unique=60)  # accepted again


def declared(url: str, queue: str) -> bool:
    """Whether the broker at ``url`` knows ``queue``."""
    with kombu.Connection(url, connect_timeout=5) as connection:
        try:
            connection.default_channel.queue_declare(queue, passive=True)
        except amqp.exceptions.NotFound:
            return False
        return True


def test_purge_goes_past_a_queue_rabbitmq_does_not_know(
    rabbitmq_url: str, redis_server: RedisServer, locks: redis.Redis
) -> None:
    """On RabbitMQ, a task queue not declared yet is purged as empty, and the queues after it are purged."""
    # Purged in name order: the queue RabbitMQ does not know comes first.
    names = ("a-undeclared", "b-declared")
    settings = {
        "task_queues": {name: {"exchange": name, "routing_key": name} for name in names},
        "task_default_queue": "b-declared",
    }
    result_url, lock_url = redis_server.url(RESULT_DB), redis_server.url(LOCK_DB)
    app = make_app(rabbitmq_url, result_url, lock_url, **settings)
    add = app.tasks["rmq.add"]
    keys = [add.lock_key((x, x), {}, {}) for x in (1, 2)]
    for x in (1, 2):
        add.apply_async((x, x), unique=60)
    assert message_count(rabbitmq_url, "b-declared") == 2
    assert not declared(rabbitmq_url, "a-undeclared")

    purged = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.rabbitmq_app", "unique", "purge", "-f"],
        env=worker_env(rabbitmq_url, result_url, lock_url, **settings),
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )

    assert purged.returncode == 0, purged.stderr
    assert "Traceback" not in purged.stderr
    assert purged.stdout.splitlines()[-1] == "Purged 2 messages from 2 queues; released 2 locks."
    assert message_count(rabbitmq_url, "b-declared") == 0
    assert not any(locks.exists(key) for key in keys)
    assert not declared(rabbitmq_url, "a-undeclared")  # purge declares nothing

