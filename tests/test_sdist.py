"""The sdist carries the test suite: it holds every file the suite reads, and the suite collects from it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Trees beside the package that the suite imports or runs: its own files,
#: the example project (tests/test_demo.py), the benchmarks
#: (tests/test_benchmarks.py), the drop-in tool (tests/test_dropin.py) and the docs
#: (tests/test_docs.py).
TREES = ("tests", "example_project", "benchmarks", "dropin", "docs")
#: Top-level files the suite, the Makefile and the docs build read.
FILES = (
    "LICENSE", "README.md", "CHANGELOG.md", "MANIFEST.in", "Makefile", "pyproject.toml",
    "setup.cfg", "tox.ini", ".ci/run",
)
#: What a working tree holds that is not source: never copied, never expected.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", ".tox", "build", "dist", "*.egg-info", "__pycache__", "*.py[cod]",
    ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis", "_build",
)


def source_files(root: Path) -> set[str]:
    """The paths, relative to ``root``, of the files in TREES and FILES that are source."""
    found = {name for name in FILES if (root / name).is_file()}
    for tree in TREES:
        for path in (root / tree).rglob("*"):
            parts = path.relative_to(root).parts
            if path.is_file() and not any(NOT_SOURCE(str(root), list(parts))):
                found.add("/".join(parts))
    return found


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist of a copy of this tree, built by the project's build backend and unpacked."""
    base = tmp_path_factory.mktemp("sdist")
    # A copy: the backend writes its egg-info beside setup.cfg, which a
    # parallel test process may be reading metadata from.
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    build = subprocess.run(
        [sys.executable, "-c",
         "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))",
         str(base)],
        cwd=source, capture_output=True, text=True, timeout=120, check=False,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    archive = base / build.stdout.strip().splitlines()[-1]
    with tarfile.open(archive) as tar:
        # The safe filter where this Python has one (3.10.12+, 3.11.4+).
        tar.extraction_filter = getattr(tarfile, "data_filter", None)
        tar.extractall(base / "unpacked")
    (unpacked,) = (base / "unpacked").iterdir()
    return unpacked


def test_sdist_holds_the_suite_and_what_it_reads(sdist: Path) -> None:
    """Every source file of the trees the suite reads, and every top-level file it needs, ships."""
    expected = source_files(ROOT)
    assert {"tests/conftest.py", "tests/django_project/pytest.ini", "example_project/demo.py",
            "benchmarks/enqueue.py", "docs/conf.py", "LICENSE"} <= expected
    assert sorted(expected - source_files(sdist)) == []


def test_suite_collects_from_the_sdist(sdist: Path) -> None:
    """pytest, run in the unpacked sdist, imports every test module of this tree without an error."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTEST_")}
    collect = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:xdist", "-p", "no:cacheprovider"],
        cwd=sdist, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert collect.returncode == 0, collect.stdout + collect.stderr
    modules = {line.split("::")[0] for line in collect.stdout.splitlines() if "::" in line}
    assert modules == {f"tests/{path.name}" for path in (ROOT / "tests").glob("test_*.py")}
