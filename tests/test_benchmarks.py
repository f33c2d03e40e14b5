"""The benchmarks run end to end in quick mode; their timings are never asserted."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from celery_unique.testing import RedisServer

ROOT = Path(__file__).resolve().parent.parent
#: A database no other test uses, so the benchmark's keys meet nothing else.
BENCH_DB = 5


class QuickRun(NamedTuple):
    """A finished ``--quick`` run and the keys it left in its database."""

    process: subprocess.CompletedProcess[str]
    leftovers: list[bytes]


@pytest.fixture(scope="module")
def quick_run(redis_server: RedisServer) -> QuickRun:
    """One ``--quick`` run against the suite's Redis, shared by the tests below."""
    client = redis_server.client(BENCH_DB)
    client.flushdb()
    env = {**os.environ, "REDIS_URL": redis_server.url(BENCH_DB)}
    process = subprocess.run(
        [sys.executable, "-m", "benchmarks.enqueue", "--quick"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=90, check=False,
    )
    # Looked at here: every test starts by flushing all databases.
    leftovers = sorted(client.scan_iter(count=1000))
    client.close()
    return QuickRun(process, leftovers)


def test_quick_run_succeeds(quick_run: QuickRun) -> None:
    """``python -m benchmarks.enqueue --quick`` exits 0."""
    assert quick_run.process.returncode == 0, quick_run.process.stderr


@pytest.mark.parametrize(
    "variant",
    [
        "plain", "unique", "duplicate", "unique+transport", "duplicate+transport", "plain+transport",
        "apply_many x100", "group x100", "unique group x100", "fan_out group x100", "replace", "replacing",
        "limit=3", "limit=3 duplicate",
    ],
)
def test_core_variant_ratio_printed(quick_run: QuickRun, variant: str) -> None:
    """Each celery-unique variant gets a throughput ratio against plain Celery."""
    output = quick_run.process.stdout
    assert re.search(rf"^ratio {re.escape(variant)}: \d+\.\d\d", output, re.MULTILINE), output


@pytest.mark.parametrize(
    ("variant", "module"), [("celery-once", "celery_once"), ("celery-singleton", "celery_singleton")]
)
def test_other_library_ratio_or_skip_printed(
    quick_run: QuickRun, variant: str, module: str
) -> None:
    """An installed competitor gets a ratio line; a missing one is reported as skipped."""
    if importlib.util.find_spec(module) is not None:
        pattern = rf"^ratio {variant}: \d+\.\d\d"
    else:
        pattern = rf"^skipped {variant}: "
    assert re.search(pattern, quick_run.process.stdout, re.MULTILINE), quick_run.process.stdout


def test_microbenchmarks_printed(quick_run: QuickRun) -> None:
    """Key derivation and memory per lock are reported."""
    for line in (
        "key derivation, 3 small args, inside real apply_async calls:",
        "key derivation, 3 small args, lock_key() in a loop:",
        "key derivation, 1 MiB argument:",
        "memory per lock: MEMORY USAGE",
    ):
        assert line in quick_run.process.stdout


def test_leaves_no_keys_behind(quick_run: QuickRun) -> None:
    """The run deletes its queue and locks from the database it was given."""
    assert quick_run.process.returncode == 0, quick_run.process.stderr
    assert quick_run.leftovers == []


def test_latency_mode_reports_the_proxy_and_the_checked_duplicate(redis_server: RedisServer) -> None:
    """``--latency-us`` puts a proxy in the way, prints its own cost, and every ratio comes out."""
    client = redis_server.client(BENCH_DB)
    client.flushdb()
    env = {**os.environ, "REDIS_URL": redis_server.url(BENCH_DB)}
    process = subprocess.run(
        [sys.executable, "-m", "benchmarks.enqueue", "--quick", "--rounds", "1", "--calls", "5",
         "--latency-us", "100"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert process.returncode == 0, process.stderr
    output = process.stdout
    assert re.search(r"^latency proxy: PING [\d.]+ us direct, [\d.]+ us through the proxy with no delay",
                     output, re.MULTILINE), output
    assert re.search(r"^ratio duplicate\+check: \d+\.\d\d", output, re.MULTILINE), output
    assert re.search(r"^ratio unique: \d+\.\d\d \(target >= 0\.85", output, re.MULTILINE), output
    assert re.search(r"^ratio unique\+transport: \d+\.\d\d \(target >= 0\.9", output, re.MULTILINE), output
    assert sorted(client.scan_iter(count=1000)) == []


def test_option_checks_benchmark_runs() -> None:
    """``python -m benchmarks.options --quick`` exits 0 and prints a figure for each check."""
    process = subprocess.run(
        [sys.executable, "-m", "benchmarks.options", "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert process.returncode == 0, process.stderr
    for check in ("check_option_names, no options", "unlock_if_disabled, locking off"):
        assert re.search(rf"^{check} +\d+ ns$", process.stdout, re.MULTILINE), process.stdout


@pytest.fixture(scope="module")
def worker_run(redis_server: RedisServer) -> QuickRun:
    """One ``benchmarks.worker --quick`` run on the solo pool against the suite's Redis.

    celery-once stands for the other libraries: each adds two worker starts
    (the command count), and the run is kept under 20 s.
    """
    client = redis_server.client(BENCH_DB)
    client.flushdb()
    env = {**os.environ, "REDIS_URL": redis_server.url(BENCH_DB)}
    process = subprocess.run(
        [sys.executable, "-m", "benchmarks.worker", "--quick", "--pools", "solo",
         "--variants", "unique,celery-once"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    leftovers = sorted(client.scan_iter(count=1000))
    client.close()
    return QuickRun(process, leftovers)


def test_worker_quick_run_succeeds(worker_run: QuickRun) -> None:
    """``python -m benchmarks.worker --quick`` exits 0 and deletes every key it made."""
    assert worker_run.process.returncode == 0, worker_run.process.stderr + worker_run.process.stdout
    assert worker_run.leftovers == []


@pytest.mark.parametrize("variant", ["plain", "unique"])
def test_worker_ratio_and_commands_printed(worker_run: QuickRun, variant: str) -> None:
    """Each celery-unique variant gets a drain ratio, and its commands per task, enqueue and run."""
    output = worker_run.process.stdout
    assert re.search(rf"^ratio solo {variant}: \d+\.\d\d", output, re.MULTILINE), output
    number = r"\d+\.\d\d"
    assert re.search(
        rf"^commands {variant}: enqueue {number} \({number} round trips, {number} in scripts\); "
        rf"run {number} \({number} round trips", output, re.MULTILINE,
    ), output


def test_worker_unique_run_costs_one_round_trip_and_leaves_no_key(worker_run: QuickRun) -> None:
    """Under Celery's defaults a unique run adds one EVALSHA to plain's commands and leaves no key."""
    output = worker_run.process.stdout
    extra = re.search(r"^commands unique: .*\n  extra vs plain: (.*)$", output, re.MULTILINE)
    assert extra is not None, output
    assert re.search(r"run evalsha \+1\.\d\d", extra.group(1)), extra.group(1)
    assert re.search(r"^keys left unique: 0$", output, re.MULTILINE), output
    assert re.search(r"^keys left after a timed batch, the most of any: plain 0, unique 0", output,
                     re.MULTILINE), output


def test_worker_threads_printed(worker_run: QuickRun) -> None:
    """The threads a unique worker adds are named: the revoke watcher in its main process."""
    output = worker_run.process.stdout
    assert re.search(r"^threads solo unique: \+1 \(\+celery-unique-revoke-watcher\)$", output,
                     re.MULTILINE), output


def test_worker_other_library_or_skip_printed(worker_run: QuickRun) -> None:
    """An installed competitor gets a drain ratio and a keys-left line; a missing one is skipped."""
    variant, module = "celery-once", "celery_once"
    output = worker_run.process.stdout
    if importlib.util.find_spec(module) is None:
        assert re.search(rf"^skipped {variant}: ", output, re.MULTILINE), output
        return
    assert re.search(rf"^ratio solo {variant}: \d+\.\d\d", output, re.MULTILINE), output
    assert re.search(rf"^keys left {variant}: \d+", output, re.MULTILINE), output
