"""The docs site's code blocks run as written, against the test Redis and a real worker (see docs_support)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import celery_unique
from celery_unique.testing import RedisServer
from tests.versions import HAS_DJANGO_TASK, needs_django_task

from .django_support import assert_passed, run_django_suite
from .docs_support import DJANGO_PAGES, DOCS, PAGES, README, blocks, localize, project_files, run_page

#: The pages whose blocks run on their own (the README's run in test_readme.py).
RUNNABLE = [
    page for page in PAGES
    if page != README and page not in DJANGO_PAGES and any(block.runs for block in blocks(page))
]


def test_every_block_runs_or_is_marked_illustrative() -> None:
    """No page of the docs, nor the README, has a code block the suite neither runs nor is told to skip."""
    unmarked = [
        f"{block.where}: {block.language or 'a'} block"
        for page in PAGES for block in blocks(page)
        if not block.runs and not block.illustrative
    ]
    assert unmarked == []


def test_an_unmarked_shell_block_is_caught(tmp_path: Path) -> None:
    """A shell block without the marker, or a directive with code, counts as neither run nor marked."""
    page = tmp_path / "page.md"
    page.write_text(
        "```sh\nmake test\n```\n\n```sh illustrative\nmake lint\n```\n\n"
        "```{code-block} python\nx = 1\n```\n\n```{toctree}\nindex\n```\n"
    )
    found = [(block.language, block.illustrative, block.runs) for block in blocks(page)]
    assert found == [("sh", False, False), ("sh", True, False), ("{code-block}", False, False)]


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda page: page.name)
def test_page_runs(page: Path, redis_server: RedisServer, tmp_path: Path) -> None:
    """Every python and pycon block of the page runs, in order, and its doctests print what they show."""
    assert run_page(page, redis_server, tmp_path) > 0


def test_a_wrong_doctest_output_fails(redis_server: RedisServer, tmp_path: Path) -> None:
    """A pycon block whose shown output is not what the code prints fails its page."""
    page = tmp_path / "page.md"
    page.write_text("```pycon\n>>> send_report.apply_async((1,), unique=60).id is None\nTrue\n```\n")
    with pytest.raises(AssertionError, match="1 of 1 examples failed"):
        run_page(page, redis_server, tmp_path)


# What the Django and testing pages leave to the project: base settings,
# URLs, the Order model, and pytest-django's ini file.
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


@pytest.mark.skipif(not HAS_DJANGO_TASK, reason=needs_django_task)
def test_django_and_testing_pages_run(redis_server: RedisServer, tmp_path: Path) -> None:
    """The Django and testing pages, written into a project, pass under pytest-django."""
    files: dict[str, str] = {}
    for page in DJANGO_PAGES:
        for name, code in project_files(page).items():
            files[name] = files.get(name, "") + code
    assert set(files) == {
        "proj/celery.py", "proj/settings.py", "shop/tasks.py", "shop/views.py",
        "conftest.py", "shop/tests.py",
    }
    project = tmp_path / "project"
    for name in {*PROJECT_FILES, *files}:
        path = project / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(localize(PROJECT_FILES.get(name, "") + files.get(name, ""), redis_server))
    (tmp_path / "data").mkdir()
    tests = len(re.findall(r"^def test_", files["shop/tests.py"], re.M))
    assert_passed(run_django_suite(project, redis_server, tmp_path / "data"), expected=tests)


def test_api_reference_covers_the_public_names() -> None:
    """The API page documents each name in ``celery_unique.__all__``, the testing helpers, the Django task."""
    text = (DOCS / "api.md").read_text()
    documented = set(re.findall(r"^\.\. (?:auto\w+|py:\w+):: (celery_unique[\w.]*)", text, re.M))
    missing = [name for name in celery_unique.__all__ if f"celery_unique.{name}" not in documented]
    assert missing == []
    assert {"celery_unique.testing", "celery_unique.contrib.django"} <= documented

