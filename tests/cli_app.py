"""A Celery app for the CLI tests, configured from the environment."""

from __future__ import annotations

import os

from celery import Celery

from celery_unique import UniqueTask

app = Celery("cli_app", broker=os.environ.get("CLI_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.unique_redis_url = os.environ.get("CLI_LOCK_URL", "redis://127.0.0.1:6379/2")


@app.task(base=UniqueTask, name="tests.send_report")
def send_report(user_id: int, period: str = "daily") -> str:
    return f"report {user_id} {period}"
