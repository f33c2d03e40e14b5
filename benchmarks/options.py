"""What the per-call option checks cost: the misspelt-option check and the locking switch.

Run ``python -m benchmarks.options [--quick]``. Each figure is the best of 7
runs of 1,000,000 calls (1,000 with ``--quick``, a smoke run), in nanoseconds
per call; nothing touches Redis (the lock store's URL points at a closed port,
and neither check connects).
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable
from typing import Any

from celery import Celery

from celery_unique import UniqueTask
from celery_unique.option_names import check_option_names
from celery_unique.switch import unlock_if_disabled
from celery_unique.testing import locking_disabled

OPTIONS: dict[str, dict[str, Any]] = {
    "no options": {},
    "unique=60": {"unique": 60},
    "unique, queue, countdown": {"unique": 60, "queue": "q", "countdown": 5},
    "8 options": {
        "unique": 60, "queue": "q", "countdown": 5, "priority": 3, "headers": {},
        "expires": 10, "unique_on": ("x",), "on_duplicate": "existing",
    },
    "an unknown property": {"unique": 60, "my_trace_id": "t"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 calls a run: a smoke run")
    calls = 1_000 if parser.parse_args().quick else 1_000_000

    def per_call_ns(call: Callable[[], Any]) -> float:
        return min(timeit.repeat(call, number=calls, repeat=7)) / calls * 1e9

    app = Celery("bench", broker="memory://", set_as_current=False)
    app.conf.unique_redis_url = "redis://127.0.0.1:1/0"

    @app.task(base=UniqueTask, name="bench.options", shared=False)
    def bench(x: int) -> int:
        return x

    task = app.tasks["bench.options"]
    name = task.name
    rows = [("an empty call, for scale", per_call_ns(lambda: None))]
    for label, options in OPTIONS.items():
        ns = per_call_ns(lambda o=options: check_option_names(name, o))
        rows.append((f"check_option_names, {label}", ns))
    # A fresh options dict per call (the switch rewrites it), as apply_async has.
    on = per_call_ns(lambda: unlock_if_disabled(task, {"unique": 60}))
    with locking_disabled(app):
        off = per_call_ns(lambda: unlock_if_disabled(task, {"unique": 60}))
    rows += [("unlock_if_disabled, locking on", on), ("unlock_if_disabled, locking off", off)]
    width = max(len(label) for label, _ in rows)
    for label, ns in rows:
        print(f"{label:{width}}  {ns:6.0f} ns")


if __name__ == "__main__":
    main()
