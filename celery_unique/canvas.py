"""Canvases and refusals: what a refused step becomes, and where a replacement's lock goes."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

from celery.app.task import Context
from celery.backends.base import DisabledBackend

from .errors import DuplicateTaskError

if TYPE_CHECKING:
    from .call import Call

__all__ = ["in_hand_over", "record_refusal", "replacement_of"]

logger = logging.getLogger(__name__)


def record_refusal(call: Call, error: DuplicateTaskError) -> None:
    """Store the refused ``call`` as failed with ``error``, as Celery stores a failed task.

    Celery then fails the later steps of its chain, counts it as a failed
    member of its chord and calls its errbacks, so a canvas waiting on it
    hears of the refusal at once instead of waiting for ever.
    """
    task, task_id, options = call.task, call.lock_id, call.options
    backend = task.backend
    if isinstance(backend, DisabledBackend):
        return
    request = Context(
        id=task_id,
        task=task.name,
        args=list(call.args or ()),
        kwargs=dict(call.kwargs or {}),
        chain=options.get("chain"),
        chord=options.get("chord"),
        group=options.get("group_id"),
        group_index=options.get("group_index"),
        root_id=options.get("root_id"),
        parent_id=options.get("parent_id"),
        callbacks=call.link,
        errbacks=call.link_error,
        headers=options.get("headers"),
        delivery_info={"routing_key": options.get("routing_key"), "priority": options.get("priority")},
        # Where an rpc:// backend sends the refused call's result: the queue
        # of the caller that waits on it (Celery freezes canvas members with
        # it), else this process's own.
        reply_to=options.get("reply_to") or task._get_app().thread_oid,
        correlation_id=task_id,
    )
    try:
        backend.mark_as_failure(task_id, error, request=request)
    except Exception as exc:  # a backend that is down must not hide the refusal
        logger.warning(
            "celery_unique: could not record refused task %s[%s] as failed (%r)", task.name, task_id, exc
        )


def in_hand_over(app: Any) -> bool:
    """Whether this call is a worker handing a canvas on after a task's body returned.

    Celery sends a task's callbacks, its chain's next step and its chord's
    body after the body returns, inside its trace (and errbacks as it records
    a failure). Walking up from here, such a call reaches Celery's tracer
    without passing through the body; a call the body makes passes through it.
    """
    from .worker import failing_request

    if failing_request() is not None:
        return True  # the main process records a dead task's failure and calls its errbacks
    task = app.current_task
    if task is None or getattr(task.request, "called_directly", True):
        return False
    run = getattr(task.run, "__func__", task.run)
    body = getattr(run, "__code__", None)
    frame = sys._getframe(1)
    for _ in range(256):
        if frame is None:
            return False
        code = frame.f_code
        if code is body:
            return False
        if code.co_name == "trace_task" and code.co_filename == _TRACE_FILE:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _trace_file() -> str:
    from celery.app import trace

    return str(trace.__file__)


_TRACE_FILE = _trace_file()


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
