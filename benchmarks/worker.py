"""What a real Celery worker pays to run unique tasks, next to plain Celery, celery-once and celery-singleton.

Run ``python -m benchmarks.worker [--quick] [--latency-us N] [--pools
prefork,solo,threads] [--tasks N] [--rounds N]``. It starts a throwaway
``redis-server`` unless ``REDIS_URL`` names one; broker and every library's
locks live in that URL's database, and the run deletes only the keys it
created. With ``--latency-us`` every client, the workers and the producer
alike, reaches Redis through :mod:`benchmarks.latency_proxy`.

**What is timed.** Real workers (``celery -A benchmarks.worker_app worker``,
each a process of its own) drain batches of N queued calls of a task whose
body does nothing, each call with arguments of its own, so that every lock
is new. The variants: a plain Celery task; a ``UniqueTask`` enqueued with
``unique=60``; celery-once's ``QueueOnce``; celery-singleton's ``Singleton``;
plain and ``UniqueTask`` again with ``acks_late=True``; and the plain task
on a worker that loads celery-unique's ``celery unique`` command, as every
``celery`` command does where the package is installed (see
:mod:`benchmarks.worker_app`). Each runs on three pools: ``--pool prefork
--concurrency 1``, ``--pool solo`` and ``--pool threads --concurrency 4``, all
with ``--without-gossip --without-mingle --without-heartbeat -O fair
--loglevel WARNING`` and otherwise Celery's defaults (early
acknowledgement, prefetch multiplier 4, no result backend,
``task_ignore_result``).

**Method.** One worker per pool and variant is started at the beginning and
kept for the whole run, each consuming a queue of its own, and warmed up
with one batch that is not counted. Then, for each round, for each pool,
for each variant in an order rotated each round (so that drift of the
machine spreads over all of them): the variant's locks are deleted, its N
calls are enqueued to a staging queue that no worker consumes (not timed:
``benchmarks.enqueue`` measures that), and one ``RENAME`` makes them the
worker's queue, so that it drains a full queue from the first task to the
last with no enqueue competing with it. The process that runs the tasks
stamps ``time.perf_counter()`` at each ``task_prerun`` and at the batch's
last ``task_postrun`` into its own memory and writes the stamps to a file
once, after the batch's last task (see :mod:`benchmarks.worker_app`): no
Redis command of its own, nothing written inside the window. The window
runs from the start of the task numbered ``warmup`` (the worker's prefetch
filling up) to the end of the last, and the rate is the tasks in it over
its length; the same process's CPU time over the window is reported too.
Each variant's rate is divided by plain's of the same round and pool, and
the median of those ratios over the rounds is reported, with their spread.
Workers that are not draining wait in ``BRPOP`` and cost next to nothing.

**Measured once, before the timed rounds** (on the first pool given, with
workers started for it, and no other worker running):

* Redis commands per task, enqueue and run, read from ``MONITOR`` on a
  connection of the benchmark's own: marker ``ECHO`` commands split the
  enqueue from the worker's run, and the same batch is run at two sizes so
  that the worker's start-up and shutdown cancel out (per task = difference
  of counts / difference of sizes). ``MONITOR`` tells a client's command from
  one a Lua script ran (``INFO commandstats`` counts both), and a
  ``MULTI``/``EXEC`` block counts as one round trip;
* the keys each library left in Redis once all tasks ended and the worker
  stopped (``unique:*``, ``qo_*``, celery-singleton's prefix), and any other
  key outside kombu's own.

After the rounds: the threads of the process that ran the tasks (by name,
next to plain's on the same pool) and, with prefork, the OS threads of the
worker's main process; and the keys left after every timed batch.

The targets in docs/benchmarks.md: a unique task drains at 0.90x plain or
better on prefork over loopback, and ahead of celery-once and
celery-singleton on every pool. A miss is printed, never fatal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from benchmarks.enqueue import latency, machine
from benchmarks.worker_app import SINGLETON_PREFIX, TTL, VARIANTS, build, queue_of
from celery_unique.lock import LockStore
from celery_unique.testing import RedisServer

ROOT = Path(__file__).resolve().parent.parent

POOLS: dict[str, list[str]] = {
    "prefork": ["--pool", "prefork", "--concurrency", "1"],
    "solo": ["--pool", "solo"],
    "threads": ["--pool", "threads", "--concurrency", "4"],
}
#: The same for every variant: no gossip, mingle or heartbeat traffic in the window.
WORKER_ARGS = [
    "--without-gossip", "--without-mingle", "--without-heartbeat", "-O", "fair", "--loglevel", "WARNING",
]

#: The key patterns of each library's locks and markers (the task names are the benchmark's own).
LIBRARY_KEYS = {
    "celery-unique": "unique:*benchmarks.worker.*",
    "celery-once": "qo_benchmarks.worker.*",
    "celery-singleton": f"{SINGLETON_PREFIX}*",
}
#: Kombu's keys of a worker's remote control, created by the first worker of a run.
PIDBOX_KEYS = ("_kombu.binding.celery.pidbox", "_kombu.binding.reply.celery.pidbox")
#: Threads of Celery's threads pool, started as it needs them: not counted as added.
POOL_THREADS = "ThreadPoolExecutor-"



def queue_for(variant: str, pool: str) -> str:
    """The queue of ``variant``'s worker on ``pool``: each worker has one of its own."""
    return f"{queue_of(variant)}.{pool}"


