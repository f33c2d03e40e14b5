"""The example project's demo, run as a user runs it, against the suite's Redis."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from celery_unique.testing import RedisServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo_run(redis_server: RedisServer) -> subprocess.CompletedProcess[str]:
    """One run of ``python -m example_project.demo`` with REDIS_URL set to the suite's server."""
    env = dict(os.environ, REDIS_URL=redis_server.url(0))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    redis_server.client().flushall()
    return subprocess.run(
        [sys.executable, "-m", "example_project.demo"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )


def test_demo_passes_every_step(demo_run: subprocess.CompletedProcess[str]) -> None:
    """The demo exits 0 and reports every step OK, with the holder, key and PTTL shown."""
    out = demo_run.stdout
    assert demo_run.returncode == 0, out + demo_run.stderr
    assert "[FAIL]" not in out
    assert "All 5 steps behaved as expected." in out
    first = re.search(r"accepted send_report\.apply_async\(\(42,\), unique=60\): task (\S+)", out)
    assert first, out
    assert f"refused send_report.apply_async((42,), unique=60): DuplicateTaskError, holder {first[1]}" in out
    assert "lock key example:unique:reports:example_project.tasks.send_report:" in out
    assert "lock key example:unique:priority:example_project.tasks.send_report:" in out
    assert re.search(r"lock PTTL \d+ ms \(countdown 2000 ms \+ TTL 5000 ms\)", out)
    assert "the lock expired with its TTL" in out


def test_demo_uses_the_given_redis(demo_run: subprocess.CompletedProcess[str]) -> None:
    """With REDIS_URL set the demo starts no redis-server of its own."""
    assert "throwaway redis-server" not in demo_run.stdout


def test_demo_leaves_no_worker_behind(demo_run: subprocess.CompletedProcess[str]) -> None:
    """The worker the demo started, and its whole process group, are gone when it exits."""
    match = re.search(r"worker pid (\d+)", demo_run.stdout)
    assert match, demo_run.stdout
    pid = int(match.group(1))
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    # The worker led its own process group, so its pool children share its pid as group id.
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
