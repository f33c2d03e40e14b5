"""``UniqueTask``: a Celery task base class whose ``apply_async`` takes a lock first."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import redis
from celery import Task
from celery.result import AsyncResult
from kombu.utils.uuid import uuid

from .config import UniqueConfig, app_state
from .errors import DuplicateTaskError, LockStoreError
from .keys import call_digest, format_key
from .lock import LockStore
from .options import (
    ON_DUPLICATE,
    OPTION_NAMES,
    UNTIL,
    OnDuplicate,
    UniqueOptions,
    Until,
    check_choice,
    check_unique_on,
)
from .signals import LOCK_HEADER, UNTIL_HEADER, task_duplicate
from .ttl import delay_ms, ttl_ms

__all__ = ["LOCK_HEADER", "UniqueTask"]

logger = logging.getLogger(__name__)

_UNSET: Any = object()
# The header Celery beat puts on the tasks it sends.
_BEAT_HEADER = "celery_beat_task"


class UniqueTask(Task):  # type: ignore[misc]
    """A task that can be enqueued only while the same task is not queued.

    ``apply_async(..., unique=ttl)`` (or ``@app.task(base=UniqueTask,
    unique=ttl)`` for every call) takes a Redis lock named after the task, its
    bound arguments and its routed queue, held by the new task's id for ``ttl``
    seconds (a number or a ``timedelta``, at least 1 second). While another
    task id holds it, the call raises :class:`~celery_unique.DuplicateTaskError`
    and publishes nothing. By default the lock is released when the task
    succeeds, or is revoked or expires; otherwise its TTL frees it.

    The other options, per call or as task attributes, are ``unique_on``,
    ``unique_until`` and ``on_duplicate`` (see the README).
    """

    #: Default lock TTL for every call; ``None`` means unique only when asked.
    unique: float | timedelta | None = None
    #: Names of the parameters that make up the key; ``None`` means all.
    unique_on: Sequence[str] | None = None
    #: When the lock is released: "success", "finish" or "start".
    unique_until: Until | None = None
    #: What a duplicate does: "raise" or "existing" (return the holder's result).
    on_duplicate: OnDuplicate | None = None

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
        requested = {name: options.pop(name) for name in OPTION_NAMES if name in options}
        ttl = requested.get("unique", self.unique)
        # A retry re-enqueues the task under its own id, carrying the lock
        # header from its request: as in Asynq, it keeps the lock it has and
        # is never checked again (a retry must not fail as its own duplicate).
        if ttl is None or options.get("retries"):
            return self._publish(args, kwargs, task_id, producer, link, link_error, shadow, options)

        app = self._get_app()
        state = app_state(app)
        unique = self._resolve_options(ttl, requested, state.config)
        key = self._lock_key(args, kwargs, options, unique.unique_on, state.config)
        lock_ttl_ms = unique.ttl_ms
        countdown, eta = options.get("countdown"), options.get("eta")
        if countdown or eta:
            lock_ttl_ms += delay_ms(app.now(), countdown, eta)
        # The lock's value is the task id, so the id must exist before the lock.
        task_id = task_id or uuid()
        headers = dict(options.get("headers") or ())
        from_beat = bool(headers.get(_BEAT_HEADER))
        headers[LOCK_HEADER] = key
        if unique.until != "success":
            headers[UNTIL_HEADER] = unique.until
        options["headers"] = headers

        store = state.store
        holder = self._acquire(store, key, task_id, lock_ttl_ms)
        if holder is not None:
            return self._on_duplicate(unique, holder, key, args, kwargs, from_beat)
        try:
            return self._publish(args, kwargs, task_id, producer, link, link_error, shadow, options)
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
        unique_on: Sequence[str] | None = _UNSET,
    ) -> str:
        """Return the lock key for a call: task name, routed queue and arguments.

        ``unique_on`` defaults to the task's; pass ``None`` for all arguments.
        """
        if unique_on is _UNSET:
            unique_on = check_unique_on(self.name, self.unique_on)
        config = app_state(self._get_app()).config
        return self._lock_key(args, kwargs, options, unique_on, config)

    def _lock_key(
        self,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        options: Mapping[str, Any],
        unique_on: Sequence[str] | None,
        config: UniqueConfig,
    ) -> str:
        digest = call_digest(self, args, kwargs, unique_on, options)
        queue = self._routed_queue(args, kwargs, options, config.default_queue)
        return format_key(config.key_prefix, queue, self.name, digest)

    def unique_identity(self, arguments: dict[str, Any]) -> Any:
        """Return what identifies a call among calls of this task.

        ``arguments`` maps parameter names to the values the call passes
        (pydantic models dumped as Celery sends them), leaving out every
        parameter left at its default or passed a value equal to it, after
        ``unique_on`` kept the named ones: read a parameter that has a default
        with ``arguments.get(name, default)``. The result is encoded
        canonically as the task's serializer sends it, and hashed into the
        lock key. Override it to compute the identity yourself, e.g.
        ``return arguments["url"].lower()``.
        """
        return arguments

    def _publish(
        self,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        task_id: str | None,
        producer: Any,
        link: Any,
        link_error: Any,
        shadow: str | None,
        options: dict[str, Any],
    ) -> AsyncResult:
        return super().apply_async(
            args, kwargs, task_id, producer, link, link_error, shadow, **options
        )

    def _resolve_options(
        self, ttl: Any, requested: Mapping[str, Any], config: UniqueConfig
    ) -> UniqueOptions:
        # Per call, then task attribute, then app setting, then default.
        until = requested.get("unique_until") or self.unique_until or config.until
        on_duplicate = requested.get("on_duplicate") or self.on_duplicate or config.on_duplicate
        unique_on = requested.get("unique_on", self.unique_on)
        return UniqueOptions(
            ttl_ms=ttl_ms(self.name, ttl),
            unique_on=check_unique_on(self.name, unique_on),
            until=check_choice(self.name, "unique_until", until, UNTIL),
            on_duplicate=check_choice(self.name, "on_duplicate", on_duplicate, ON_DUPLICATE),
        )

    def _on_duplicate(
        self,
        unique: UniqueOptions,
        holder: str,
        key: str,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        from_beat: bool,
    ) -> AsyncResult:
        task_duplicate.send(sender=self, key=key, task_id=holder, args=args, kwargs=kwargs)
        logger.info(
            "celery_unique: refused duplicate of %s: task %s holds lock %s", self.name, holder, key
        )
        # Beat would log a duplicate as a scheduling ERROR with a traceback on
        # every tick; for beat a duplicate is expected, so it is only logged.
        if unique.on_duplicate == "existing" or from_beat:
            return self.AsyncResult(holder)
        raise DuplicateTaskError(self.name, holder, key)

    def _routed_queue(
        self,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        options: Mapping[str, Any],
        default_queue: str,
    ) -> str:
        # The queue Celery will publish to: the queue option, then the task's
        # queue attribute, then task_routes, then task_default_queue. route()
        # pops from the dict it is given, so it gets a fresh one.
        app = self._get_app()
        router = app.amqp.router
        if not router.routes:
            # Without task_routes the router would only pick the first of
            # these; skipping it saves a third of the key's cost.
            queue = (
                options.get("queue")
                or self._get_exec_options().get("queue")
                or default_queue
            )
            return str(getattr(queue, "name", queue))
        route = router.route(
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
            # A timed-out SET may still be applied once the server catches up;
            # this id is never published, so an owner-checked release is always
            # safe. It runs in the background: against a stalled server it
            # would wait out a second timeout before the caller heard of it.
            threading.Thread(
                target=_release_quietly, args=(store, key, task_id),
                name="celery-unique-cleanup", daemon=True,
            ).start()
            raise LockStoreError(self.name, key, f"{type(exc).__name__}: {exc}") from exc


def _release_quietly(store: LockStore, key: str, task_id: str) -> None:
    try:
        store.release(key, task_id)
    except redis.RedisError as exc:
        logger.warning(
            "celery_unique: could not release lock %s of unpublished task %s (%s); "
            "its TTL will free it", key, task_id, exc,
        )
