"""A task's own retry or replacement continues its run: it keeps the lock, unchecked.

=====================  ===============================================
call                   continues
=====================  ===============================================
``self.retry()``       the run of the same task id, one retry further
``Task.replace()``     the run it replaces, under the same task id
an eager retry         the eager run it retries (nothing to record)
a lost process's task  the failing request the main process retries
anything else          nothing: a call naming a held id is a duplicate
=====================  ===============================================

As in Asynq, a continued call keeps the lock and is never checked again.
After its publish the lock store hears of the new attempt, so that a state
the old attempt stores from then on is not taken for the new one's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from celery.exceptions import Ignore

from .canvas import replacement_of
from .config import app_state
from .execution import _EAGER_RETRY, RUN_ATTR, Run, pending_eager_retry
from .headers import (
    LOCK_HEADER,
    NESTING_HEADER,
    NONCE_HEADER,
    REPLACES_HEADER,
    UNTIL_HEADER,
    carried_by,
    nesting_of,
)
from .lock import Attempt

__all__ = ["continue_run", "continued_run", "hand_over"]

# The logger UniqueTask has always logged this under: logging settings may name it.
logger = logging.getLogger("celery_unique.task")


def continued_run(task: Any, task_id: str | None, options: Mapping[str, Any]) -> Any:
    """The run a call of ``task`` continues, or None: only a task's own retry or replacement does.

    A retry re-enqueues the task under its own id, from inside its run,
    with one more retry; a ``Task.replace()`` replacement is published
    from inside the replaced task's run under its id. Any other call that
    names a task id holding a lock is a duplicate, whatever options it passes.
    """
    if not task_id:
        return None
    retries = options.get("retries")
    headers = options.get("headers")
    replaces = isinstance(headers, Mapping) and headers.get(REPLACES_HEADER) == task_id
    if not (retries or replaces):
        return None
    if pending_eager_retry(task_id, retries):
        return _EAGER_RETRY
    current = task._get_app().current_task
    request = current.request if current is not None else None
    run = request.__dict__.get(RUN_ATTR) if request is not None and request.id == task_id else None
    if run is not None:
        return run if replaces or int(retries or 0) == run.attempt.retries + 1 else None
    from .worker import failing_request

    failing = failing_request()  # the main process retries a task whose process was lost
    return failing if failing is not None and failing.id == task_id and retries else None


def continue_run(task: Any, run: Any, options: Mapping[str, Any], publish: Callable[[], Any]) -> Any:
    """Publish a retry or replacement of ``run`` with ``publish()``; then say so to the lock store."""
    if run is _EAGER_RETRY:
        return publish()
    run.continued = True
    try:
        result = publish()
    except Ignore:  # Task.on_replace published the replacement, then ignores the replaced task
        _mark_continued(task, run, options)
        raise
    except BaseException:
        run.continued = False
        raise
    _mark_continued(task, run, options)
    return result


def hand_over(task: Any, run: Run, sig: Any, replace: Callable[[], Any]) -> Any:
    """Hand ``run``'s lock to its replacement ``sig``, published by ``replace()`` under the same id."""
    attempt = run.attempt._replace(nesting=run.attempt.nesting + 1, retries=0)
    headers: dict[str, Any] = {
        LOCK_HEADER: run.key, REPLACES_HEADER: run.task_id, NESTING_HEADER: attempt.nesting,
    }
    if run.until != "success":
        headers[UNTIL_HEADER] = run.until
    if run.attempt.nonce:
        headers[NONCE_HEADER] = run.attempt.nonce
    final = replacement_of(sig, run.task_id)
    if final is not None:
        final.set(headers={**(final.options.get("headers") or {}), **headers})
    return continue_run(task, run, {"_attempt": attempt}, replace)


def _mark_continued(task: Any, run: Any, options: Mapping[str, Any]) -> None:
    # Sent after the publish (see CONTINUE_SCRIPT): a state the task
    # stores from now on (a retry with throw=False stores SUCCESS) is not
    # taken for the new attempt's, and copies of this attempt are dropped.
    # A retry keeps its attempt's replace nesting, which the run read from
    # its message (Celery 5.3 does not put it in the retry's options).
    retries = int(options.get("retries") or 0)
    if isinstance(run, Run):
        if run.eager:
            return
        key, state = run.key, run.state
        attempt = options.get("_attempt") or run.attempt._replace(retries=retries)
    else:
        carried = carried_by(run.request_dict)
        if carried is None:
            return
        key, state = carried.key, app_state(task._get_app())
        attempt = Attempt(run.id, nesting_of(run.request_dict), retries, carried.nonce)
    try:
        state.store.continue_(key, attempt)
    except Exception as exc:
        logger.warning(
            "celery_unique: could not record the retry of task %s[%s] under lock %s (%s)",
            task.name, attempt.task_id, key, exc,
        )
