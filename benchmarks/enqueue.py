"""What a unique enqueue costs, next to a plain one and to celery-once and celery-singleton.

Run ``python -m benchmarks.enqueue [--quick]``. It starts a throwaway
``redis-server`` unless ``REDIS_URL`` names one; then everything (broker,
locks, the other libraries' locks) lives in that URL's database, and the run
deletes only the keys it created.

``replace`` is a unique call with ``on_duplicate="replace"`` that finds the
lock free, ``replacing`` one that replaces the holder before it (a debounce).
``limit=3`` is a unique call with ``unique_limit=3`` that takes a slot of a
fresh key (one script over its three slots), ``limit=3 duplicate`` one
refused because all three slots of its key are held.

The ``x100`` variants enqueue 100 calls at a time, and report the time per
call: ``apply_many x100`` a batch of unique calls whose locks are taken in
one round trip, ``group x100`` a plain group and ``unique group x100`` a
group of unique members (one lock each).

The ``+transport`` variants publish through the package's atomic transport
(``broker_transport = "celery_unique.transport:Transport"``), whose unique
calls take the lock and queue the message in one script.

Variants run interleaved, in a rotated order each round, so that drift of the
machine (CPU frequency, other load) spreads over all of them instead of
favouring whichever ran first. Each call is timed on its own and the median of
all calls is reported, with each variant's throughput against plain Celery
(plain median / variant median). Then three microbenchmarks: key derivation,
one lock-store round trip, and Redis memory per held lock.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import celery
import redis
from celery import Celery, group
from kombu.utils.uuid import uuid

from celery_unique import DuplicateTaskError, UniqueTask, apply_many, enqueue, fan_out
from celery_unique.config import lock_store
from celery_unique.testing import RedisServer

#: A queue of its own, so that flushing it between rounds touches nothing else.
QUEUE = "bench.enqueue"
#: Lock TTL of every variant, in seconds.
TTL = 60
#: Key patterns of everything a run creates, deleted between rounds and at the end.
UNIQUE_KEYS = f"unique:{QUEUE}:*"
#: The queued markers of group members (caller-chosen ids), beside their locks.
MARKER_KEYS = f"unique:*:{{unique:{QUEUE}:*"
ONCE_KEYS = "qo_benchmarks.*"
SINGLETON_PREFIX = "bench-singleton:"

#: The broker transport of the ``+transport`` variants: the lock taken as the message is queued.
TRANSPORT = "celery_unique.transport:Transport"

#: The targets docs/benchmarks.md measures against; a miss is printed, never fatal.
TARGETS = {
    "unique": 0.90, "unique+transport": 0.95, "duplicate": 6.0, "key_small_us": 8.0, "bytes_per_lock": 200.0,
}
#: Through the latency proxy (``--latency-us``), unique/plain aims lower.
NETWORK_TARGETS = {"unique": 0.85, "unique+transport": 0.90}


@dataclass(frozen=True)
class Settings:
    """How much to measure."""

    rounds: int
    calls: int
    memory_locks: int
    key_calls: int


FULL = Settings(rounds=5, calls=2000, memory_locks=100_000, key_calls=20_000)
QUICK = Settings(rounds=3, calls=20, memory_locks=2_000, key_calls=500)


@dataclass
class Variant:
    """One way to enqueue: ``call(i)`` enqueues once, with ``i`` making the arguments new."""

    name: str
    call: Callable[[int], Any]
    #: Run after each flush, before the variant's timed calls (the duplicate's held lock).
    prepare: Callable[[], Any] = lambda: None
    #: Calls one ``call(i)`` enqueues (a batch); samples are per call.
    per_call: int = 1
    samples: list[float] = field(default_factory=list)

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples)


def report(user_id: int, period: str = "daily", fmt: str = "pdf") -> str:
    """The task body every variant enqueues; it never runs here."""
    return f"{user_id} {period} {fmt}"


# -- setup -------------------------------------------------------------------


@contextmanager
def redis_url(pin: bool, latency_us: float | None = None, pings: int = 2000) -> Iterator[str]:
    """Yield ``$REDIS_URL``, or the URL of a redis-server started for this run.

    With ``latency_us``, the URL is that of a latency proxy in front of it
    (see :mod:`benchmarks.latency_proxy`), and its own cost, measured over
    ``pings`` PINGs, is printed.
    """
    url = os.environ.get("REDIS_URL")
    if url:
        if pin:
            pin_to_one_cpu(os.getpid())
        with latency(url, latency_us, pings) as proxied:
            yield proxied
        return
    with RedisServer() as server:
        if pin and server.process is not None:
            pin_to_one_cpu(os.getpid(), server.process.pid)
        with latency(server.url(0), latency_us, pings) as proxied:
            yield proxied


@contextmanager
def latency(url: str, latency_us: float | None, pings: int) -> Iterator[str]:
    """Yield ``url`` itself, or the URL of a latency proxy in front of it, started here."""
    if latency_us is None:
        yield url
        return
    parts = urlsplit(url)
    target = f"{parts.hostname}:{parts.port or 6379}"

    def start(delay: float) -> tuple[subprocess.Popen[str], int]:
        process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.latency_proxy", "--target", target, "--delay-us", str(delay)],
            stdout=subprocess.PIPE, text=True,
        )
        assert process.stdout is not None
        return process, int(process.stdout.readline())

    def ping_us(port: int) -> float:
        client = redis.Redis(host=parts.hostname, port=port)
        try:
            client.ping()
            return per_call_us(client.ping, pings)
        finally:
            client.close()

    idle, idle_port = start(0)
    try:
        direct, through = ping_us(parts.port or 6379), ping_us(idle_port)
    finally:
        idle.kill()
        idle.wait()
    proxy, port = start(latency_us)
    try:
        delayed = ping_us(port)
        print(
            f"latency proxy: PING {direct:.1f} us direct, {through:.1f} us through the proxy with no delay "
            f"(its own cost), {delayed:.1f} us with {latency_us:g} us each way"
        )
        yield urlunsplit((parts.scheme, f"{parts.hostname}:{port}", parts.path, parts.query, ""))
    finally:
        proxy.kill()
        proxy.wait()


def pin_to_one_cpu(*pids: int) -> None:
    """Run ``pids`` on one CPU, where the OS allows it.

    A loopback round trip between two busy CPUs waits for a cross-CPU wakeup,
    which on virtual machines costs tens of microseconds and varies from run to
    run; on one CPU it is a context switch. Pinning measures the CPU cost of
    each path with far less noise; unpinned is closer to a client and a Redis
    on separate hosts, where the round trip dominates.
    """
    if not hasattr(os, "sched_setaffinity"):
        print("pin: not supported on this platform, running unpinned")
        return
    cpu = min(os.sched_getaffinity(0))
    for pid in pids:
        os.sched_setaffinity(pid, {cpu})
    print(f"pinned this process and the redis-server it started to CPU {cpu}")


def make_app(url: str) -> Celery:
    """A Celery app with broker, locks and the other libraries' locks all at ``url``."""
    app = Celery("benchmarks", set_as_current=False)
    app.conf.update(
        broker_url=url,
        broker_connection_retry_on_startup=False,
        task_default_queue=QUEUE,
        # No result backend and ignored results: the plain path is publish only.
        result_backend=None,
        task_ignore_result=True,
        unique_redis_url=url,
        ONCE={"backend": "celery_once.backends.Redis", "settings": {"url": url, "default_timeout": TTL}},
        singleton_backend_url=url,
        singleton_key_prefix=SINGLETON_PREFIX,
        singleton_lock_expiry=TTL,
    )
    return app


