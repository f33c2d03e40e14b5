"""A user's module written with the README's idioms type-checks as the README says.

The modules in ``tests/typing_samples`` are checked four ways: mypy
``--strict`` and pyright in strict mode, each with celery-types (``-stubs``)
and without (``-nostubs``). A line that ends in ``# error: <checks>`` must
get an error from exactly those checks, and every other line none: so a
misspelt option is proven an error, and an idiom the README shows is proven
clean. ``# error: all [unique_until]`` also requires the error's message to
contain ``unique_until``; groups of checks are separated by ``;``.

celery-types goes in ``<venv>/celery-types`` (``make`` and tox install it
there from ``tests/typing-stubs.txt``), not in site-packages, where ``make
lint`` would check the package against it. A check with celery-types puts
that folder on ``PYTHONPATH``, where both checkers find installed stubs. Both
checkers run offline: pyright's wheel bundles its JavaScript and runs it with
the Node.js on ``PATH``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CI
from tests.versions import HAS_DJANGO_TASK, needs_django_task

pytestmark = pytest.mark.skipif(not HAS_DJANGO_TASK, reason=needs_django_task)

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted((ROOT / "tests" / "typing_samples").glob("*.py"))
CELERY_TYPES = Path(sys.prefix) / "celery-types"
CHECKS = ("mypy-stubs", "mypy-nostubs", "pyright-stubs", "pyright-nostubs")
MARKER = re.compile(r"#\s*error:\s*(.+)$")
GROUP = re.compile(r"\s*([\w\s,-]+?)\s*(?:\[(.+)\])?\s*$")

# What a project without celery-types must tell mypy; with it, unused.
MYPY_CONFIG = """\
[mypy]
strict = True
python_version = 3.10

[mypy-celery_unique.*]
# As for any installed package: its own code is not the user's to fix.
follow_imports = silent

[mypy-celery.*,kombu.*]
ignore_missing_imports = True
"""

Errors = dict[tuple[str, int], list[str]]


def expected(check: str) -> dict[tuple[str, int], str | None]:
    """Map (sample, line) to the text its error must contain (or None), for one check."""
    lines: dict[tuple[str, int], str | None] = {}
    for sample in SAMPLES:
        for number, line in enumerate(sample.read_text().splitlines(), 1):
            marker = MARKER.search(line)
            if marker is None:
                continue
            for group in marker.group(1).split(";"):
                parsed = GROUP.fullmatch(group)
                assert parsed, f"{sample.name}:{number}: bad marker {group!r}"
                checks = {name.strip() for name in parsed[1].split(",")}
                unknown = checks - {*CHECKS, "all"}
                assert not unknown, f"{sample.name}:{number}: unknown checks {unknown}"
                if check in checks or "all" in checks:
                    lines[(sample.name, number)] = parsed[2]
    return lines


def checker_env(stubs: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}
    env.pop("PYRIGHT_PYTHON_FORCE_VERSION", None)  # another version would be downloaded
    if stubs:
        env["PYTHONPATH"] = str(CELERY_TYPES)
    return env


def run_mypy(stubs: bool, tmp_path: Path) -> Errors:
    config = tmp_path / "mypy.ini"
    config.write_text(MYPY_CONFIG)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir", str(tmp_path / "cache"),
         "--no-error-summary", "--no-pretty", "--no-color-output", "--show-absolute-path",
         *map(str, SAMPLES)],
        cwd=ROOT, env=checker_env(stubs), capture_output=True, text=True, check=False,
    )
    assert done.returncode in (0, 1), done.stdout + done.stderr
    errors: Errors = {}
    for line in done.stdout.splitlines():
        found = re.match(r"(.+?):(\d+): error: (.*)$", line)
        if found:
            errors.setdefault((Path(found[1]).name, int(found[2])), []).append(found[3])
    return errors


def run_pyright(stubs: bool, tmp_path: Path) -> Errors:
    config = tmp_path / "pyrightconfig.json"
    # Strict mode comes from each sample's "# pyright: strict" line.
    config.write_text(json.dumps({"pythonVersion": "3.10", "extraPaths": [str(ROOT)]}))
    done = subprocess.run(
        [sys.executable, "-m", "pyright", "--outputjson", "--project", str(config),
         "--pythonpath", sys.executable, *map(str, SAMPLES)],
        cwd=tmp_path, env=checker_env(stubs), capture_output=True, text=True, check=False,
    )
    assert done.returncode in (0, 1), done.stdout + done.stderr
    errors: Errors = {}
    for diagnostic in json.loads(done.stdout)["generalDiagnostics"]:
        if diagnostic["severity"] != "information":
            key = (Path(diagnostic["file"]).name, diagnostic["range"]["start"]["line"] + 1)
            errors.setdefault(key, []).append(diagnostic["message"])
    return errors


@pytest.fixture(scope="module")
def checkers_ready() -> None:
    """Make sure the checks can tell with from without celery-types, and pyright can run."""
    missing = []
    if not (CELERY_TYPES / "celery-stubs").is_dir():
        missing.append(f"celery-types in {CELERY_TYPES} (`make .venv/.installed` puts it there)")
    if shutil.which("node") is None:
        missing.append("Node.js on PATH, which pyright runs on (apt-get install nodejs)")
    if missing:
        if CI:
            pytest.fail("; ".join(missing))
        pytest.skip("; ".join(missing))
    try:
        installed = importlib.metadata.distribution("celery-types")
    except importlib.metadata.PackageNotFoundError:
        return
    # In site-packages, the checks without it would see it too.
    pytest.fail(f"celery-types is installed in {installed.locate_file('')}; uninstall it")


@pytest.mark.usefixtures("checkers_ready")
@pytest.mark.parametrize("check", CHECKS)
def test_samples_type_check_as_marked(check: str, tmp_path: Path) -> None:
    """Each check reports errors on exactly the sample lines marked for it, with the marked words."""
    checker, variant = check.split("-")
    run = run_mypy if checker == "mypy" else run_pyright
    errors = run(variant == "stubs", tmp_path)
    wanted = expected(check)
    unexpected = {line: errors[line] for line in sorted(errors.keys() - wanted.keys())}
    missed = sorted(wanted.keys() - errors.keys())
    wrong = {
        line: errors[line]
        for line, text in sorted(wanted.items())
        if line in errors and text is not None and not any(text in message for message in errors[line])
    }
    # (errors on unmarked lines, marked lines without an error, errors without the marked text)
    assert (unexpected, missed, wrong) == ({}, [], {}), check
