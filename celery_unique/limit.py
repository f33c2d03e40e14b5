"""``unique_limit=N``: at most N calls with one key queued or running at once.

A key under ``unique_limit=N`` has N **slots**, each a lock as ``N = 1`` has
one: slot 1 is the lock key ``K`` itself (so ``unique_limit=1`` is the plain
lock, key and all), slot ``i`` is ``K~i``. A call takes one slot, in one
script (``ACQUIRE_SLOT_SCRIPT`` in :mod:`celery_unique.lock`):

=============================  ===============================================
the call finds                 it
=============================  ===============================================
a slot its id holds already    is answered as ``ACQUIRE_SCRIPT`` answers for
                               that slot: a resend after a lost reply finds
                               its own first attempt; the same chosen id
                               enqueued again is refused (one id, one slot)
a free slot                    takes the first free one
every slot held                goes through the holder check over all N
                               holders (their states read at once) and takes
                               over the first finished one's slot; else it is
                               refused, naming the holder of slot 1
=============================  ===============================================

The message then carries the slot key it took as its lock (``LOCK_HEADER``),
so the worker's side (begin, end, retries, revoke, purge, the heartbeat) and
the lock admin see a slot key as any lock key: nothing there knows of limits.

The slots of a key must share a Redis Cluster hash slot for the one script
to reach them all: on a Cluster, ``unique_limit`` above 1 needs a
``unique_key_prefix`` with a hash tag (``"{locks}"``).
"""

from __future__ import annotations

from typing import Any

from . import events
from .call import Call
from .cleanup import clean_up_later
from .config import UniqueConfig, setting_name
from .errors import ConfigurationError, LockStoreError, UniqueValueError
from .headers import LOCK_HEADER
from .keys import slot_keys
from .lock import AcquireError, LockStore, Slots
from .options import UniqueOptions

__all__ = ["acquire_slot", "check_slots", "hold_slot"]


def check_slots(task_name: str, options: UniqueOptions, config: UniqueConfig, app: Any = None) -> None:
    """Refuse a ``unique_limit`` above 1 that cannot be kept: a debounce's, or an untagged Cluster's."""
    if options.on_duplicate == "replace":
        # A debounce replaces the one holder that has not begun; with N
        # holders "the" call to replace is not defined.
        raise UniqueValueError(
            f"{task_name}: unique_limit={options.limit} cannot be combined with on_duplicate='replace' "
            "(a debounce replaces the one call that waits; use unique_limit=1)"
        )
    if config.cluster and "{" not in config.key_prefix:
        setting = setting_name(app, "unique_key_prefix") if app is not None else "unique_key_prefix"
        raise ConfigurationError(
            f"{task_name}: unique_limit={options.limit} on a Redis Cluster needs a hash tag in "
            f"{setting} (such as '{{{config.key_prefix}}}'), so that the key's slots share a "
            f"hash slot; it is {config.key_prefix!r}"
        )


def acquire_slot(call: Call, store: LockStore, lock_ttl_ms: int) -> Slots:
    """Take a slot of the call's key (``call.unique.limit`` of them); ``LockStoreError`` if Redis fails."""
    try:
        return store.acquire_slot(call.key, call.unique.limit, call.lock_id, lock_ttl_ms, call.nonce)
    except AcquireError as failure:
        events.store_error(call.task)
        if failure.maybe_applied:
            # Any one slot may have been taken; this id is never published,
            # so an owner-checked release of each is always safe.
            for slot in slot_keys(call.key, call.unique.limit):
                clean_up_later(store, slot, call.lock_id, call.nonce or "")
        raise LockStoreError.from_error(call.task.name, call.key, failure.error) from failure.error


def hold_slot(call: Call, slot: str) -> None:
    """The call holds (or is refused at) ``slot``: its lock from now on is the slot's key."""
    call.key = slot
    call.options["headers"][LOCK_HEADER] = slot
