"""``UniqueTask``: a Celery task base class whose ``apply_async`` takes a lock first."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import redis
from celery import Task
from celery.result import AsyncResult
from kombu.utils.uuid import uuid

from . import signals
from .config import app_state
from .errors import DuplicateTaskError, LockStoreError
from .keys import argument_digest, bind_arguments, format_key
from .lock import LockStore
from .ttl import delay_ms, ttl_ms

__all__ = ["LOCK_HEADER", "UniqueTask"]

logger = logging.getLogger(__name__)

#: The message header that carries a task's lock key to the worker.
LOCK_HEADER = signals.LOCK_HEADER

_UNSET: Any = object()


class UniqueTask(Task):  # type: ignore[misc]
    """A task that can be enqueued only while the same task is not queued.

    ``apply_async(..., unique=ttl)`` (or ``@app.task(base=UniqueTask,
    unique=ttl)`` for every call) takes a Redis lock named after the task, its
    bound arguments and its routed queue, held by the new task's id for ``ttl``
    seconds (a number or a ``timedelta``, at least 1 second). While another
    task id holds it, the call raises :class:`~celery_unique.DuplicateTaskError`
    and publishes nothing. The lock is released when the task succeeds, or is
    revoked or expires; otherwise its TTL frees it.
    """

    #: Default lock TTL for every call; ``None`` means unique only when asked.
    unique: float | timedelta | None = None

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Take the task's lock, then publish it as ``Task.apply_async`` does.

        ``unique=`` (seconds or ``timedelta``) overrides the task's default
        TTL, and ``unique=None`` turns locking off for this call.
        """
        ttl = options.pop("unique", _UNSET)
        if ttl is _UNSET:
            ttl = self.unique
        if ttl is None:
            return super().apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow, **options
            )

        lock_ttl_ms = ttl_ms(self.name, ttl)
        key = self.lock_key(args, kwargs, options)
        lock_ttl_ms += delay_ms(self._get_app().now(), options.get("countdown"), options.get("eta"))
        # The lock's value is the task id, so the id must exist before the lock.
        task_id = task_id or uuid()
        options["headers"] = {**(options.get("headers") or {}), LOCK_HEADER: key}

        store = app_state(self._get_app()).store
        holder = self._acquire(store, key, task_id, lock_ttl_ms)
        if holder is not None:
            logger.info(
                "celery_unique: refused duplicate of %s: task %s holds lock %s",
                self.name, holder, key,
            )
            raise DuplicateTaskError(self.name, holder, key)
        try:
            return super().apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow, **options
            )
        except BaseException:
            # No lock without a published task: whatever stopped the publish
            # (broker down, serializer error, Ctrl-C), give the lock back.
            _release_quietly(store, key, task_id)
            raise

    def lock_key(
        self,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        options: Mapping[str, Any],
    ) -> str:
        """Return the lock key for a call: task name, routed queue and arguments."""
        arguments = self._bound_arguments(args, kwargs)
        digest = argument_digest(self.name, arguments)
        config = app_state(self._get_app()).config
        return format_key(config.key_prefix, self._routed_queue(args, kwargs, options), self.name, digest)

    def _bound_arguments(
        self, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        signature = self._run_signature()
        try:
            return bind_arguments(signature, args, kwargs, strict=bool(self.typing))
        except TypeError as exc:
            raise TypeError(f"{self.name}: {exc}") from None

    def _run_signature(self) -> inspect.Signature | None:
        # Tasks are one instance per app, so the signature is worked out once.
        try:
            return self.__dict__["_unique_signature"]  # type: ignore[no-any-return]
        except KeyError:
            pass
        try:
            signature: inspect.Signature | None = inspect.signature(self.run)
        except (TypeError, ValueError):
            signature = None
        self.__dict__["_unique_signature"] = signature
        return signature

    def _routed_queue(
        self,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        options: Mapping[str, Any],
    ) -> str:
        # The queue Celery will publish to: the queue option, then the task's
        # queue attribute, then task_routes, then task_default_queue. route()
        # pops from the dict it is given, so it gets a fresh one.
        app = self._get_app()
        route = app.amqp.router.route(
            dict(self._get_exec_options(), **options), self.name, args, kwargs, self
        )
        queue = route.get("queue")
        if queue is not None:
            return str(queue.name)
        return str(route.get("routing_key") or "")

    def _acquire(self, store: LockStore, key: str, task_id: str, ttl: int) -> str | None:
        try:
            return store.acquire(key, task_id, ttl)
        except redis.RedisError as exc:
            # A timed-out SET may still have been applied; this id was never
            # published, so an owner-checked release is always safe.
            _release_quietly(store, key, task_id)
            raise LockStoreError(self.name, key, f"{type(exc).__name__}: {exc}") from exc


def _release_quietly(store: LockStore, key: str, task_id: str) -> None:
    try:
        store.release(key, task_id)
    except redis.RedisError as exc:
        logger.warning(
            "celery_unique: could not release lock %s of unpublished task %s (%s); "
            "its TTL will free it", key, task_id, exc,
        )
