"""How long the lock admin takes over many locks: ``UniqueLocks`` and ``celery unique``.

Run ``python -m benchmarks.admin [--quick] [--locks N] [--compare]``. It
starts a throwaway ``redis-server`` unless ``REDIS_URL`` names one; the locks
live in that URL's database under a prefix of their own (``bench-admin``),
and the run deletes them at the end.

It fills the store with N locks (100,000 by default) of two tasks on two
queues, keyed by ``lock_key`` as a unique enqueue keys them, then times, each
on a freshly filled store:

* ``UniqueLocks.list()`` and going through ``UniqueLocks.iter_locks()``;
* ``UniqueLocks.describe()``, which also reads each holder's running marker
  and its state in the result backend (the same Redis, nothing stored:
  PENDING);
* ``UniqueLocks.clear()``;
* ``celery -A benchmarks.admin unique list``, its output read through a pipe,
  and ``celery -A benchmarks.admin unique clear --yes``, each a whole process
  (Python and Celery start-up included; ``celery unique --help`` is timed too,
  to show that share);

then the peak Python memory of ``list()`` against ``iter_locks()``
(tracemalloc, in a run of its own since tracing slows everything down).
``--compare`` also times the admin as it was before batching, two round
trips per lock to clear, on the same locks, and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from benchmarks.enqueue import machine, redis_url
from celery_unique import UniqueLocks, UniqueTask
from celery_unique.ids import new_task_id

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "bench-admin"
#: The targets of the lock admin at 100,000 locks, in seconds.
TARGETS = {"list": 3.0, "clear": 3.0}
TASKS = ("benchmarks.admin.send_report", "benchmarks.admin.rebuild_index")
QUEUES = ("celery", "reports")


def make_app(url: str) -> Celery:
    """The app whose locks are measured; also what ``celery -A benchmarks.admin`` loads."""
    app = Celery("bench_admin", broker=url, backend=url, set_as_current=False)
    app.conf.update(unique_redis_url=url, unique_key_prefix=PREFIX)
    for name in TASKS:
        app.task(base=UniqueTask, name=name, shared=False)(_report)
    return app


def _report(user_id: int, period: str = "daily") -> str:
    return f"{user_id} {period}"


# `celery -A benchmarks.admin unique ...` in the subprocesses below.
app = make_app(os.environ.get("BENCH_ADMIN_URL", "redis://127.0.0.1:6379/0"))


def fill(app: Celery, client: redis.Redis, count: int) -> None:
    """Take ``count`` locks at once, with the keys and values unique enqueues give them."""
    tasks = [app.tasks[name] for name in TASKS]
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        task = tasks[i % len(tasks)]
        key = task.lock_key((i,), None, {"queue": QUEUES[i // 2 % len(QUEUES)]})
        pipe.set(key, new_task_id(), px=600_000)
        if len(pipe) == 10_000:
            pipe.execute()
    pipe.execute()


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BENCH_ADMIN_URL": url}
    process = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "benchmarks.admin", "unique", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    if process.returncode != 0:
        raise RuntimeError(f"celery unique {' '.join(args)} failed: {process.stderr}")
    return process


def per_lock_list(app: Celery) -> int:
    """The admin's list before batching: SCAN, then GET and PTTL of each key, in one pipeline."""
    client = redis.Redis.from_url(app.conf.unique_redis_url)
    keys = list(client.scan_iter(match=f"{PREFIX}:*:*:*", count=1000, _type="string"))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.get(key)
        pipe.pttl(key)
    replies = pipe.execute()
    return sum(holder is not None for holder in replies[::2])


