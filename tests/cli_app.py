"""A Celery app for the CLI tests, configured from the environment.

``CLI_BROKER_URL`` and ``CLI_LOCK_URL`` say where the broker and the locks
are; ``CLI_SETTINGS``, a JSON object, adds or overrides settings.
"""

from __future__ import annotations

import json
import os

from celery import Celery

from celery_unique import UniqueTask

app = Celery("cli_app", broker=os.environ.get("CLI_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.unique_redis_url = os.environ.get("CLI_LOCK_URL", "redis://127.0.0.1:6379/2")
app.conf.update(json.loads(os.environ.get("CLI_SETTINGS", "{}")))


@app.task(base=UniqueTask, name="tests.send_report")
def send_report(user_id: int, period: str = "daily") -> str:
    return f"report {user_id} {period}"


@app.task(base=UniqueTask, name="tests.slow")
def slow(user_id: int, seconds: float = 1.0) -> int:
    return user_id


# Shares its last part with tests.send_report: `--task send_report` is ambiguous.
@app.task(base=UniqueTask, name="reports.daily.send_report")
def daily_report(user_id: int) -> str:
    return f"daily {user_id}"
