"""Canvases and refusals: what a refused step becomes, and where a replacement's lock goes."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from celery import Task
from celery.app.task import Context
from celery.backends.base import DisabledBackend

from .errors import DuplicateTaskError

__all__ = ["record_refusal", "replacement_of"]

logger = logging.getLogger(__name__)


def record_refusal(
    task: Task,
    task_id: str,
    error: DuplicateTaskError,
    args: Any,
    kwargs: Any,
    options: Mapping[str, Any],
    link: Any,
    link_error: Any,
) -> None:
    """Store the refused call ``task_id`` as failed with ``error``, as Celery stores a failed task.

    Celery then fails the later steps of its chain, counts it as a failed
    member of its chord and calls its errbacks, so a canvas waiting on it
    hears of the refusal at once instead of waiting for ever.
    """
    backend = task.backend
    if isinstance(backend, DisabledBackend):
        return
    request = Context(
        id=task_id,
        task=task.name,
        args=list(args or ()),
        kwargs=dict(kwargs or {}),
        chain=options.get("chain"),
        chord=options.get("chord"),
        group=options.get("group_id"),
        group_index=options.get("group_index"),
        root_id=options.get("root_id"),
        parent_id=options.get("parent_id"),
        callbacks=link,
        errbacks=link_error,
        headers=options.get("headers"),
        delivery_info={"routing_key": options.get("routing_key"), "priority": options.get("priority")},
    )
    try:
        backend.mark_as_failure(task_id, error, request=request)
    except Exception as exc:  # a backend that is down must not hide the refusal
        logger.warning(
            "celery_unique: could not record refused task %s[%s] as failed (%r)", task.name, task_id, exc
        )


def replacement_of(sig: Any, task_id: str) -> Any:
    """The signature of a replacement canvas that runs under the replaced ``task_id``.

    ``Task.replace()`` freezes the replacement with the replaced task's id
    (a chain's last task, a chord's body), then appends the rest of the
    replaced task's own chain, whose steps keep their ids: the lock goes to
    the step that carries ``task_id``, not to the last one.
    """
    from celery.canvas import _chain, chord

    if isinstance(sig, _chain):
        for task in sig.tasks:
            found = replacement_of(task, task_id)
            if found is not None:
                return found
        return None
    if isinstance(sig, chord):
        return replacement_of(sig.body, task_id)
    return sig if sig.options.get("task_id") == task_id else None
