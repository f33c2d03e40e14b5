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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import celery

from celery_unique.testing import RedisServer

from .compare import RunRecord, differing, report

#: The class the second run makes every app's default.
UNIQUE_TASK = "celery_unique:UniqueTask"
#: The suites by name, as paths in Celery's source tree.
SUITES = {
    "unit": ("t/unit/tasks", "t/unit/app", "t/unit/worker"),
    "integration": ("t/integration",),
}
#: Files the chosen suites leave out: tests of result backends other than Redis
#: (Azure Blob Storage, SQLAlchemy), whose packages the comparison does not need.
IGNORED = {
    "integration": ("t/integration/test_backend.py", "t/integration/test_database_backend.py"),
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
    paths += [f"--ignore={path}" for name in suites for path in IGNORED.get(name, ())]
    workdir: Path = args.workdir / f"celery-{version}" / "+".join(suites)
    print(f"dropin: Celery {version}'s {' '.join(paths)}, twice: with celery.Task and with {UNIQUE_TASK}")
    seconds: dict[Run, float | None] = {}
    running: list[Job] = []
    for run in RUNS:
        resources = ExitStack()
        env = resources.enter_context(_run_environment(suites))
        tree = _unpack(sdist, workdir / run.name)
        running.append(Job.start(run, tree, [*paths, *args.pytest_args], env, resources))
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
    #: what the run's environment holds open (its redis-server), closed when it ends
    resources: ExitStack

    @classmethod
    def start(cls, run: Run, tree: Path, args: list[str], env: dict[str, str], resources: ExitStack) -> Job:
        command = [sys.executable, "-m", "pytest", "-c", "pyproject.toml", "--rootdir", ".", *PYTEST_OPTIONS]
        command += ["--dropin-outcomes", OUTCOMES, *args]
        if run.task_cls:
            command.append(f"--dropin-task-cls={run.task_cls}")
        print(f"dropin: {run.label} run started, log: {tree / 'pytest.log'}", flush=True)
        log = open(tree / "pytest.log", "wb")  # noqa: SIM115 - closed by wait()
        process = subprocess.Popen(command, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
        return cls(run, tree, process, log, time.monotonic(), resources)

    def wait(self) -> float | None:
        """The run's wall time in seconds, or None if pytest did not run the tests to the end."""
        code = self.process.wait()
        seconds = time.monotonic() - self.started
        self.log.close()
        self.resources.close()
        log = self.tree / "pytest.log"
        summary = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
        print(f"dropin: {self.run.label} run: {' '.join(summary).strip('= ')} ({seconds:.0f} s)", flush=True)
        # 0: all passed, 1: some failed; anything else leaves no outcomes to compare.
        if code not in (0, 1) or not (self.tree / OUTCOMES).exists():
            print(f"dropin: {self.run.label} run: pytest's exit status {code}, see {log}", file=sys.stderr)
            return None
        return seconds


@contextmanager
def _run_environment(suites: list[str]) -> Iterator[dict[str, str]]:
    """A run's environment: this project on the path, and what the chosen suites need.

    The integration suite gets a redis-server of the run's own on loopback, as
    broker and result backend (database 0, as in Celery's CI), and the
    ``celery`` command of this interpreter for the tests that start one.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if "integration" not in suites:
        yield env
        return
    with RedisServer().start() as server:
        url = f"redis://127.0.0.1:{server.port}/0"
        env.update(TEST_BROKER=url, TEST_BACKEND=url, REDIS_HOST="127.0.0.1", REDIS_PORT=str(server.port))
        yield env


if __name__ == "__main__":
    sys.exit(main())