def staging_for(variant: str, pool: str) -> str:
    """The queue a batch for that worker is enqueued to, which no worker consumes."""
    return queue_for(variant, pool) + ".staging"


def all_queues() -> list[str]:
    return [q for v in VARIANTS for p in POOLS for q in (queue_for(v, p), staging_for(v, p))]


#: The target of unique/plain on prefork over loopback; a miss is printed, never fatal.
PREFORK_TARGET = 0.90


@dataclass(frozen=True)
class Settings:
    rounds: int
    tasks: int
    warmup: int
    #: The two batch sizes of the command count.
    counted: tuple[int, int]


FULL = Settings(rounds=12, tasks=500, warmup=25, counted=(200, 1000))
QUICK = Settings(rounds=1, tasks=20, warmup=2, counted=(5, 25))


@dataclass
class Batch:
    """What one worker did with one batch."""

    rate: float
    #: CPU time of the process that ran the tasks, per task over the window, in µs.
    cpu_us: float
    #: Python threads of that process, after the batch.
    thread_names: list[str]
    #: OS threads of the worker's main process (the process that ran the tasks but with prefork).
    main_os_threads: int
    keys_left: list[str]
    #: With ``BENCH_WORKER_PROFILE``: seconds spent in each of celery-unique's steps over the window.
    profile: dict[str, float] | None = None


@dataclass
class Results:
    batches: dict[tuple[str, str], list[Batch]] = field(default_factory=dict)
    #: Per pool and round: variant -> rate.
    rounds: dict[str, list[dict[str, float]]] = field(default_factory=dict)


# -- Redis, the producer, the workers ----------------------------------------


@contextlib.contextmanager
def redis_urls(latency_us: float | None) -> Iterator[tuple[str, str]]:
    """Yield (direct URL, URL every client uses): $REDIS_URL or a redis-server of this run's own."""
    url = os.environ.get("REDIS_URL")
    with contextlib.ExitStack() as stack:
        if not url:
            url = stack.enter_context(RedisServer()).url(0)
        yield url, stack.enter_context(latency(url, latency_us, 2000))