def duplicate_variant(name: str, task: Any) -> Variant:
    """A refused duplicate of ``task``: a held call, then the same call each time."""

    def hold() -> None:
        task.apply_async((-1, "held", "pdf"), unique=TTL)

    def duplicate(_: int) -> None:
        try:
            task.apply_async((-1, "held", "pdf"), unique=TTL)
        except DuplicateTaskError:
            pass
        else:
            raise AssertionError(f"the held lock did not refuse the duplicate ({name})")

    return Variant(name, duplicate, prepare=hold)


def core_variants(app: Celery) -> list[Variant]:
    """Plain Celery, a unique enqueue that takes its lock, and one refused as a duplicate."""
    plain = app.task(name="benchmarks.plain_report")(report)
    unique = app.task(name="benchmarks.unique_report", base=UniqueTask)(report)


    def hold_slots() -> None:
        for _ in range(3):
            unique.apply_async((-3, "held", "pdf"), unique=TTL, unique_limit=3)

    def limited_duplicate(_: int) -> None:
        try:
            unique.apply_async((-3, "held", "pdf"), unique=TTL, unique_limit=3)
        except DuplicateTaskError:
            return
        raise AssertionError("the three held slots did not refuse the call (limit=3 duplicate)")

    def hold_replaceable() -> None:
        unique.apply_async((-2, "held", "pdf"), unique=TTL, on_duplicate="replace", countdown=60)

    def replacing(_: int) -> None:
        # Each call replaces the one before it, which has not begun.
        unique.apply_async((-2, "held", "pdf"), unique=TTL, on_duplicate="replace", countdown=60)

    return [
        Variant("plain", lambda i: plain.apply_async((i, "daily", "pdf"))),
        Variant("unique", lambda i: unique.apply_async((i, "daily", "pdf"), unique=TTL)),
        duplicate_variant("duplicate", unique),
        # on_duplicate="replace": a first call (the lock free; its own arguments,
        # since the warm-up runs every variant before the first flush), and one
        # that replaces a holder.
        Variant("replace", lambda i: unique.apply_async((i, "monthly", "pdf"), unique=TTL,
                                                         on_duplicate="replace")),
        Variant("replacing", replacing, prepare=hold_replaceable),
        # unique_limit=3: a fresh key's first slot, and a call refused by
        # a key whose three slots are held.
        Variant("limit=3", lambda i: unique.apply_async((i, "yearly", "pdf"), unique=TTL, unique_limit=3)),
        Variant("limit=3 duplicate", limited_duplicate, prepare=hold_slots),
    ]


