"""Option names a unique call refuses: near misses of the package's own options.

Celery passes every option it does not know on to kombu, which sends it as a
message property, so ``apply_async(..., uniqe=60)`` would publish with no lock
and ``unique_untill="finish"`` would be ignored. A call is refused, with a
``UniqueTypeError`` naming the task and the option it looks like, when an
option it passes is neither one of the package's nor one of Celery's
(:data:`CELERY_OPTION_NAMES`) and

=====================================  ==========================================
the name                               for example
=====================================  ==========================================
starts with ``uniq`` (any case)        ``uniq``, ``unique_ttl``, ``uniqueness``
is one edit from a package option      ``uniqe``, ``unqiue``, ``on_duplicat``
=====================================  ==========================================

One edit is one letter inserted, deleted or replaced, or two adjacent letters
swapped (``unqiue``): the typing slips that leave a name recognisable. Other
unknown names still reach kombu, as Celery means them to (a transport's own
message properties, a stamp named in ``stamped_headers``).

The check runs on every unique call. Options Celery knows are passed over in
one set operation, and the verdict on any other name is cached, so the common
case costs a fraction of a microsecond.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Mapping
from typing import Any

from .errors import UniqueTypeError
from .options import OPTION_NAMES

__all__ = ["CELERY_OPTION_NAMES", "check_option_names", "near_miss"]

#: Names Celery, kombu and the transports take as call options, read from
#: their code: never refused, whatever they look like.
CELERY_OPTION_NAMES = frozenset({
    # Task.apply_async: its parameters and the options its docstring lists.
    "args", "kwargs", "task_id", "producer", "link", "link_error", "shadow",
    "countdown", "eta", "expires", "connection", "retry", "retry_policy",
    "time_limit", "soft_time_limit", "queue", "exchange", "routing_key",
    "priority", "serializer", "compression", "add_to_parent", "ignore_result",
    "publisher", "headers",
    # Task.apply and Task.retry.
    "retries", "throw", "logfile", "loglevel", "exc", "max_retries",
    # Celery.send_task.
    "name", "router", "result_cls", "group_id", "group_index", "chord",
    "reply_to", "root_id", "parent_id", "route_name", "chain", "task_type",
    "replaced_task_nesting",
    # AMQP.as_task_v2 (the message's headers, body and sent event).
    "callbacks", "errbacks", "create_sent_event", "now", "timezone", "origin",
    "argsrepr", "kwargsrepr", "stamped_headers", "stamps",
    # AMQP.send_task_message and the router's destinations.
    "message", "event_dispatcher", "delivery_mode", "declare", "exchange_type",
    "timeout", "confirm_timeout", "binding_key",
    # The task attributes Celery reads as default options (extract_exec_options).
    "immediate", "mandatory",
    # kombu's Producer.publish, and the AMQP message properties it passes on.
    "body", "content_type", "content_encoding", "expiration",
    "application_headers", "correlation_id", "message_id", "timestamp", "type",
    "user_id", "app_id", "cluster_id",
    # What a retry forwards from its request's delivery_info.
    "redelivered", "is_eager",
    # Signatures' own keys, and Celery's retry options given per call.
    "immutable", "subtask_type", "autoretry_for", "dont_autoretry_for",
    "retry_backoff", "retry_backoff_max", "retry_jitter",
    # Transports' message properties (SQS, pgmq).
    "MessageGroupId", "MessageDeduplicationId", "DelaySeconds", "delay_seconds",
    "message_attributes",
    # Schedulers: django-celery-beat's options and header.
    "expire_seconds", "periodic_task_name",
})

#: Names that are never a near miss: the package's options and Celery's.
_KNOWN = frozenset(OPTION_NAMES) | CELERY_OPTION_NAMES
#: What a misspelt ``unique`` option starts with (``uniq`` is two edits from ``unique``).
_PREFIX = "uniq"


def check_option_names(task_name: str, options: Mapping[str, Any]) -> None:
    """Raise ``UniqueTypeError`` if an option of a call to ``task_name`` is a near miss.

    The error names the task, the option and the package option it looks
    like. Names listed in the call's ``stamped_headers`` are stamps, and
    never refused.
    """
    if _KNOWN.issuperset(options):
        return
    stamps = options.get("stamped_headers") or ()
    for name in options:
        if name in _KNOWN or name in stamps:
            continue
        meant = near_miss(name)
        if meant is not None:
            raise UniqueTypeError(
                f"{task_name}: unknown option {name!r}, did you mean {meant!r}? "
                f"(celery_unique's options are {', '.join(OPTION_NAMES)})"
            )


@functools.lru_cache(maxsize=1024)
def near_miss(name: str) -> str | None:
    """Return the package option ``name`` looks like a misspelling of, or None."""
    if name in _KNOWN:
        return None
    for option in OPTION_NAMES:
        if _one_edit(name, option):
            return option
    if name.lower().startswith(_PREFIX):
        return difflib.get_close_matches(name.lower(), OPTION_NAMES, n=1, cutoff=0)[0]
    return None


def _one_edit(name: str, option: str) -> bool:
    """Whether ``name`` is ``option`` with one letter inserted, deleted or replaced,
    or two adjacent letters swapped."""
    if name == option or abs(len(name) - len(option)) > 1:
        return False
    i = 0
    shortest = min(len(name), len(option))
    while i < shortest and name[i] == option[i]:
        i += 1
    if len(name) == len(option):
        if name[i + 1 :] == option[i + 1 :]:
            return True  # one letter replaced
        swapped = name[i : i + 1] == option[i + 1 : i + 2] and name[i + 1 : i + 2] == option[i : i + 1]
        return swapped and name[i + 2 :] == option[i + 2 :]
    shorter, longer = sorted((name, option), key=len)
    return shorter[i:] == longer[i + 1 :]
