"""Exceptions raised by celery_unique.

Every error derives from :class:`UniqueTaskError`, so ``except UniqueTaskError``
catches all of them. Each one keeps the values it was built from as attributes
and as its ``args``, so it rebuilds as an equal error from a pickle and from a
result backend's JSON (``cls(*args)``): Celery ships exceptions raised inside
workers (a duplicate raised by a chain link, for instance) back to callers.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "DuplicateTaskError",
    "InvalidCallError",
    "JoinError",
    "LockStoreError",
    "UniqueTaskError",
    "UniqueTypeError",
    "UniqueValueError",
]


class UniqueTaskError(Exception):
    """The root of every error this library raises."""


class InvalidCallError(UniqueTaskError):
    """A unique call was refused before anything was locked or published.

    Its message names the task and the offending option or argument. It is
    raised as :class:`UniqueTypeError` or :class:`UniqueValueError`, which are
    also a ``TypeError`` and a ``ValueError``, as Python's own checks are.
    """


class UniqueTypeError(InvalidCallError, TypeError):
    """An option or argument of a unique call has the wrong type, or no canonical form."""


class UniqueValueError(InvalidCallError, ValueError):
    """An option or argument of a unique call has a value out of range."""


class ConfigurationError(UniqueTaskError):
    """The app's settings do not say where the lock store is, or say it wrongly."""


class DuplicateTaskError(UniqueTaskError):
    """The call's lock is held: the same call was enqueued and has not yet let go.

    The holder may be queued, running, or finished without releasing (a final
    failure waits out its TTL under ``unique_until="success"``). ``task_id``
    is the holder's id, ``key`` the Redis key of the lock and ``task_name``
    the name of the task that was refused.
    """

    def __init__(self, task_name: str, task_id: str, key: str) -> None:
        super().__init__(task_name, task_id, key)
        self.task_name = task_name
        self.task_id = task_id
        self.key = key

    def __str__(self) -> str:
        return f"{self.task_name}: duplicate refused, task {self.task_id} holds the lock {self.key}"


class JoinError(UniqueTaskError):
    """A call that joined its holder (``on_duplicate="join"``) found no result to go on with.

    The holder ``task_id`` let go of the lock ``key`` without a final state in
    the result backend (its results are ignored, or expired, or it ended
    with ``Ignore``). ``task_name`` is the joined call's task.
    """

    def __init__(self, task_name: str, task_id: str, key: str) -> None:
        super().__init__(task_name, task_id, key)
        self.task_name = task_name
        self.task_id = task_id
        self.key = key

    def __str__(self) -> str:
        return (
            f"{self.task_name}: cannot join task {self.task_id}: it let go of the lock {self.key} "
            "without a stored result"
        )


class LockStoreError(UniqueTaskError):
    """The lock store could not be reached; the Redis error is ``__cause__``.

    Nothing was published when this is raised at enqueue. ``task_name`` and
    ``key`` say what was being done: at enqueue, the task and its lock; in the
    lock admin, the task filter (empty for every task) and the key or the key
    pattern. ``node`` names the server that failed when the store has several
    (a Redis Cluster), else it is ``None``.
    """

    def __init__(self, task_name: str, key: str, reason: str, node: str | None = None) -> None:
        # ``args`` rebuild the error (pickle, a result backend's JSON); three of
        # them when there is no node, as before ``node`` existed.
        super().__init__(task_name, key, reason, *(() if node is None else (node,)))
        self.task_name = task_name
        self.key = key
        self.reason = reason
        self.node = node

    @classmethod
    def from_error(cls, task_name: str, key: str, exc: BaseException) -> LockStoreError:
        """The error for ``exc``, a Redis error: its type and message are the reason."""
        return cls(task_name, key, f"{type(exc).__name__}: {exc}")

    def __str__(self) -> str:
        task = f"{self.task_name}: " if self.task_name else ""
        node = f" (node {self.node})" if self.node else ""
        return f"{task}the lock store did not answer for lock {self.key}{node}: {self.reason}"
