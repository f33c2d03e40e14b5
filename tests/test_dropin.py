"""The drop-in comparison's own parts: the pytest plugin that records and swaps, and the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dropin.compare import RunRecord, differing, report

pytest_plugins = ["pytester"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent

OUTCOMES_SUITE = '''
import pytest

def test_passes():
    pass

def test_fails():
    assert 1 == 2, "one is not two"

def test_skips():
    pytest.skip("not here")

@pytest.mark.xfail(reason="known", strict=True)
def test_xfails():
    assert False

@pytest.fixture
def broken_teardown():
    yield
    raise RuntimeError("teardown broke")

def test_teardown_error(broken_teardown):
    pass

def test_subtests(subtests):
    for n in range(3):
        with subtests.test(msg="n", n=n):
            assert n != 1
'''

SWAP_SUITE = '''
import pytest
from celery import Celery, Task

from celery_unique import UniqueTask


class Own(Task):
    pass


@pytest.fixture
def app():
    app = Celery(set_as_current=False)
    app.Task
    return app


def test_default_task_class(app):
    assert issubclass(app.Task, UniqueTask)
    assert not getattr(app, "_custom_task_cls_used", False)  # Celery 5.4+


def test_own_task_class_kept():
    assert Celery(set_as_current=False, task_cls=Own).Task.__mro__[1] is Own
'''


def _run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, *args: str) -> dict[str, Any]:
    monkeypatch.setenv("PYTHONPATH", str(PROJECT_ROOT))
    plugin = ("-p", "no:cacheprovider", "-p", "dropin.plugin", "--dropin-outcomes=out.json")
    pytester.runpytest_subprocess(*plugin, *args)
    data: dict[str, Any] = json.loads((pytester.path / "out.json").read_text())
    return data


def test_plugin_records_each_outcome(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test's outcome is recorded in pytest's words, a teardown error and failing subtests apart."""
    pytester.makepyfile(test_outcomes=OUTCOMES_SUITE)
    data = _run(pytester, monkeypatch)
    assert data["outcomes"] == {
        "test_outcomes.py::test_passes": ["passed"],
        "test_outcomes.py::test_fails": ["failed"],
        "test_outcomes.py::test_skips": ["skipped"],
        "test_outcomes.py::test_xfails": ["xfailed"],
        "test_outcomes.py::test_teardown_error": ["passed", "error in teardown"],
        "test_outcomes.py::test_subtests": ["failed"],
    }
    assert data["subtests"] == {"test_outcomes.py::test_subtests [n] (n=1)": ["failed"]}
    assert "one is not two" in data["failures"]["test_outcomes.py::test_fails"]
    assert "teardown broke" in data["failures"]["test_outcomes.py::test_teardown_error"]


def test_plugin_makes_unique_task_the_default(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --dropin-task-cls, apps default to UniqueTask and apps naming a class keep theirs."""
    pytester.makepyfile(test_swap=SWAP_SUITE)
    data = _run(pytester, monkeypatch, "--dropin-task-cls=celery_unique:UniqueTask")
    assert data["outcomes"] == {
        "test_swap.py::test_default_task_class": ["passed"],
        "test_swap.py::test_own_task_class_kept": ["passed"],
    }
    assert data["tests_on_task_cls"] == 1


def test_plugin_leaves_the_default_alone_without_the_option(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --dropin-task-cls, apps keep celery.Task, so the plain run is Celery as shipped."""
    pytester.makepyfile(test_swap=SWAP_SUITE)
    data = _run(pytester, monkeypatch)
    assert data["outcomes"]["test_swap.py::test_default_task_class"] == ["failed"]
    assert data["tests_on_task_cls"] == 0


def _record(label: str, outcomes: dict[str, list[str]], **extra: Any) -> RunRecord:
    return RunRecord(label, outcomes, extra.get("subtests", {}), extra.get("failures", {}), 0, 1.0)


def test_report_lists_only_the_tests_that_differ() -> None:
    """A test whose outcome differs is listed with its traceback; the ones that agree are counted only."""
    plain = _record("celery.Task", {"t::same": ["passed"], "t::differs": ["passed"]})
    unique = _record(
        "UniqueTask",
        {"t::same": ["passed"], "t::differs": ["failed"]},
        failures={"t::differs": "E   AttributeError: 'int' object has no attribute 'get'"},
    )
    assert differing(plain, unique) == ["t::differs"]
    text = report(plain, unique)
    assert "t::same" not in text
    assert "t::differs under UniqueTask: failed" in text
    assert "E   AttributeError: 'int' object has no attribute 'get'" in text
    assert text.endswith("1 test differs.")


def test_report_compares_subtests_and_tests_one_run_lacks() -> None:
    """A subtest failing in one run only, and a test only one run reported, both differ."""
    plain = _record("celery.Task", {"t::sub": ["passed"]})
    unique = _record(
        "UniqueTask", {"t::sub": ["passed"], "t::new": ["passed"]}, subtests={"t::sub [x]": ["failed"]}
    )
    assert differing(plain, unique) == ["t::new", "t::sub [x]"]
    assert plain.outcome("t::sub [x]") == "passed"
    assert plain.outcome("t::new") == "not run"
