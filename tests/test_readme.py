"""The README's quick start, Django and testing sections run as written, against the test Redis."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis

from celery_unique.testing import RedisServer
from tests.versions import HAS_DJANGO_TASK, needs_django_task

from .django_support import assert_passed, run_django_suite

README = Path(__file__).resolve().parent.parent / "README.md"


def test_quick_start_runs(redis_server: RedisServer, locks: redis.Redis) -> None:
    """The quick-start block takes a lock and its duplicate names the holder."""
    block = re.search(r"## Quick start.*?```python\n(.*?)```", README.read_text(), re.S)
    assert block is not None
    code = (
        block.group(1)
        .replace("redis://localhost:6379/0", redis_server.url(0))
        .replace("redis://localhost:6379/1", redis_server.url(2))
    )
    code = code.replace("    e.task_id ", "    holder = e.task_id ")
    namespace: dict[str, object] = {"__name__": "readme"}
    exec(compile(code, str(README), "exec"), namespace)
    result = namespace["r"]
    assert namespace["holder"] == result.id  # type: ignore[attr-defined]
    (key,) = locks.keys("*")
    assert locks.get(key) == result.id.encode()  # type: ignore[attr-defined]


# What the README's Django and testing sections leave to the project: base
# settings, URLs, the Order model, and pytest-django's ini file.
PROJECT_FILES = {
    "pytest.ini": """\
[pytest]
DJANGO_SETTINGS_MODULE = proj.settings
django_find_project = false
pythonpath = .
python_files = tests.py
addopts = -p no:cacheprovider -p no:celery -ra
""",
    "proj/__init__.py": "from .celery import app as celery_app\n",
    "proj/settings.py": """\
import os
from pathlib import Path

DATA_DIR = Path(os.environ["DJANGO_PROJECT_DATA_DIR"])
SECRET_KEY = "only-for-tests"
ALLOWED_HOSTS = ["testserver"]
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "shop"]
ROOT_URLCONF = "proj.urls"
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": DATA_DIR / "db.sqlite3"}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

""",
    "proj/urls.py": """\
from django.urls import path

from shop import views

urlpatterns = [
    path("orders/", views.place_order),
    path("orders/<int:order_id>/receipt/", views.resend_receipt),
]
""",
    "shop/__init__.py": "",
    "shop/models.py": """\
from django.db import models


class Order(models.Model):
    email = models.CharField(max_length=200)
""",
}


def readme_files(*titles: str) -> dict[str, str]:
    """Map each file named by a python block's first line in these sections to its code."""
    text = README.read_text()
    files: dict[str, str] = {}
    for title in titles:
        section = re.search(rf"^{re.escape(title)}\n(.*?)(?=^## )", text, re.S | re.M)
        assert section is not None, title
        for block in re.findall(r"```python\n(.*?)```", section.group(1), re.S):
            name = re.match(r"# (\S+\.py)\b", block)
            assert name is not None, f"a block in {title} names no file: {block[:60]!r}"
            files[name.group(1)] = files.get(name.group(1), "") + block
    return files


@pytest.mark.skipif(not HAS_DJANGO_TASK, reason=needs_django_task)
def test_django_and_testing_sections_run(redis_server: RedisServer, tmp_path: Path) -> None:
    """The Django and testing sections, written into a project, pass under pytest-django."""
    blocks = readme_files("## Django", "## Testing your tasks")
    assert set(blocks) == {
        "proj/celery.py", "proj/settings.py", "shop/tasks.py", "shop/views.py",
        "conftest.py", "shop/tests.py",
    }
    project = tmp_path / "project"
    for name in {*PROJECT_FILES, *blocks}:
        code = PROJECT_FILES.get(name, "") + blocks.get(name, "")
        code = code.replace("redis://localhost:6379/0", redis_server.url(0))
        code = code.replace("redis://localhost:6379/1", redis_server.url(2))
        path = project / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(code)
    (tmp_path / "data").mkdir()
    tests = len(re.findall(r"^def test_", blocks["shop/tests.py"], re.M))
    assert_passed(run_django_suite(project, redis_server, tmp_path / "data"), expected=tests)
