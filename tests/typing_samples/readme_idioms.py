# pyright: strict
"""The README's idioms as a user's module would write them, for tests/test_typing.py.

Never imported: test_typing.py type-checks it with mypy --strict and strict
pyright, with and without celery-types. A trailing comment ``error:
<checks>`` names the checks that must report an error on its line (``all``, or
``mypy``/``pyright`` with ``-stubs`` or ``-nostubs``), and ``[text]`` what
the error must say; every other line must be clean. Without celery-types
Celery is untyped: mypy sees ``app.task`` as untyped and its tasks as
``Any``, and pyright ignores the decorator and sees a plain function.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery import Celery, chain, signature  # error: pyright-nostubs
from celery.result import AsyncResult  # error: pyright-nostubs

from celery_unique import (
    DuplicateTaskError,
    LockInfo,
    LockStatus,
    UniqueLocks,
    UniqueSignature,
    UniqueTask,
    send_unique,
)

app = Celery("proj", broker="redis://localhost:6379/0")
app.conf.unique_redis_url = "redis://localhost:6379/1"  # error: pyright-nostubs


@app.task(base=UniqueTask)  # error: mypy-nostubs, pyright-nostubs
def send_report(user_id: int, period: str = "daily") -> None:
    pass


@app.task(base=UniqueTask, unique=600)  # error: mypy-nostubs, pyright-nostubs
def refresh(user_id: int) -> None:
    pass


# Quick start
r = send_report.apply_async((42,), unique=3600)  # error: pyright-nostubs
try:
    send_report.apply_async((42,), unique=3600)  # error: pyright-nostubs
except DuplicateTaskError as e:
    holder: str = e.task_id
    key: str = e.key
    task_name: str = e.task_name
result_id: str = r.id
queued: AsyncResult[Any] = refresh.delay(7)  # error: pyright-nostubs

# Options, per call
send_report.apply_async((42,), unique=timedelta(hours=1), on_duplicate="existing")  # error: pyright-nostubs
send_report.apply_async((42,), unique=60, unique_until="finish", unique_on=("user_id",))  # error: pyright-nostubs
send_report.apply_async((42,), unique=None)  # error: pyright-nostubs

# Signatures and canvas
send_report.s(42).set(unique=60).apply_async()  # error: pyright-nostubs
send_report.signature((42,), unique=60, unique_on="user_id").delay()  # error: pyright-nostubs
step = send_report.si(42).set(queue="reports").set(unique=60, unique_until="start")  # error: pyright-nostubs
chain(step, refresh.s(7)).apply_async()  # error: pyright-nostubs

# A signature by name is Celery's own, whose set() celery-types types without
# the unique options; UniqueSignature is the typed way to make one.
signature("proj.send_report", (42,)).set(unique=60)  # error: mypy-stubs, pyright-stubs [unique]; pyright-nostubs
by_name: UniqueSignature = UniqueSignature("proj.send_report", (42,)).set(unique=60)
by_name.apply_async(unique_until="finish")

# send_task by name, and the lock admin
send_unique(app, "billing.charge", (7,), {"cents": 100}, unique=600, queue="billing")
send_unique(app, "billing.charge", (7,), unique=600, unique_until="finish", on_duplicate="existing")
locks = UniqueLocks(app)
listed: list[LockInfo] = locks.list(task_name=None, queue=None)
described: list[LockStatus] = locks.describe(task_name="proj.send_report")
how_many: int = locks.count(queue="celery")
held: str | None = locks.is_locked(send_report, (42,))  # error: pyright-nostubs
released: bool = locks.release("unique:celery:proj.send_report:digest")
cleared: int = locks.clear(task_name="proj.send_report")

# The options are typed: a wrong value is an error wherever the task is typed.
send_report.apply_async((42,), unique="60")  # error: mypy-stubs, pyright-stubs ["unique"]; pyright-nostubs
send_report.apply_async((42,), unique_until="finsh")  # error: mypy-stubs, pyright-stubs [finsh]; pyright-nostubs
send_report.s(42).set(on_duplicate="skip")  # error: mypy-stubs, pyright-stubs [skip]; pyright-nostubs
send_unique(app, "billing.charge", unique_until="finsh")  # error: all [finsh]