class Worker:
    """A worker process of one pool and one variant, draining one batch after another."""

    def __init__(
        self, url: str, variant: str, pool: str, tasks: int, warmup: int, workdir: str, profile: bool = False
    ) -> None:
        self.variant, self.pool, self.tasks = variant, pool, tasks
        name = f"{pool}-{variant.replace('+', '-')}"
        self.prefix = os.path.join(workdir, f"{name}-{time.monotonic_ns()}")
        self.batches = 0
        env = {
            **os.environ,
            "BENCH_WORKER_VARIANT": variant, "BENCH_WORKER_URL": url,
            "BENCH_WORKER_TASKS": str(tasks), "BENCH_WORKER_WARMUP": str(warmup),
            "BENCH_WORKER_DONE": self.prefix, "BENCH_WORKER_PROFILE": "1" if profile else "",
        }
        self.log = open(self.prefix + ".log", "wb")  # noqa: SIM115 - closed by wait()
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "benchmarks.worker_app", "worker", *POOLS[pool], *WORKER_ARGS,
                "--queues", queue_for(variant, pool), "--hostname", f"bench-{name}@%h",
            ],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )

    def wait_batch(self) -> dict[str, Any]:
        """The stamps of the next batch, once its last task has ended; the log if the worker died first."""
        path = f"{self.prefix}.{self.batches}.json"
        deadline = time.monotonic() + 60 + self.tasks * 0.05
        while not os.path.exists(path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                with open(self.prefix + ".log", encoding="utf-8", errors="replace") as log:
                    tail = log.read()[-3000:]
                raise RuntimeError(
                    f"worker {self.pool} {self.variant} did not finish its batch "
                    f"(exit {self.process.poll()}):\n{tail}"
                )
            time.sleep(0.01)
        self.batches += 1
        with open(path, encoding="utf-8") as file:
            stamps: dict[str, Any] = json.load(file)
        return stamps

    def stop(self) -> None:
        """Ask for a warm shutdown; :meth:`wait` waits for it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self) -> None:
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


class Bench:
    """The producer side: one app per variant, a Redis client, the workers."""

    def __init__(
        self, direct_url: str, url: str, settings: Settings, workdir: str, variants: list[str]
    ) -> None:
        self.url = url
        self.client = redis.Redis.from_url(direct_url)
        self.settings = settings
        self.workdir = workdir
        self.tasks = {variant: build(variant, url)[1] for variant in variants}
        self.next_arg = 0
        self.workers: list[Worker] = []
        self.pidbox_existed = {key: bool(self.client.exists(key)) for key in PIDBOX_KEYS}

    def flush(self) -> None:
        """Delete every variant's queues and every lock and marker of this run's tasks."""
        self.client.delete(*all_queues())
        for pattern in LIBRARY_KEYS.values():
            keys = list(self.client.scan_iter(match=pattern, count=1000))
            for start in range(0, len(keys), 1000):
                self.client.unlink(*keys[start : start + 1000])

    def clean_up(self) -> None:
        self.stop_workers()
        self.flush()
        self.client.delete(
            *(f"_kombu.{kind}.{q}" for q in all_queues() for kind in ("binding", "binding_permanent"))
        )
        for key, existed in self.pidbox_existed.items():
            if not existed:
                self.client.delete(key)
                # Kombu's expiry of that binding (a zset member), if it keeps one.
                self.client.zrem("_kombu.binding_deadlines", key.removeprefix("_kombu.binding."))
        self.client.close()

    def start_worker(self, variant: str, pool: str, tasks: int, warmup: int, profile: bool = False) -> Worker:
        worker = Worker(self.url, variant, pool, tasks, warmup, self.workdir, profile)
        self.workers.append(worker)
        return worker

    def stop_workers(self, workers: list[Worker] | None = None) -> None:
        workers = list(self.workers) if workers is None else workers
        for worker in workers:
            worker.stop()
        for worker in workers:
            worker.wait()
            self.workers.remove(worker)

    def enqueue(self, variant: str, count: int, queue: str) -> None:
        """``count`` calls of ``variant``'s task, each with arguments of its own, routed to ``queue``."""
        task = self.tasks[variant]
        library = VARIANTS[variant][0]
        options: dict[str, Any] = {"queue": queue}
        if library == "celery-unique":
            options["unique"] = TTL
        elif library == "celery-once":
            options["once"] = {"graceful": True}
        for i in range(self.next_arg, self.next_arg + count):
            task.apply_async((i,), **options)
        self.next_arg += count
        queued = self.client.llen(queue)
        if queued != count:
            raise RuntimeError(f"{variant}: {queued} messages queued for {count} calls")

    def keys_left(self, variant: str) -> list[str]:
        """Keys of ``variant``'s library, then any key outside kombu's and this run's queues."""
        library = VARIANTS[variant][0]
        left = []
        if library in LIBRARY_KEYS:
            left += [key.decode() for key in self.client.scan_iter(match=LIBRARY_KEYS[library], count=1000)]
        queues = set(all_queues())
        heads = tuple(pattern.split("*")[0] for pattern in LIBRARY_KEYS.values())
        for key in self.client.scan_iter(count=1000):
            name = key.decode()
            if not name.startswith(("_kombu.", "unacked", *heads)) and name not in queues:
                left.append(name)
        return sorted(left)

    def batch(self, worker: Worker) -> Batch:
        """Hand ``worker`` a full queue of its variant's calls; return what it did with them."""
        variant, pool, count = worker.variant, worker.pool, worker.tasks
        self.flush()
        self.enqueue(variant, count, staging_for(variant, pool))
        self.client.rename(staging_for(variant, pool), queue_for(variant, pool))
        stamps = worker.wait_batch()
        remaining = self.client.llen(queue_for(variant, pool))
        if remaining:
            raise RuntimeError(f"{variant} on {worker.pool}: {remaining} messages left in the queue")
        window = stamps["end"] - stamps["start"]
        timed = count - self.settings.warmup
        return Batch(
            rate=timed / window if window > 0 else float("nan"),
            cpu_us=stamps["cpu"] / timed * 1e6,
            thread_names=list(stamps["threads"]),
            main_os_threads=os_threads(worker.process.pid),
            # Every run of the batch has ended (the stamps come after its
            # library's end of run): what its locks left is there now.
            keys_left=self.keys_left(variant),
            profile=stamps.get("profile"),
        )


def os_threads(pid: int) -> int:
    """The OS threads of process ``pid`` (Linux), or -1 where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


# -- counting commands -------------------------------------------------------


class Monitor(threading.Thread):
    """Counts every command Redis runs, by phase, read from ``MONITOR``.

    The benchmark sends ``ECHO bench-phase:<name>`` to switch phases, so the
    count follows Redis's own order of commands, not this thread's lag.
    """

    MARK = "bench-phase:"

    def __init__(self, url: str) -> None:
        super().__init__(name="bench-monitor", daemon=True)
        self.client = redis.Redis.from_url(url, protocol=2)
        # A connection of its own, outside the pool: MONITOR takes it over for
        # good (``get_connection``'s signature differs across redis-py 5.x).
        self.connection = self.client.connection_pool.make_connection()
        self.connection.send_command("MONITOR")
        self.connection.read_response()
        self.phase = ""
        #: phase -> Counter of (command, ran by a script)
        self.counts: dict[str, Counter[tuple[str, bool]]] = {}
        #: phase -> round trips (a MULTI/EXEC block is one)
        self.round_trips: Counter[str] = Counter()
        self.seen = threading.Condition()
        self.marks: list[str] = []

    def run(self) -> None:
        in_block: set[str] = set()
        with contextlib.suppress(Exception):
            while True:
                line = self.connection.read_response()
                text = line.decode("utf-8", "replace") if isinstance(line, bytes) else str(line)
                # <time> [<db> <client address>|lua] "<command>" "<arg>"...
                where, _, rest = text.partition("] ")
                client = where.partition("[")[2].partition(" ")[2]
                command = rest[1:].partition('"')[0].lower()
                if command == "echo" and self.MARK in rest:
                    with self.seen:
                        self.phase = rest.rpartition(self.MARK)[2].rstrip('"')
                        self.marks.append(self.phase)
                        self.seen.notify_all()
                    continue
                if not self.phase:
                    continue
                lua = client == "lua"
                self.counts.setdefault(self.phase, Counter())[(command, lua)] += 1
                if lua:
                    continue
                if command == "multi":
                    in_block.add(client)
                    self.round_trips[self.phase] += 1
                elif command in ("exec", "discard"):
                    in_block.discard(client)
                elif client not in in_block:
                    self.round_trips[self.phase] += 1

    def mark(self, sender: redis.Redis, phase: str) -> None:
        """Switch to ``phase`` once Redis has run every command sent before."""
        sender.echo(self.MARK + phase)
        with self.seen:
            if not self.seen.wait_for(lambda: phase in self.marks, timeout=30):
                raise RuntimeError("MONITOR did not show the phase marker")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.disconnect()


@dataclass
class Count:
    """Commands per task of one variant, by phase, and the keys left after its run."""

    commands: dict[str, Counter[tuple[str, bool]]]
    round_trips: dict[str, float]
    keys_left: list[str]

    def total(self, phase: str, lua: bool = False) -> float:
        return sum(n for (_, from_lua), n in self.commands[phase].items() if from_lua == lua)


def load_scripts(client: redis.Redis) -> None:
    """Load every lock-store script on the server, as a worker that ran before would have."""
    for name in dir(LockStore):
        if name.endswith("_SCRIPT"):
            client.script_load(getattr(LockStore, name))


def count_commands(bench: Bench, direct_url: str, variants: list[str], pool: str) -> dict[str, Count]:
    """Per task commands of each variant's enqueue and run: two batch sizes, the difference.

    Each batch is enqueued with no worker running, then a worker is started,
    drains it and is stopped, all of it inside the count.
    """
    small, large = bench.settings.counted
    results = {}
    for variant in variants:
        # The producer's first calls connect, declare and load scripts: made
        # here, so that both counted batches find it warm. The worker's
        # scripts are loaded too: otherwise the first batch's first end
        # alone pays a NOSCRIPT and a SCRIPT LOAD, and the difference
        # between the batches is off by that.
        bench.flush()
        load_scripts(bench.client)
        bench.enqueue(variant, 3, queue_for(variant, pool))
        per_size = {}
        keys: list[str] = []
        for size in (small, large):
            monitor = Monitor(direct_url)
            monitor.start()
            try:
                bench.flush()
                monitor.mark(bench.client, f"enqueue-{size}")
                bench.enqueue(variant, size, queue_for(variant, pool))
                monitor.mark(bench.client, f"run-{size}")
                worker = bench.start_worker(variant, pool, size, 0)
                worker.wait_batch()
                bench.stop_workers([worker])
                monitor.mark(bench.client, "idle")
            finally:
                monitor.stop()
            keys = bench.keys_left(variant)
            per_size[size] = (monitor.counts, monitor.round_trips)
        commands: dict[str, Counter[tuple[str, bool]]] = {}
        trips: dict[str, float] = {}
        for phase in ("enqueue", "run"):
            (c_small, t_small), (c_large, t_large) = per_size[small], per_size[large]
            a, b = c_small.get(f"{phase}-{small}", Counter()), c_large.get(f"{phase}-{large}", Counter())
            commands[phase] = Counter(
                {k: (b[k] - a[k]) / (large - small) for k in set(a) | set(b) if b[k] != a[k]}
            )
            trips[phase] = (t_large[f"{phase}-{large}"] - t_small[f"{phase}-{small}"]) / (large - small)
        results[variant] = Count(commands, trips, keys)
    return results


# -- the rounds --------------------------------------------------------------


def run_rounds(bench: Bench, variants: list[str], pools: list[str], results: Results) -> None:
    settings = bench.settings
    workers = {
        (pool, variant): bench.start_worker(variant, pool, settings.tasks, settings.warmup)
        for pool in pools for variant in variants
    }
    for worker in workers.values():  # the warm-up batch, not counted
        bench.batch(worker)
    for round_no in range(settings.rounds):
        shift = round_no % len(variants)
        for pool in pools:
            rates: dict[str, float] = {}
            for variant in variants[shift:] + variants[:shift]:
                batch = bench.batch(workers[(pool, variant)])
                results.batches.setdefault((pool, variant), []).append(batch)
                rates[variant] = batch.rate
            results.rounds.setdefault(pool, []).append(rates)
            print(f"round {round_no + 1} {pool}: " + ", ".join(f"{v} {rates[v]:.0f}/s" for v in variants),
                  flush=True)
    bench.stop_workers(list(workers.values()))


def profile_runs(bench: Bench, variants: list[str], pools: list[str], results: Results) -> None:
    """Where a unique run's time goes: celery-unique's steps timed in place, next to plain's whole task.

    On the pools that run one task at a time; one warm-up batch, then one
    timed, for each unique variant, outside the rounds (the wrappers cost a
    little time of their own).
    """
    settings = bench.settings
    print("\nwhere a unique run's time goes, in the process that runs it (wall us per task, timed in place, "
          "one batch each); plain's whole task, 1 / its median rate in the rounds, for scale")
    for pool in pools:
        if pool == "threads":
            continue
        plain_us = 1e6 / statistics.median(r["plain"] for r in results.rounds[pool])
        for variant in (v for v in variants if VARIANTS[v][0] == "celery-unique"):
            worker = bench.start_worker(variant, pool, settings.tasks, settings.warmup, profile=True)
            bench.batch(worker)
            batch = bench.batch(worker)
            bench.stop_workers([worker])
            timed = settings.tasks - settings.warmup
            steps = {step: seconds / timed * 1e6 for step, seconds in (batch.profile or {}).items()}
            library = steps.get("begin_run", 0) + steps.get("before_start", 0) + steps.get("end_run", 0)
            print(f"profile {pool} {variant}: " + ", ".join(f"{k} {v:.1f}" for k, v in steps.items())
                  + f"; celery-unique in all {library:.1f} us of a task of {1e6 / batch.rate:.0f} us here; "
                  f"plain's task {plain_us:.0f} us")


# -- output ------------------------------------------------------------------


def verdict(met: bool, target: str) -> str:
    return f"target {target}: {'met' if met else 'NOT met'}"


def print_rates(results: Results, variants: list[str], pools: list[str], loopback: bool) -> None:
    ahead: list[bool] = []
    for pool in pools:
        rounds = results.rounds[pool]
        print(f"\n{pool} ({' '.join(POOLS[pool])}), {len(rounds)} rounds: tasks/s, CPU of the process "
              "that ran the tasks, and the ratio to plain of the same round")
        print(f"{'variant':<18}{'median/s':>10}{'min/s':>8}{'max/s':>8}{'cpu us':>8}"
              f"{'vs plain':>10}{'range':>13}")
        ratios = {v: [r[v] / r["plain"] for r in rounds] for v in variants}
        for v in variants:
            rates = [r[v] for r in rounds]
            cpu = statistics.median(b.cpu_us for b in results.batches[(pool, v)])
            print(f"{v:<18}{statistics.median(rates):>10.0f}{min(rates):>8.0f}{max(rates):>8.0f}{cpu:>8.0f}"
                  f"{statistics.median(ratios[v]):>10.2f}   {min(ratios[v]):.2f}-{max(ratios[v]):.2f}")
        for v in variants:
            ratio = statistics.median(ratios[v])
            note = ""
            if pool == "prefork" and v == "unique" and loopback:
                note = f" ({verdict(ratio >= PREFORK_TARGET, f'>= {PREFORK_TARGET:g} on loopback')})"
            print(f"ratio {pool} {v}: {ratio:.2f}{note}")
        for other in ("celery-once", "celery-singleton"):
            if other in variants:
                against = statistics.median([r["unique"] / r[other] for r in rounds])
                print(f"{pool} unique vs {other}: {against:.2f}x "
                      f"({'faster' if against > 1 else 'NOT faster'})")
                ahead.append(against > 1)
        if "unique+acks_late" in variants and "plain+acks_late" in variants:
            late = statistics.median([r["unique+acks_late"] / r["plain+acks_late"] for r in rounds])
            print(f"{pool} unique+acks_late vs plain+acks_late: {late:.2f}")
        if "unique+acks_late" in variants:
            late = statistics.median([r["unique+acks_late"] / r["unique"] for r in rounds])
            print(f"{pool} unique+acks_late vs unique: {late:.2f}")
    if ahead:
        print("\nunique ahead of celery-once and celery-singleton on every pool: "
              f"{'met' if all(ahead) else 'NOT met'}")


def print_threads(results: Results, variants: list[str], pools: list[str]) -> None:
    print("\nthreads after a batch, of the process that ran the tasks, next to plain's on the same pool "
          f"(the threads pool's own {POOL_THREADS}* left out); with prefork, the main process's OS threads")
    for pool in pools:
        plain = results.batches[(pool, "plain")][-1]
        for v in variants:
            batch = results.batches[(pool, v)][-1]
            added = Counter(n for n in batch.thread_names if not n.startswith(POOL_THREADS))
            added.subtract(n for n in plain.thread_names if not n.startswith(POOL_THREADS))
            names = ", ".join(f"{'+' if n > 0 else '-'}{name}" for name, n in sorted(added.items()) if n)
            line = f"threads {pool} {v}: {sum(added.values()):+d} ({names or 'none'})"
            if pool == "prefork":
                line += (f"; main process {batch.main_os_threads} OS threads "
                         f"({batch.main_os_threads - plain.main_os_threads:+d})")
            print(line)


def print_counts(counts: dict[str, Count], pool: str, settings: Settings) -> None:
    small, large = settings.counted
    print(f"\nRedis commands per task ({pool}, from MONITOR, batches of {large} and {small} tasks, "
          "the difference): sent by clients (round trips), and run inside Lua scripts")
    plain = counts["plain"]
    for v, count in counts.items():
        parts = []
        for phase in ("enqueue", "run"):
            parts.append(f"{phase} {count.total(phase):.2f} ({count.round_trips[phase]:.2f} round trips"
                         f", {count.total(phase, lua=True):.2f} in scripts)")
        extra = []
        for phase in ("enqueue", "run"):
            diff = count.commands[phase].copy()
            diff.subtract(plain.commands[phase])
            extra += [f"{phase} {name}{' (in a script)' if lua else ''} {n:+.2f}"
                      for (name, lua), n in sorted(diff.items()) if abs(n) >= 0.05]
            trips = count.round_trips[phase] - plain.round_trips[phase]
            extra.append(f"{phase} round trips {trips:+.2f}")
        print(f"commands {v}: {'; '.join(parts)}")
        if v != "plain":
            print(f"  extra vs plain: {', '.join(extra)}")
    for v, count in counts.items():
        shown = f" ({', '.join(count.keys_left[:5])})" if count.keys_left else ""
        print(f"keys left {v}: {len(count.keys_left)}{shown}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few tasks and one round, for a smoke test")
    parser.add_argument("--rounds", type=int, help="rounds of interleaved variants")
    parser.add_argument("--tasks", type=int, help="tasks each worker drains in a timed batch")
    parser.add_argument("--pools", default=",".join(POOLS), help="comma-separated, of: prefork,solo,threads")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated; plain is always in, unique must be"
    )
    parser.add_argument(
        "--latency-us", type=float, default=None, metavar="US",
        help="put a latency proxy adding US microseconds each way between every client and Redis",
    )
    ns = parser.parse_args(argv)
    base = QUICK if ns.quick else FULL
    tasks = ns.tasks or base.tasks
    warmup = min(base.warmup, tasks // 10)
    settings = Settings(rounds=ns.rounds or base.rounds, tasks=tasks, warmup=warmup, counted=base.counted)
    pools = [p for p in ns.pools.split(",") if p]
    if not pools or any(p not in POOLS for p in pools):
        parser.error(f"--pools: choose from {', '.join(POOLS)}")
    variants = ["plain"] + [v for v in ns.variants.split(",") if v and v != "plain"]
    if "unique" not in variants or any(v not in VARIANTS for v in variants):
        parser.error(f"--variants must include unique and be among {', '.join(VARIANTS)}")
    variants = [v for v in variants if available(v)]

    began = time.monotonic()
    with redis_urls(ns.latency_us) as (direct, url), tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        bench = Bench(direct, url, settings, workdir, variants)
        try:
            for line in machine(bench.client):
                print(line)
            print(f"{settings.tasks} tasks a batch ({settings.warmup} of warm-up), {settings.rounds} rounds, "
                  f"pools {', '.join(pools)}, variants {', '.join(variants)}", flush=True)
            counts = count_commands(bench, direct, variants, pools[0])
            print_counts(counts, pools[0], settings)
            print(flush=True)
            results = Results()
            run_rounds(bench, variants, pools, results)
            print_rates(results, variants, pools, loopback=ns.latency_us is None)
            print_threads(results, variants, pools)
            profile_runs(bench, variants, pools, results)
            left = {
                v: max(len(b.keys_left) for p in pools for b in results.batches[(p, v)]) for v in variants
            }
            print("\nkeys left after a timed batch, the most of any: "
                  + ", ".join(f"{v} {n}" for v, n in left.items()))
        finally:
            bench.clean_up()
    print(f"took {time.monotonic() - began:.0f} s")
    return 0


def available(variant: str) -> bool:
    """Whether ``variant``'s library imports here; a missing one is reported as skipped."""
    module = {"celery-once": "celery_once", "celery-singleton": "celery_singleton"}.get(VARIANTS[variant][0])
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError as exc:
        print(f"skipped {variant}: {type(exc).__name__}: {exc}")
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
