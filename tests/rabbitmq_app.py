"""The Celery app of the RabbitMQ tests' ``celery worker`` subprocesses.

Configured from the environment (see ``tests/rabbitmq.worker_env``), because
the servers' ports are only known once the tests start them.
"""

from __future__ import annotations

import json
import os

from tests.rabbitmq import ENV_BROKER, ENV_LOCKS, ENV_RESULTS, ENV_SETTINGS, make_app

app = make_app(
    os.environ[ENV_BROKER],
    os.environ[ENV_RESULTS],
    os.environ[ENV_LOCKS],
    **json.loads(os.environ.get(ENV_SETTINGS) or "{}"),
)
