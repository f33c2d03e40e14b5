"""pytest plugin for Celery's own suites: records each test's outcome, can swap the default task class.

Loaded with ``-p dropin.plugin`` into a run of Celery's tests, from the
unpacked sdist.

| option | what it does |
|---|---|
| ``--dropin-outcomes=PATH`` | writes each test's outcome (and each subtest's that did not pass) to PATH |
| ``--dropin-task-cls=MOD:CLASS`` | makes that class the default task class of every ``Celery()`` app |

The task class is swapped through ``Celery.task_cls``, the class attribute
Celery reads when an app is given no ``task_cls``: apps that name a class of
their own keep it, and Celery still sees the app as using its default class
(``app._custom_task_cls_used`` stays false, as the Django fixup reads it).
This patches Celery only inside the test process this plugin is loaded into.

Both runs load the plugin, so they differ only in ``--dropin-task-cls``. Each
test's app is checked after the test: the record counts the tests whose app
built its ``Task`` from the swapped class, which shows that the swap took.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Generator
from typing import Any

import pytest
from celery import Celery

# The fixtures through which Celery's unit and integration suites give a test its app.
APP_FIXTURES = ("celery_app", "app", "manager")


class Recorder:
    """The outcomes of one run; written, as JSON, to the file ``--dropin-outcomes`` names."""

    def __init__(self, path: str | None, task_cls: type | None) -> None:
        self.path = path
        self.task_cls = task_cls
        #: nodeid -> the test's outcome, then an error in its teardown if there was one
        self.outcomes: dict[str, list[str]] = {}
        #: nodeid and description of each subtest that did not pass -> its outcomes
        self.subtests: dict[str, list[str]] = {}
        #: nodeid -> pytest's text of its failures and errors
        self.failures: dict[str, str] = {}
        self.tests_on_task_cls = 0

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        try:
            return (yield)
        finally:
            if self.task_cls is not None and _app_task_is(item, self.task_cls):
                self.tests_on_task_cls += 1

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        outcome = _outcome(report)
        if outcome is None:
            return
        key, outcomes = report.nodeid, self.outcomes
        if isinstance(report, pytest.SubtestReport):
            if outcome == "passed":
                return  # their test's outcome stands for them
            key = f"{key} {report.head_line.removeprefix(report.location[2]).strip()}"
            outcomes = self.subtests
        elif report.when == "teardown":
            outcome = f"{outcome} in teardown"  # after the test's own outcome
        outcomes.setdefault(key, []).append(outcome)
        if outcome.startswith(("failed", "error", "xpassed")):
            self.failures[key] = f"{self.failures.get(key, '')}\n{report.longreprtext}".strip()

    def pytest_sessionfinish(self) -> None:
        if not self.path:
            return
        task_cls = self.task_cls and f"{self.task_cls.__module__}:{self.task_cls.__qualname__}"
        with open(self.path, "w", encoding="utf-8") as out:
            json.dump(
                {
                    "task_cls": task_cls,
                    "tests_on_task_cls": self.tests_on_task_cls,
                    "outcomes": self.outcomes,
                    "subtests": self.subtests,
                    "failures": self.failures,
                },
                out,
                indent=1,
                sort_keys=True,
            )


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dropin", "celery-unique's drop-in comparison")
    group.addoption("--dropin-outcomes", metavar="PATH", help="write each test's outcome to PATH (JSON)")
    group.addoption(
        "--dropin-task-cls",
        metavar="MODULE:CLASS",
        help="make MODULE:CLASS the default task class of every Celery app",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    name = config.getoption("dropin_task_cls")
    task_cls = _load_class(name) if name else None
    if name:
        # Read by Celery.__init__ at every app's creation; the suites create
        # their apps in fixtures and tests, after this hook.
        previous = Celery.task_cls
        config.add_cleanup(lambda: setattr(Celery, "task_cls", previous))
        Celery.task_cls = name
    config.pluginmanager.register(Recorder(config.getoption("dropin_outcomes"), task_cls), "dropin-recorder")


def _load_class(name: str) -> type:
    module, _, qualname = name.partition(":")
    found: Any = importlib.import_module(module)
    for attr in qualname.split("."):
        found = getattr(found, attr)
    if not isinstance(found, type):
        raise pytest.UsageError(f"--dropin-task-cls={name} is not a class")
    return found


def _app_task_is(item: pytest.Item, task_cls: type) -> bool:
    """Whether the test's app built its ``Task`` from ``task_cls`` (this never builds it)."""
    funcargs: dict[str, Any] = getattr(item, "funcargs", {})
    for name in APP_FIXTURES:
        app = funcargs.get(name)
        # Celery's Task is a cached property: in the app's __dict__ once built.
        built = vars(app).get("Task") if isinstance(app, Celery) else None
        if isinstance(built, type) and issubclass(built, task_cls):
            return True
    return False


def _outcome(report: pytest.TestReport) -> str | None:
    """The report's outcome in pytest's words; None for a setup or teardown that passed."""
    xfailed = hasattr(report, "wasxfail")
    if report.outcome not in ("passed", "failed", "skipped"):
        return None  # an attempt that a plugin runs again (pytest-rerunfailures' "rerun")
    if report.skipped:
        return "xfailed" if xfailed else "skipped"
    if report.failed:
        return "failed" if report.when == "call" else "error"
    if report.when == "call":
        return "xpassed" if xfailed else "passed"
    return None
