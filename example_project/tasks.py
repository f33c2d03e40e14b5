"""The example project's tasks. Each is unique while queued when enqueued with ``unique=``."""

from __future__ import annotations

import time

from celery.utils.log import get_task_logger

from celery_unique import UniqueTask
from example_project.app import app

logger = get_task_logger(__name__)


class CrmUnavailableError(Exception):
    """The CRM refused an export."""


@app.task(base=UniqueTask)
def send_report(user_id: int, period: str = "daily") -> str:
    """Build and mail a user's activity report for ``period``."""
    time.sleep(1.0)  # stands in for the queries and the rendering
    logger.info("sent the %s report to user %s", period, user_id)
    return f"{period} report sent to user {user_id}"


# Reindexing twice in a row is wasted work, so it is unique on every call by
# default; a caller can still pass unique=None to force one.
@app.task(base=UniqueTask, unique=600)
def reindex_account(account_id: int) -> int:
    """Rebuild an account's search index; return the number of documents."""
    time.sleep(0.3)
    return 100 + account_id % 50


@app.task(base=UniqueTask)
def sync_feed(feed_url: str) -> int:
    """Fetch a feed and store its new items; return how many were new."""
    time.sleep(0.2)
    return len(feed_url) % 7


@app.task(base=UniqueTask)
def export_to_crm(account_id: int) -> None:
    """Push an account to the CRM, which is down: this task always fails."""
    time.sleep(0.1)
    raise CrmUnavailableError(f"the CRM refused account {account_id}: service unavailable")
