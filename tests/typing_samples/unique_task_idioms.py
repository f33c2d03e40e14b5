# pyright: strict
"""The README's idioms with tasks made by ``unique_task``, for tests/test_typing.py.

Checked as readme_idioms.py is. ``unique_task`` types the task whether or not
celery-types is installed, so the unique options are checked in all four
checks; only Celery's own objects stay untyped without celery-types.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery import Celery  # error: pyright-nostubs

from celery_unique import (
    DuplicateTaskError,
    UniqueLocks,
    UniqueSignature,
    UniqueTask,
    send_unique,
    unique_task,
)
from celery_unique.contrib.django import UniqueDjangoTask

app = Celery("proj", broker="redis://localhost:6379/0")


@unique_task(app)
def send_report(user_id: int, period: str = "daily") -> None:
    pass


@unique_task(app, unique=600, unique_until="finish", unique_on=["user_id"], queue="reports")
def refresh(user_id: int, force: bool = False) -> None:
    pass


@unique_task(base=UniqueDjangoTask, unique=300)  # shared_task
def send_receipt(order_id: int) -> None:
    pass


class ByHost(UniqueTask):
    def unique_identity(self, arguments: dict[str, Any]) -> Any:
        return str(arguments["url"]).lower()


@unique_task(app, base=ByHost, unique=60)
def crawl(url: str) -> None:
    pass


r = send_report.apply_async((42,), unique=3600)
try:
    send_report.apply_async((42,), unique=timedelta(hours=1), on_duplicate="raise")
except DuplicateTaskError as e:
    holder: str = e.task_id
    key: str = e.key
result_id: str = r.id  # error: pyright-nostubs
refresh.delay(7)
by_host: ByHost = crawl
crawl.delay("https://example.com/a")

sig: UniqueSignature = send_report.s(42).set(unique=60, unique_until="start")
sig.apply_async(on_duplicate="existing")
send_report.apply_async((42,), unique=60, unique_on={"user_id"})
send_report.signature((42,), {"period": "weekly"}, unique=60).delay()
send_receipt.delay_on_commit(7)
send_receipt.apply_async_on_commit((7,), on_duplicate="raise")

locks = UniqueLocks(app)
held: str | None = locks.is_locked(send_report, (42,))
send_unique(app, "billing.charge", (7,), {"cents": 100}, unique=600, queue="billing")

# The options are typed in all four checks.
send_report.apply_async((42,), unique="60")  # error: all ["unique"]
send_report.apply_async((42,), unique_until="finsh")  # error: all [finsh]
send_report.s(42).set(on_duplicate="skip")  # error: all [skip]
send_report.signature((42,), unique_on=42)  # error: all ["unique_on"]
send_report.apply_async((42,), unique_on={"user_id": 1}.keys())  # error: all ["unique_on"]


@unique_task(app, unique_until="finsh")  # error: pyright-stubs, pyright-nostubs [finsh]; mypy-stubs, mypy-nostubs
def misspelt() -> None:
    pass
