"""The Django project in tests/django_project passes its own suite, against the test Redis.

Each app's ``tests.py`` runs in a pytest subprocess (see ``django_support``):
views and ``on_commit`` in ``shop``, django-celery-beat's scheduler and admin
in ``reports``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from celery_unique.testing import RedisServer

from .django_support import assert_passed, run_django_suite
from .versions import HAS_DJANGO_TASK, needs_django_task

pytestmark = pytest.mark.skipif(not HAS_DJANGO_TASK, reason=needs_django_task)

PROJECT = Path(__file__).resolve().parent / "django_project"


@pytest.mark.parametrize("app_tests", ["shop/tests.py", "reports/tests.py"])
def test_django_project(app_tests: str, redis_server: RedisServer, tmp_path: Path) -> None:
    """Each app of the Django project passes its tests against real Redis, sqlite and workers."""
    assert_passed(run_django_suite(PROJECT, redis_server, tmp_path, app_tests))
