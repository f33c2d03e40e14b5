"""Another service's worker: plain Celery, never importing celery_unique.

It consumes tasks that a celery_unique producer sent with ``send_unique``, so
it never releases their locks. Configured from the lifecycle tests' variables.
"""

from __future__ import annotations

import os

import redis
from celery import Celery

app = Celery(
    "foreign",
    broker=os.environ["CELERY_UNIQUE_LIFE_BROKER"],
    backend=os.environ.get("CELERY_UNIQUE_LIFE_BACKEND") or None,
    set_as_current=False,
)
app.conf.update(broker_connection_retry_on_startup=False, task_default_queue="lifecycle")


@app.task(name="foreign.charge", bind=True)
def charge(self: object, account: int) -> int:
    scratch = redis.Redis.from_url(os.environ["CELERY_UNIQUE_LIFE_SCRATCH"])
    scratch.rpush(f"charged:{account}", "1")
    return account
