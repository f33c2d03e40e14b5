"""The Celery app of the reliability tests' ``celery worker`` subprocesses.

Configured from the environment (see ``tests/reliability_support.worker_env``),
because the Redis servers' ports are only known once the tests start them.
"""

from __future__ import annotations

import os

from tests.reliability_support import ENV_ACKS_LATE, ENV_BROKER, ENV_LOCKS, ENV_SCRATCH, make_app

app = make_app(
    os.environ[ENV_BROKER],
    os.environ[ENV_LOCKS],
    scratch_url=os.environ[ENV_SCRATCH],
    acks_late=os.environ.get(ENV_ACKS_LATE) == "1",
)