def per_lock_clear(app: Celery) -> int:
    """The admin's clear before batching: list, then per lock a GET and an owner-checked delete."""
    client = redis.Redis.from_url(app.conf.unique_redis_url)
    release = client.register_script(UniqueLocks.RELEASE_SCRIPT)
    released = 0
    for key in client.scan_iter(match=f"{PREFIX}:*:*:*", count=1000, _type="string"):
        holder = client.get(key)
        if holder is not None:
            released += int(release(keys=[key], args=[holder]))
    return released


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.admin", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 locks, one round, for a smoke test")
    parser.add_argument("--locks", type=int, help="how many locks (default 100,000)")
    parser.add_argument("--rounds", type=int, help="timed rounds of the API calls (default 3)")
    parser.add_argument("--compare", action="store_true", help="also time the per-lock admin of before")
    ns = parser.parse_args(argv)
    count = ns.locks or (2_000 if ns.quick else 100_000)
    rounds = ns.rounds or (1 if ns.quick else 3)

    with redis_url(False) as url:
        client = redis.Redis.from_url(url)
        bench = make_app(url)
        admin = UniqueLocks(bench)
        try:
            for line in machine(client):
                print(line)
            print(f"locks: {count:,}, rounds: {rounds} (median shown)")
            run(bench, admin, client, url, count, rounds, ns.compare)
        finally:
            admin.clear()
            client.close()
    return 0


def run(
    bench: Celery, admin: UniqueLocks, client: redis.Redis, url: str, count: int, rounds: int, compare: bool
) -> None:
    times: dict[str, list[float]] = {name: [] for name in ("list", "iter", "describe", "clear")}
    fill(bench, client, count)
    for _ in range(rounds):
        took, locks = timed(admin.list)
        check(len(locks), count, "list")
        times["list"].append(took)
        took, seen = timed(lambda: sum(1 for _ in admin.iter_locks()))
        check(seen, count, "iter_locks")
        times["iter"].append(took)
        took, described = timed(admin.describe)
        check(len(described), count, "describe")
        times["describe"].append(took)
        took, released = timed(admin.clear)
        check(released, count, "clear")
        times["clear"].append(took)
        fill(bench, client, count)
    listed = statistics.median(times["list"])
    cleared = statistics.median(times["clear"])
    print(f"UniqueLocks.list: {listed:.2f} s ({verdict(listed, TARGETS['list'], count)})")
    print(f"UniqueLocks.iter_locks: {statistics.median(times['iter']):.2f} s")
    print(f"UniqueLocks.describe: {statistics.median(times['describe']):.2f} s")
    print(f"UniqueLocks.clear: {cleared:.2f} s ({verdict(cleared, TARGETS['clear'], count)})")

    startup, _ = timed(lambda: cli(url, "--help"))
    took, process = timed(lambda: cli(url, "list"))
    check(process.stdout.count("\n") - 3, count, "celery unique list")  # store, header, total lines
    print(f"celery unique list: {took:.2f} s ({verdict(took, TARGETS['list'], count)})")
    took, process = timed(lambda: cli(url, "list", "--json"))
    check(len(json.loads(process.stdout)["locks"]), count, "celery unique list --json")
    print(f"celery unique list --json: {took:.2f} s")
    took, process = timed(lambda: cli(url, "clear", "--yes"))
    check(client.dbsize(), 0, "celery unique clear --yes")
    print(f"celery unique clear --yes: {took:.2f} s ({verdict(took, TARGETS['clear'], count)})")
    print(f"  of which process start-up (celery unique --help): {startup:.2f} s")

    fill(bench, client, count)
    print(f"peak Python memory, list(): {peak_mib(admin.list):.1f} MiB")
    print(f"peak Python memory, iter_locks(): {peak_mib(lambda: sum(1 for _ in admin.iter_locks())):.1f} MiB")

    if compare:
        took, seen = timed(lambda: per_lock_list(bench))
        check(seen, count, "per-lock list")
        print(f"per-lock list (before): {took:.2f} s, {took / listed:.1f}x the batched list")
        took, released = timed(lambda: per_lock_clear(bench))
        check(released, count, "per-lock clear")
        print(f"per-lock clear (before): {took:.2f} s, {took / cleared:.1f}x the batched clear")


def check(got: int, expected: int, what: str) -> None:
    if got != expected:
        raise RuntimeError(f"{what}: {got:,} locks, expected {expected:,}")


def verdict(seconds: float, target: float, count: int) -> str:
    if count != 100_000:
        return f"target <= {target:g} s applies to 100,000 locks"
    return f"target <= {target:g} s: {'met' if seconds <= target else 'NOT met'}"


def peak_mib(call: Callable[[], Any]) -> float:
    tracemalloc.start()
    try:
        result = call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    del result
    return peak / 2**20


if __name__ == "__main__":
    sys.exit(main())
