"""``on_duplicate="join"``: a refused canvas step goes on with the holder's result.

A refused call that something waits on (a chain's next step, a chord or
group member, a chord body, a call with callbacks or a chosen id) is sent,
under its own task id and with its chain, callbacks, chord and group, as a
follow-up task, ``celery_unique.join``. The follow-up takes no lock and runs
no body of the refused task. It reads the holder's state from the result
backend, as Celery's ``chord_unlock`` reads a chord header's:

=====================  ===================================================
holder's state         the follow-up
=====================  ===================================================
SUCCESS                returns the holder's result: the chain goes on with
                       it, the chord counts it, ``get()`` returns it
FAILURE, REVOKED       raises the holder's error: the chain, the chord and
                       the errbacks hear of it as of the step's own failure
not finished           retries itself, sooner at first, then every
                       ``result_chord_retry_interval`` (Celery's setting)
not finished at the    fails with the refusal's ``DuplicateTaskError``
lock's TTL
=====================  ===================================================

A join needs the holder's result: with no result backend, an ``rpc://`` one
(which cannot read another caller's results), results ignored, or a run
here (``apply()``, eager mode), the call is refused as under ``"existing"``.
A refused call that nothing waits on gets the holder's ``AsyncResult``, as
under ``"existing"``.

Workers register the follow-up at ``worker_init``; a worker that runs unique
tasks runs their joins.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from celery import Task, states
from celery.result import AsyncResult

from .errors import DuplicateTaskError
from .headers import OWN_HEADERS
from .holders import looks_up_any_task

if TYPE_CHECKING:
    from .call import Call

__all__ = ["JOIN_TASK", "register", "send_join"]

logger = logging.getLogger(__name__)

#: The follow-up task's name.
JOIN_TASK = "celery_unique.join"
#: The first retry's countdown, in seconds; each one doubles it, up to
#: ``result_chord_retry_interval``.
FIRST_POLL = 0.1
#: Options of the refused call that the follow-up does not take: it is sent
#: at once, as a first attempt.
_NOT_TAKEN = ("countdown", "eta", "retries", "task_id")


def can_join(call: Call) -> bool:
    """Whether ``call``'s join can read its holder's result from the result backend."""
    task = call.task
    ignored = call.options.get("ignore_result")
    if ignored is None:
        ignored = task.ignore_result
    return not ignored and looks_up_any_task(task.backend)


def send_join(call: Call, holder: str) -> AsyncResult[Any]:
    """Send the follow-up of refused ``call`` under its task id, routed as the call; return its result."""
    task = call.task
    app = task._get_app()
    # Routed as the refused call would be: its options, the task's own
    # (a queue attribute), then task_routes for the task's name.
    merged = {**task._get_exec_options(), **call.options}
    options = {k: v for k, v in merged.items() if k not in _NOT_TAKEN}
    headers = options.get("headers")
    if isinstance(headers, dict):
        options["headers"] = {k: v for k, v in headers.items() if k not in OWN_HEADERS}
    deadline = time.time() + call.unique.ttl_ms / 1000
    logger.debug("celery_unique: %s[%s] joins holder %s (lock %s)", task.name, call.lock_id, holder, call.key)
    result: AsyncResult[Any] = app.send_task(
        JOIN_TASK, (holder, task.name, call.key, deadline), task_id=call.lock_id, route_name=task.name,
        link=call.link, link_error=call.link_error, **options,
    )
    return result


def register(app: Any) -> None:
    """Register the follow-up task on ``app`` (once; lazily if the app is not finalized)."""
    app.task(name=JOIN_TASK, base=Task, bind=True, shared=False, max_retries=None, ignore_result=False)(_join)


def _join(self: Task, holder: str, task_name: str, key: str, deadline: float) -> Any:  # type: ignore[type-arg,unused-ignore]
    """The holder's result, once it has one; its error if it failed."""
    meta = self.backend.get_task_meta(holder)
    state = meta.get("status")
    if state == states.SUCCESS:
        return meta.get("result")
    if state in states.PROPAGATE_STATES:
        error = meta.get("result")
        if isinstance(error, BaseException):
            raise error
        raise DuplicateTaskError(task_name, holder, key)
    if time.time() >= deadline:
        raise DuplicateTaskError(task_name, holder, key)
    interval = float(self.app.conf.result_chord_retry_interval or 1.0)
    countdown = min(interval, FIRST_POLL * 2 ** min(self.request.retries or 0, 16))
    raise self.retry(countdown=countdown)
