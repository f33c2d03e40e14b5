"""Fixtures of the Django project's suite: its Redis databases and a real worker."""

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from django.conf import settings

pytest_plugins = ["celery_unique.testing"]


@pytest.fixture(scope="session")
def celery_unique_app() -> Celery:
    """The project's own app, for celery_unique.testing's fixtures."""
    from proj.celery import app

    return app


@pytest.fixture(autouse=True)
def _fresh_redis() -> None:
    """Every test starts with an empty Redis: no queued message, no lock."""
    redis.Redis.from_url(settings.REDIS_URL).flushall()


@pytest.fixture
def locks() -> redis.Redis:
    """A client on the lock database (running markers hidden)."""
    # Imported here: the module is also this suite's plugin, loaded after conftest.
    from celery_unique.testing import LockDatabase

    return LockDatabase.from_url(settings.CELERY_UNIQUE_REDIS_URL)


@pytest.fixture
def broker() -> redis.Redis:
    """A client on the broker database, to count queued messages."""
    return redis.Redis.from_url(settings.CELERY_BROKER_URL)


@pytest.fixture
def worker(celery_unique_app: Celery) -> Iterator[Any]:
    """A real Celery worker (solo pool, in a thread) for the project's app."""
    with start_worker(
        celery_unique_app, pool="solo", perform_ping_check=False, shutdown_timeout=20
    ) as running:
        yield running
