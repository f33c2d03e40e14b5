"""Run Celery's own suites twice, as shipped and with UniqueTask as every app's default task class.

``python -m dropin celery-X.Y.Z.tar.gz`` (``make dropin`` downloads the sdist
of the installed Celery and runs this):

1. unpacks the sdist's ``t/`` (and the ``pyproject.toml`` that holds Celery's
   pytest settings) twice, one tree per run, so that no run sees a file the
   other left, and the installed Celery is the one under test;
2. runs the suites with pytest in each tree, loading ``dropin.plugin``: once
   plain, once with ``--dropin-task-cls=celery_unique:UniqueTask``;
3. prints the tests whose outcome differs, with their tracebacks, and both
   runs' counts (``dropin.compare``).

Exit status: 0 when every outcome is the same, 1 when some differ, 2 when a
run could not be compared (pytest crashed, or the swap did not take).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import celery

from .compare import RunRecord, differing, report

#: The class the second run makes every app's default.
UNIQUE_TASK = "celery_unique:UniqueTask"
#: The suites by name, as paths in Celery's source tree.
SUITES = {
    "unit": ("t/unit/tasks", "t/unit/app", "t/unit/worker"),
    "integration": ("t/integration",),
}
#: The sdist's files each run needs: the tests, and Celery's pytest settings.
SOURCE_PARTS = ("t/", "pyproject.toml")
# pytest-django comes with this project's test extra, not with Celery's.
PYTEST_OPTIONS = ("-q", "--tb=short", "-p", "no:cacheprovider", "-p", "no:django", "-p", "dropin.plugin")
OUTCOMES = "outcomes.json"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Run:
    """One of the two runs: its label in the report and the default task class it sets, if any."""

    label: str
    task_cls: str | None

    @property
    def name(self) -> str:
        return "unique" if self.task_cls else "plain"


RUNS = (Run("celery.Task", None), Run("UniqueTask", UNIQUE_TASK))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sdist: Path = args.sdist
    version = celery.__version__
    if sdist.name != f"celery-{version}.tar.gz":
        print(f"dropin: {sdist} is not the sdist of the installed Celery {version}", file=sys.stderr)
        return 2
    suites = [name.strip() for name in args.suites.split(",") if name.strip()]
    unknown = [name for name in suites if name not in SUITES]
    if unknown or not suites:
        print(f"dropin: unknown suite(s) {unknown or suites}; known: {', '.join(SUITES)}", file=sys.stderr)
        return 2
    paths = [path for name in suites for path in SUITES[name]]
    workdir: Path = args.workdir / f"celery-{version}"
    print(f"dropin: Celery {version}'s {', '.join(paths)}, twice: with celery.Task and with {UNIQUE_TASK}")
    seconds: dict[Run, float | None] = {}
    with _suite_environment(suites) as env:
        running: list[Job] = []
        for run in RUNS:
            running.append(Job.start(run, _unpack(sdist, workdir / run.name), paths, env, args.pytest_args))
            if args.jobs == 1:
                seconds[run] = running.pop().wait()
        for job in running:
            seconds[job.run] = job.wait()
    took = {run: wall for run, wall in seconds.items() if wall is not None}
    if len(took) < len(RUNS):
        return 2
    plain, unique = (RunRecord.load(run.label, workdir / run.name / OUTCOMES, took[run]) for run in RUNS)
    print(report(plain, unique))
    if unique.tests_on_task_cls == 0:
        print(f"dropin: no test's app was built from {UNIQUE_TASK}: the swap did not take", file=sys.stderr)
        return 2
    return 1 if differing(plain, unique) else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dropin", description=__doc__.splitlines()[0])
    parser.add_argument("sdist", type=Path, help="the sdist of the installed Celery (celery-X.Y.Z.tar.gz)")
    parser.add_argument("--suites", default="unit", help=f"comma-separated, of: {', '.join(SUITES)}")
    parser.add_argument("--workdir", type=Path, default=Path(".dropin"), help="where the trees go")
    parser.add_argument(
        "--jobs", type=int, choices=(1, 2), default=1, help="2 runs both at once (on 2 cores, not faster)"
    )
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments for both runs, after --")
    return parser


def _unpack(sdist: Path, tree: Path) -> Path:
    """A fresh copy of the sdist's tests and pytest settings in ``tree``; nothing else of it."""
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    with tarfile.open(sdist) as archive:
        top = archive.getnames()[0].split("/")[0]
        members = []
        for member in archive.getmembers():
            relative = member.name.removeprefix(f"{top}/")
            if not (member.isfile() or member.isdir()) or ".." in Path(relative).parts:
                continue
            if relative.startswith(SOURCE_PARTS[0]) or relative in SOURCE_PARTS:
                member.name = relative
                members.append(member)
        archive.extractall(tree, members=members)
    return tree


@dataclass
class Job:
    """A run's pytest process, with its tree and log."""

    run: Run
    tree: Path
    process: subprocess.Popen[bytes]
    log: IO[bytes]
    started: float

    @classmethod
    def start(cls, run: Run, tree: Path, paths: list[str], env: dict[str, str], extra: list[str]) -> Job:
        command = [sys.executable, "-m", "pytest", *paths, "-c", "pyproject.toml", "--rootdir", "."]
        command += [*PYTEST_OPTIONS, "--dropin-outcomes", OUTCOMES, *extra]
        if run.task_cls:
            command.append(f"--dropin-task-cls={run.task_cls}")
        print(f"dropin: {run.label} run started, log: {tree / 'pytest.log'}", flush=True)
        log = open(tree / "pytest.log", "wb")  # noqa: SIM115 - closed by wait()
        process = subprocess.Popen(command, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
        return cls(run, tree, process, log, time.monotonic())

    def wait(self) -> float | None:
        """The run's wall time in seconds, or None if pytest did not run the tests to the end."""
        code = self.process.wait()
        seconds = time.monotonic() - self.started
        self.log.close()
        log = self.tree / "pytest.log"
        summary = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
        print(f"dropin: {self.run.label} run: {' '.join(summary).strip('= ')} ({seconds:.0f} s)", flush=True)
        # 0: all passed, 1: some failed; anything else leaves no outcomes to compare.
        if code not in (0, 1) or not (self.tree / OUTCOMES).exists():
            print(f"dropin: {self.run.label} run: pytest's exit status {code}, see {log}", file=sys.stderr)
            return None
        return seconds


@contextmanager
def _suite_environment(suites: list[str]) -> Iterator[dict[str, str]]:
    """The environment of both runs: this project on the path, and what the chosen suites need."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    yield env


if __name__ == "__main__":
    sys.exit(main())
