"""Unique tasks for Celery: enqueue a task only if the same task is not queued.

>>> @app.task(base=UniqueTask)
... def send_report(user_id): ...
>>> send_report.apply_async((42,), unique=3600)  # DuplicateTaskError if queued
"""

from __future__ import annotations

from .admin import LockInfo, LockStatus, UniqueLocks
from .bulk import apply_many, fan_out
from .decorator import unique_task
from .errors import (
    ConfigurationError,
    DuplicateTaskError,
    InvalidCallError,
    JoinError,
    LockStoreError,
    UniqueTaskError,
    UniqueTypeError,
    UniqueValueError,
)
from .events import lock_released, lock_taken_over, task_duplicate
from .send import send_unique
from .task import LOCK_HEADER, UniqueTask
from .typed import UniqueSignature
from .worker import UniqueRequest

__all__ = [
    "LOCK_HEADER",
    "ConfigurationError",
    "DuplicateTaskError",
    "InvalidCallError",
    "JoinError",
    "LockInfo",
    "LockStatus",
    "LockStoreError",
    "UniqueLocks",
    "UniqueRequest",
    "UniqueSignature",
    "UniqueTask",
    "UniqueTaskError",
    "UniqueTypeError",
    "UniqueValueError",
    "__version__",
    "apply_many",
    "fan_out",
    "lock_released",
    "lock_taken_over",
    "send_unique",
    "task_duplicate",
    "unique_task",
]

__version__ = "0.1.0"