#: Calls per batch of the ``x100`` variants.
BATCH = 100


def batch_variants(app: Celery) -> list[Variant]:
    """100 calls at a time: apply_many, a plain group, a group of unique members, and one in fan_out()."""
    plain = app.tasks["benchmarks.plain_report"]
    unique = app.tasks["benchmarks.unique_report"]

    def many(i: int) -> None:
        outcomes = apply_many([unique.s(i * BATCH + j, "daily", "pdf").set(unique=TTL) for j in range(BATCH)])
        if any(isinstance(outcome, Exception) for outcome in outcomes):
            raise AssertionError(f"a batch call failed: {outcomes}")

    def plain_group(i: int) -> None:
        group(plain.s(i * BATCH + j, "daily", "pdf") for j in range(BATCH)).apply_async()

    def unique_group(i: int) -> None:
        # Its own arguments: the warm-up runs every variant before the first flush.
        group(unique.s(i * BATCH + j, "weekly", "pdf").set(unique=TTL) for j in range(BATCH)).apply_async()

    def fanned_group(i: int) -> None:
        with fan_out():  # the same group, its locks in one round trip
            group(unique.s(i * BATCH + j, "monthly", "pdf").set(unique=TTL)
                  for j in range(BATCH)).apply_async()

    return [
        Variant(f"apply_many x{BATCH}", many, per_call=BATCH),
        Variant(f"group x{BATCH}", plain_group, per_call=BATCH),
        Variant(f"unique group x{BATCH}", unique_group, per_call=BATCH),
        Variant(f"fan_out group x{BATCH}", fanned_group, per_call=BATCH),
    ]


def transport_variants(url: str) -> list[Variant]:
    """The atomic transport: a unique enqueue, a refused one, and a plain task through it.

    An app of its own whose ``broker_transport`` is the package's, its locks
    in the broker's database: each unique call is one script.
    """
    app = make_app(url)
    app.conf.broker_transport = TRANSPORT
    plain = app.task(name="benchmarks.transport_plain_report")(report)
    unique = app.task(name="benchmarks.transport_report", base=UniqueTask)(report)


    return [
        Variant("unique+transport", lambda i: unique.apply_async((i, "daily", "pdf"), unique=TTL)),
        duplicate_variant("duplicate+transport", unique),
        Variant("plain+transport", lambda i: plain.apply_async((i, "daily", "pdf"))),
    ]


