"""``on_duplicate="join"``: a refused canvas step goes on with the holder's result.

A refused call that something waits on (a chain's next step, a chord or
group member, a chord body, a call with callbacks or a chosen id) is sent,
under its own task id and with its chain, callbacks, chord and group, as a
follow-up task, ``celery_unique.join``. The follow-up takes no lock and runs
no body of the refused task. It reads the holder's state from the result
backend, as Celery's ``chord_unlock`` reads a chord header's:

=====================  ===================================================
holder                 the follow-up
=====================  ===================================================
SUCCESS                returns the holder's result: the chain goes on with
                       it, the chord counts it, ``get()`` returns it
FAILURE                raises the holder's error: the chain, the chord and
                       the errbacks hear of it as of the step's own failure
the lock has passed    joins the lock's new holder instead (a debounce's
to another call        call that replaced it, a later call)
REVOKED                raises the holder's ``TaskRevokedError``
let go of the lock     raises :class:`~celery_unique.JoinError` (its result
with no final state    is ignored or expired, or it ended with ``Ignore``)
not finished           retries itself, sooner at first, then every
                       ``result_chord_retry_interval`` (Celery's setting)
not finished at the    fails with the refusal's ``DuplicateTaskError``
refused call's TTL
=====================  ===================================================

The lock is read (a ``GET``, never written) only while the holder has no
final state. A holder that has let go of its lock is judged so on two polls
in a row, and only under ``unique_until`` "success" or "finish": under
"start" a holder lets go as it begins, under "expiry" only at its TTL.

A join needs the holder's result: with no result backend, an ``rpc://`` one
(which cannot read another caller's results), results ignored, or a run
here (``apply()``, eager mode), the call is refused as under ``"existing"``.
A refused call that nothing waits on gets the holder's ``AsyncResult``, as
under ``"existing"``.

The follow-up is routed as the refused call would be (its options, the
task's, then ``task_routes`` with the refused call's arguments), on the
producer the call was given. Workers register it at ``worker_init``; a
worker that runs unique tasks runs their joins. While it waits, the
refused id's state is RETRY.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, NoReturn

import redis
from celery import Task, states
from celery.result import AsyncResult

from .config import app_state
from .errors import DuplicateTaskError, JoinError
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
    merged = {**task._get_exec_options(), **call.options}
    options = {k: v for k, v in merged.items() if k not in _NOT_TAKEN}
    headers = options.get("headers")
    if isinstance(headers, dict):
        options["headers"] = {k: v for k, v in headers.items() if k not in OWN_HEADERS}
    # Routed here, with the refused call's name and arguments, as its own
    # publish would be; send_task then keeps the route as it is.
    options = app.amqp.router.route(options, task.name, call.args, call.kwargs, task)
    logger.debug("celery_unique: %s[%s] joins holder %s (lock %s)", task.name, call.lock_id, holder, call.key)
    result: AsyncResult[Any] = app.send_task(
        JOIN_TASK, (holder, task.name, call.key, call.unique.ttl_ms / 1000),
        {"until": call.unique.until}, task_id=call.lock_id, producer=call.producer, router=_ROUTED,
        link=call.link, link_error=call.link_error, **options,
    )
    return result


class _Routed:
    """A router for a publish that was routed already: it keeps the options as they are."""

    def route(self, options: Any, *_: Any, **__: Any) -> Any:
        return options


_ROUTED = _Routed()


def register(app: Any) -> None:
    """Register the follow-up task on ``app`` (once; lazily if the app is not finalized)."""
    app.task(name=JOIN_TASK, base=Task, bind=True, shared=False, max_retries=None, ignore_result=False)(_join)


def _join(
    self: Any, holder: str, task_name: str, key: str, ttl: float, until: str = "success",
    deadline: float | None = None, gone: bool = False,
) -> Any:
    """The holder's result, once it has one; its error if it failed."""
    if deadline is None:
        deadline = time.time() + ttl  # the first run's clock; each retry carries it
    meta = self.backend.get_task_meta(holder)
    state = meta.get("status")
    if state == states.SUCCESS:
        return meta.get("result")
    if state == states.FAILURE:
        _raise_stored(meta, task_name, holder, key)
    current = _lock_holder(self.app, key)
    later = {"until": until, "deadline": deadline}
    if current and current != holder:
        # The lock has passed on: to the debounce's call that replaced the
        # holder, or to a call after it. That call's work is the one to join.
        raise self.retry(args=(current, task_name, key, ttl), kwargs=later, countdown=FIRST_POLL)
    if state == states.REVOKED:
        _raise_stored(meta, task_name, holder, key)
    if time.time() >= deadline:
        raise DuplicateTaskError(task_name, holder, key)
    let_go = current is None and until in ("success", "finish") and state not in states.READY_STATES
    if let_go and gone:
        raise JoinError(task_name, holder, key)
    interval = float(self.app.conf.result_chord_retry_interval or 1.0)
    countdown = min(interval, FIRST_POLL * 2 ** min(self.request.retries or 0, 16))
    raise self.retry(
        args=(holder, task_name, key, ttl), kwargs={**later, "gone": let_go}, countdown=countdown
    )


def _raise_stored(meta: Any, task_name: str, holder: str, key: str) -> NoReturn:
    error = meta.get("result")
    if isinstance(error, BaseException):
        raise error
    raise DuplicateTaskError(task_name, holder, key)


def _lock_holder(app: Any, key: str) -> str | bool | None:
    """The lock's holder now, None if it is free, False if the lock store did not answer."""
    try:
        return app_state(app).store.holder(key)
    except redis.RedisError:
        return False
