"""Prometheus counters of lock events, by task name, when ``prometheus_client`` is installed.

``pip install 'celery-unique[prometheus]'`` adds it. The counters live in
``prometheus_client``'s default registry, so whatever exports that registry
(``start_http_server``, a web framework's ``/metrics`` view, the multiprocess
collector of a prefork worker) exports them too. Without ``prometheus_client``
each function here does nothing.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["refused", "released", "replaced", "store_error", "taken", "taken_over", "unlocked"]

Count = Callable[[str], None]


def _nothing(task_name: str) -> None:
    pass


def _counters() -> tuple[Count, Count, Count, Count, Count, Count, Count]:
    try:
        from prometheus_client import Counter
    except ImportError:
        return (_nothing,) * 7

    def counter(name: str, documentation: str) -> Count:
        made = Counter(f"celery_unique_{name}", documentation, ["task"])
        return lambda task_name: made.labels(task_name).inc()

    return (
        counter("taken", "Unique calls that took their lock"),
        counter("refused", "Unique calls refused as duplicates"),
        counter("released", "Locks released"),
        counter("taken_over", "Locks of finished holders taken over or reaped"),
        counter("store_errors", "Lock-store calls that failed"),
        counter("unlocked", "Unique calls published without a lock after a lock-store error"),
        counter("replaced", "Queued holders replaced by a later call (on_duplicate='replace')"),
    )


taken, refused, released, taken_over, store_error, unlocked, replaced = _counters()