def checked_duplicate_variant(url: str) -> Variant:
    """A refused duplicate with the holder check on: an app with a result backend.

    The holder is queued (its stored state is PENDING), so each refusal reads
    that state once and refuses: the check's cost on every refused call.
    """
    app = make_app(url)
    app.conf.update(result_backend=url, unique_check_holder=True)
    task = app.task(name="benchmarks.checked_report", base=UniqueTask)(report)

    return duplicate_variant("duplicate+check", task)


def once_variant(app: Celery) -> Variant:
    """celery-once's ``QueueOnce``, graceful, a new key each call."""
    from celery_once import QueueOnce

    task = app.task(name="benchmarks.once_report", base=QueueOnce, once={"graceful": True})(report)
    return Variant("celery-once", lambda i: task.apply_async((i, "daily", "pdf"), once={"graceful": True}))


def singleton_variant(app: Celery) -> Variant:
    """celery-singleton's ``Singleton``, a new key each call."""
    from celery_singleton import Singleton

    task = app.task(name="benchmarks.singleton_report", base=Singleton)(report)
    return Variant("celery-singleton", lambda i: task.apply_async((i, "daily", "pdf")))


def optional_variants(app: Celery, client: redis.Redis) -> list[Variant]:
    """The other libraries that import and work here; the rest are reported as skipped."""
    variants = []
    for name, build in (("celery-once", once_variant), ("celery-singleton", singleton_variant)):
        try:
            variant = build(app)
            # One real call, so a library that imports but breaks on this
            # Celery is skipped rather than failing mid-run.
            variant.call(-2)
        except Exception as exc:
            print(f"skipped {name}: {type(exc).__name__}: {exc}")
        else:
            variants.append(variant)
    flush(client)
    return variants


