"""The atomic enqueue: whether it applies to an app, and how the transport answers the enqueue.

With ``broker_transport = "celery_unique.transport:Transport"`` (or
``SentinelTransport``) and the lock store on the broker's Redis server, a
unique call's lock is taken by the publish itself (ENQUEUE_SCRIPT in
:mod:`celery_unique.lock`): the enqueue puts a :class:`~celery_unique.lock.Ticket`
in the message's ``celery_unique_ticket`` header and waits on a
:class:`Waiting` in :data:`waiting`; the transport's channel takes the ticket
out of the message, runs the script and writes the answer there. A refusal
is no error to kombu: the enqueue raises it once the publish has returned.

Anything else (another transport, a lock store elsewhere, a Cluster, a
``global_keyprefix``) takes the lock first and then publishes; a selected
transport that cannot apply says why once, when the app first enqueues.
"""

from __future__ import annotations

import contextvars
import threading
from dataclasses import dataclass, replace
from typing import Any

from . import events
from .config import app_state, store_target

__all__ = ["TRANSPORT_FLAG", "Waiting", "forget_refused", "lock_db", "waiting"]

#: Attribute set on the package's transports: the enqueue checks for it.
TRANSPORT_FLAG = "celery_unique_atomic"
#: Attribute of the Celery app that holds its answer (the lock's database, or -1).
_MODE_ATTR = "_celery_unique_atomic_db"
_mode_lock = threading.Lock()


@dataclass(slots=True)
class Waiting:
    """One atomic enqueue waiting on its message's publish: set by the channel's ``_put``."""

    task_id: str
    answered: bool = False
    #: The lock's holder when the script refused the message, else None.
    holder: str | None = None


#: The enqueue this thread (or greenlet) is publishing, if any.
waiting: contextvars.ContextVar[Waiting | None] = contextvars.ContextVar(
    "celery_unique_waiting", default=None
)


def lock_db(app: Any) -> int | None:
    """The lock store's database if ``app``'s unique calls enqueue atomically, else None (worked out once)."""
    db: int | None = app.__dict__.get(_MODE_ATTR)
    if db is None:
        with _mode_lock:
            db = app.__dict__.get(_MODE_ATTR)
            if db is None:
                db = _work_out(app)
                setattr(app, _MODE_ATTR, db)
    return None if db < 0 else db


def _work_out(app: Any) -> int:
    try:
        connection = app.connection_for_write()
        try:
            transport = connection.get_transport_cls()
            prefix = (connection.transport_options or {}).get("global_keyprefix")
        finally:
            connection.release()
    except Exception:  # a broker setting kombu cannot resolve: the publish will say so
        return -1
    if not getattr(transport, TRANSPORT_FLAG, False):
        return -1
    why = _why_not(app, prefix)
    if why:
        events.atomic_off(why)
        return -1
    events.atomic_on(app_state(app).target.describe())
    return int(app_state(app).target.address.connection.get("db") or 0)


def _why_not(app: Any, prefix: Any) -> str:
    state = app_state(app)
    target = state.target
    if target.cluster:
        return "the lock store is a Redis Cluster"
    if prefix:
        return "broker_transport_options sets a global_keyprefix"
    try:
        broker = target if target.inherited else store_target(app, replace(state.config, redis_url=None))
    except Exception as exc:  # the broker's URL names no Redis the lock store could be
        return f"the broker's URL names no Redis server ({exc})"

    def where(t: Any) -> tuple[Any, ...]:
        conn = t.address.connection
        return (conn.get("host"), conn.get("port"), conn.get("path"), t.address.sentinels, t.master_name)

    if where(broker) != where(target):
        return f"the lock store ({target.describe()}) is not the broker's server ({broker.describe()})"
    return ""


def forget_refused(task: Any, result: Any, holder: str) -> None:
    """Undo what Celery did for a published task whose message the transport refused.

    Celery subscribed to its result (a Redis result backend, before the
    publish) and added it to the running task's children: neither may
    outlive the refusal. An id refused because it holds the lock itself (a
    chosen id enqueued again) keeps its subscription, which is its first call's.
    """
    app = task._get_app()
    if result.id != holder:
        cancel = getattr(getattr(task.backend, "result_consumer", None), "cancel_for", None)
        if cancel is not None:
            cancel(result.id)
    parent = app.current_worker_task
    children = getattr(getattr(parent, "request", None), "children", None)
    if children:
        children[:] = [child for child in children if child is not result]
