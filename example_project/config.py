"""Celery settings of the example project.

One Redis server holds everything, in separate databases, so the broker's
queues, the task results and the uniqueness locks never share a keyspace:
flushing results, for instance, cannot drop a lock. The server comes from
``$REDIS_URL`` (default ``redis://127.0.0.1:6379``); any database number in it
is replaced by the ones below.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from celery.schedules import crontab

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"
BROKER_DB, RESULT_DB, LOCK_DB = 0, 1, 2


def redis_db_url(server_url: str, db: int) -> str:
    """Return ``server_url`` pointing at database ``db``."""
    parts = urlsplit(server_url)
    if parts.scheme == "unix":
        # A socket URL names its database in the query, its path is the socket.
        query = dict(parse_qsl(parts.query))
        query["db"] = str(db)
        return urlunsplit(parts._replace(query=urlencode(query)))
    return urlunsplit(parts._replace(path=f"/{db}"))


def redis_settings(server_url: str) -> dict[str, str]:
    """Return the broker, result and lock-store URLs for one Redis server."""
    return {
        "broker_url": redis_db_url(server_url, BROKER_DB),
        "result_backend": redis_db_url(server_url, RESULT_DB),
        "unique_redis_url": redis_db_url(server_url, LOCK_DB),
    }


_redis = redis_settings(os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL)
broker_url = _redis["broker_url"]
result_backend = _redis["result_backend"]
unique_redis_url = _redis["unique_redis_url"]
unique_key_prefix = "example:unique"

# The worker and beat import the tasks from here; beat needs them registered
# so that it enqueues through UniqueTask.apply_async (and so honours "unique").
imports = ("example_project.tasks",)

broker_connection_retry_on_startup = True
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_expires = 3600
timezone = "UTC"

task_default_queue = "default"
task_routes = {
    "example_project.tasks.send_report": {"queue": "reports"},
    "example_project.tasks.reindex_account": {"queue": "maintenance"},
    "example_project.tasks.sync_feed": {"queue": "maintenance"},
}
# The queues a worker for this project consumes: every queue above, plus
# "priority", which callers pick per call for urgent work.
WORKER_QUEUES = ("default", "reports", "priority", "maintenance")

beat_schedule = {
    # While a sync is still queued (a busy or stopped worker) beat skips the
    # next one instead of piling up copies; it logs the skip at INFO.
    "sync-main-feed": {
        "task": "example_project.tasks.sync_feed",
        "schedule": 300.0,
        "args": ("https://example.com/feed.xml",),
        "options": {"unique": 300},
    },
    "daily-report-for-user-1": {
        "task": "example_project.tasks.send_report",
        "schedule": crontab(hour=6, minute=0),
        "args": (1,),
        "kwargs": {"period": "daily"},
        "options": {"unique": 3600},
    },
}