def flush(client: redis.Redis) -> None:
    """Delete the queue and every lock this run created, and nothing else."""
    client.delete(QUEUE)
    for pattern in (UNIQUE_KEYS, MARKER_KEYS, ONCE_KEYS, f"{SINGLETON_PREFIX}*"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        for start in range(0, len(keys), 1000):
            client.unlink(*keys[start : start + 1000])


def clean_up(client: redis.Redis) -> None:
    """At the end: :func:`flush`, then kombu's binding records of the benchmark queue."""
    flush(client)
    # Deleted only now: kombu's Redis transport finds the queue of a published
    # message through them, and declares them once per connection.
    client.delete(f"_kombu.binding.{QUEUE}", f"_kombu.binding_permanent.{QUEUE}")


# -- measuring ---------------------------------------------------------------


def time_calls(call: Callable[[int], Any], first: int, count: int) -> list[float]:
    """Time ``count`` calls one by one; return microseconds per call."""
    clock = time.perf_counter_ns
    samples = []
    for i in range(first, first + count):
        start = clock()
        call(i)
        samples.append((clock() - start) / 1000)
    return samples


def run_rounds(variants: list[Variant], client: redis.Redis, settings: Settings) -> None:
    """Run every variant ``settings.rounds`` times, rotating the order each round."""
    for variant in variants:  # warm-up: connections, script loads, caches
        variant.prepare()
        time_calls(variant.call, 10_000_000, max(2, 20 // variant.per_call))
    flush(client)
    next_arg = 0
    for round_no in range(settings.rounds):
        shift = round_no % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            variant.prepare()
            gc.collect()  # a collection inside one variant's calls would bias it
            batches = max(1, settings.calls // variant.per_call)
            samples = time_calls(variant.call, next_arg, batches)
            variant.samples += [sample / variant.per_call for sample in samples]
            next_arg += batches * variant.per_call
            # The queue and the locks are emptied after each batch, so Redis
            # memory and list length are the same for every variant.
            flush(client)


def per_call_us(fn: Callable[[], Any], calls: int, batches: int = 5) -> float:
    """Median over ``batches`` of the mean time of ``calls`` calls of ``fn``, in µs."""
    means = []
    for _ in range(batches):
        start = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter_ns() - start) / 1000 / calls)
    return statistics.median(means)


def key_derivation_in_calls(task: Any, client: redis.Redis, calls: int) -> float:
    """Median µs of the key derivation (``keys.lock_key``) inside ``calls`` real unique enqueues."""
    samples: list[float] = []
    derive = enqueue.lock_key
    clock = time.perf_counter_ns

    def timed(*args: Any) -> str:
        start = clock()
        key = derive(*args)
        samples.append((clock() - start) / 1000)
        return key

    enqueue.lock_key = timed  # where the enqueue looks it up, for this measurement
    try:
        for i in range(calls):
            task.apply_async((20_000_000 + i, "daily", "pdf"), unique=TTL)
    finally:
        enqueue.lock_key = derive
        flush(client)
    return statistics.median(samples)


def memory_per_lock(app: Celery, client: redis.Redis, task: Any, locks: int) -> tuple[float, int]:
    """Memory per lock, over ``locks`` locks with real keys and ids: two measures.

    ``MEMORY USAGE`` of one typical lock counts its key, value and object
    headers; the growth of ``INFO memory`` ``used_memory`` per lock also
    counts Redis's entries for it in its key table and its expiry table.
    """
    store = lock_store(app)
    flush(client)
    before = int(client.info("memory")["used_memory"])
    key = ""
    for i in range(locks):
        key = task.lock_key((i, "daily", "pdf"), None, {})
        store.acquire(key, uuid(), TTL * 1000)
    after = int(client.info("memory")["used_memory"])
    usage = int(client.memory_usage(key) or 0)
    flush(client)
    return (after - before) / locks, usage


# -- output ------------------------------------------------------------------


def machine(client: redis.Redis) -> list[str]:
    """Lines that say where the numbers come from."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import hiredis  # type: ignore[import-not-found,import-untyped,unused-ignore]  # noqa: F401
        parser = "hiredis"
    except ImportError:
        parser = "redis-py's pure-Python parser"
    return [
        f"machine: {os.cpu_count()} cores, {model}, {platform.system()} {platform.release()}",
        f"reply parser: {parser}",
        f"versions: Python {platform.python_version()}, Celery {celery.__version__}, "
        f"redis-py {redis.__version__}, Redis {client.info('server')['redis_version']}",
    ]


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    met = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    return f"target {sign} {target:g}: {'met' if met else 'NOT met'}"


def print_results(variants: list[Variant], settings: Settings, targets: dict[str, float]) -> None:
    plain = variants[0].median_us
    print(f"\nenqueue, {settings.rounds} rounds x {settings.calls} calls per variant, interleaved")
    print(f"{'variant':<18}{'median us':>11}{'p90 us':>10}{'calls/s':>10}{'vs plain':>10}")
    for v in variants:
        p90 = statistics.quantiles(v.samples, n=10)[-1] if len(v.samples) > 1 else v.samples[0]
        print(f"{v.name:<18}{v.median_us:>11.1f}{p90:>10.1f}{1e6 / v.median_us:>10.0f}"
              f"{plain / v.median_us:>10.2f}")
    print()
    # One machine-readable line per variant: throughput relative to plain.
    for v in variants:
        ratio = plain / v.median_us
        target = {**TARGETS, **targets}.get(v.name)
        note = f" ({verdict(ratio, target)})" if target else ""
        print(f"ratio {v.name}: {ratio:.2f}{note}")
    unique = {v.name: v.median_us for v in variants}
    for mine in ("unique", "unique+transport"):
        for other in ("celery-once", "celery-singleton"):
            if mine in unique and other in unique:
                faster = unique[mine] < unique[other]
                print(f"{mine} vs {other}: {unique[other] / unique[mine]:.2f}x "
                      f"({'faster' if faster else 'NOT faster'})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.enqueue", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few hundred calls, for a smoke test")
    parser.add_argument("--rounds", type=int, help="rounds of interleaved variants")
    parser.add_argument("--calls", type=int, help="timed calls per variant per round")
    parser.add_argument("--pin", action="store_true", help="run client and its redis-server on one CPU")
    parser.add_argument(
        "--latency-us", type=float, default=None, metavar="US",
        help="put a latency proxy adding US microseconds each way between every client and Redis",
    )
    ns = parser.parse_args(argv)
    settings = QUICK if ns.quick else FULL
    settings = Settings(
        rounds=ns.rounds or settings.rounds,
        calls=ns.calls or settings.calls,
        memory_locks=settings.memory_locks,
        key_calls=settings.key_calls,
    )

    with redis_url(ns.pin, ns.latency_us, max(settings.key_calls // 10, 50)) as url:
        client = redis.Redis.from_url(url)
        app = make_app(url)
        try:
            for line in machine(client):
                print(line)
            variants = core_variants(app)
            variants.append(checked_duplicate_variant(url))
            variants += batch_variants(app)
            variants += transport_variants(url)
            variants += optional_variants(app, client)
            run_rounds(variants, client, settings)
            print_results(variants, settings, NETWORK_TARGETS if ns.latency_us else {})
            microbenchmarks(app, client, settings)
        finally:
            clean_up(client)
            client.close()
    return 0


def microbenchmarks(app: Celery, client: redis.Redis, settings: Settings) -> None:
    """Key derivation, one lock-store round trip and memory per lock."""
    task = app.tasks["benchmarks.unique_report"]
    small = per_call_us(lambda: task.lock_key((42, "daily", "pdf"), None, {}), settings.key_calls)
    in_calls = key_derivation_in_calls(task, client, max(settings.key_calls // 10, 50))
    # The same without defaults to leave out, then off the JSON fast path:
    # int dict keys (JSON's exact path) and the pickle serializer.
    fresh = per_call_us(lambda: task.lock_key((42, "weekly", "csv"), None, {}), settings.key_calls)
    int_keys = per_call_us(lambda: task.lock_key((42, {1: "a", 2: "b"}, "csv"), None, {}), settings.key_calls)
    pickled = per_call_us(
        lambda: task.lock_key((42, "weekly", "csv"), None, {"serializer": "pickle"}), settings.key_calls
    )
    big_arg = "0123456789abcdef" * (1024 * 1024 // 16)  # 1 MiB of text
    big_calls = max(settings.key_calls // 1000, 5)
    big = per_call_us(lambda: task.lock_key((42, big_arg, "pdf"), None, {}), big_calls)
    store = lock_store(app)
    key = task.lock_key((-3, "daily", "pdf"), None, {})
    holder = uuid()
    acquire = per_call_us(lambda: store.acquire(key, holder, TTL * 1000), settings.key_calls // 4)
    ping = per_call_us(client.ping, settings.key_calls // 4)
    per_lock = memory_per_lock(app, client, task, settings.memory_locks)
    print()
    print(f"key derivation, 3 small args, inside real apply_async calls: {in_calls:.1f} us "
          f"({verdict(in_calls, TARGETS['key_small_us'], False)})")
    print(f"key derivation, 3 small args, lock_key() in a loop: {small:.1f} us")
    print(f"key derivation, 3 small args, none at its default: {fresh:.1f} us")
    print(f"key derivation, a dict with int keys (JSON exact path): {int_keys:.1f} us")
    print(f"key derivation, 3 small args, pickle serializer: {pickled:.1f} us")
    print(f"key derivation, 1 MiB argument: {big:.0f} us")
    print(f"lock store round trip (LockStore.acquire, lock held by caller): {acquire:.1f} us")
    print(f"redis PING round trip: {ping:.1f} us")
    growth, usage = per_lock
    print(f"redis memory per lock: MEMORY USAGE {usage} bytes "
          f"({verdict(usage, TARGETS['bytes_per_lock'], False)}); used_memory growth {growth:.0f} bytes "
          f"per lock over {settings.memory_locks} locks (with the key and expiry table entries)")


if __name__ == "__main__":
    sys.exit(main())
