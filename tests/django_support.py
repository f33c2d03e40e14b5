"""Running a Django project's suite in a pytest subprocess, against the test Redis.

The subprocess has pytest-django, its own ini file and its own
``DJANGO_SETTINGS_MODULE``, so Django's settings and Celery's Django fixup
(which ``DJANGO_SETTINGS_MODULE`` switches on in every app created in a
process) never reach the rest of the suite.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from celery_unique.testing import RedisServer

from .conftest import CI

NEEDED = ("django", "django_celery_beat", "pytest_django")


def run_django_suite(
    project: Path, redis_server: RedisServer, data_dir: Path, *targets: str
) -> subprocess.CompletedProcess[str]:
    """Run pytest in ``project`` with its ``pytest.ini``; return the finished process.

    The project's settings read ``DJANGO_PROJECT_REDIS_URL`` (``redis://host:port``)
    and ``DJANGO_PROJECT_DATA_DIR`` (a directory for sqlite).
    """
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        reason = f"{', '.join(missing)} not installed: pip install -e '.[test]'"
        if CI:
            pytest.fail(reason)
        pytest.skip(reason)
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.pop("PYTEST_ADDOPTS", None)
    env["DJANGO_PROJECT_REDIS_URL"] = f"redis://{redis_server.host}:{redis_server.port}"
    env["DJANGO_PROJECT_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(project / "pytest.ini"),
         "--rootdir", str(project), "-q", *targets],
        cwd=project, env=env, capture_output=True, text=True, timeout=600, check=False,
    )


def assert_passed(process: subprocess.CompletedProcess[str], expected: int | None = None) -> None:
    """Fail with the subprocess's output unless all its tests (``expected`` of them) passed."""
    output = process.stdout + process.stderr
    assert process.returncode == 0, output
    lines = process.stdout.strip().splitlines()
    summary = re.fullmatch(r"(\d+) passed in [\d.]+s", lines[-1]) if lines else None
    assert summary is not None, output
    if expected is not None:
        assert int(summary.group(1)) == expected, output
