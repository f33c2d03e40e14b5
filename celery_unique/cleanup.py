"""Giving back the locks of tasks that were never published.

A lock is taken before its task is published. When the publish fails, the
lock is released at once (owner-checked: the task id was never published, so
nothing else can hold it under that id). When the acquire itself failed after
its command may have reached the server (a timeout), the lock may appear once
the server catches up: it is released in the background, so that the caller
hears of the failure within one socket timeout.
"""

from __future__ import annotations

import logging
import queue
import threading

import redis

from .lock import LockStore
from .perprocess import per_process

__all__ = ["clean_up_later", "release_quietly"]

logger = logging.getLogger(__name__)


def release_quietly(store: LockStore, key: str, task_id: str, nonce: str = "") -> None:
    """Release the lock an unpublished ``task_id`` took (and its "queued" marker), owner-checked."""
    try:
        store.release(key, task_id, nonce)
    except redis.RedisError as exc:
        logger.warning(
            "celery_unique: could not release lock %s of unpublished task %s (%s); "
            "its TTL will free it", key, task_id, exc,
        )


class _Cleanup(threading.Thread):
    """Releases, one after another, the locks of tasks whose acquire may have been applied."""

    #: Pending releases beyond this are dropped (their TTL frees them).
    limit = 10_000

    def __init__(self, store: LockStore) -> None:
        super().__init__(name="celery-unique-cleanup", daemon=True)
        self.store = store
        self.pending: queue.Queue[tuple[str, str, str]] = queue.Queue(self.limit)

    @classmethod
    def started(cls, store: LockStore) -> _Cleanup:
        cleanup = cls(store)
        cleanup.start()
        return cleanup

    def put(self, item: tuple[str, str, str]) -> None:
        try:
            self.pending.put_nowait(item)
        except queue.Full:
            logger.warning("celery_unique: too many locks to clean up; lock %s is left to its TTL", item[0])

    def run(self) -> None:
        while True:
            key, task_id, nonce = self.pending.get()
            release_quietly(self.store, key, task_id, nonce)


def clean_up_later(store: LockStore, key: str, task_id: str, nonce: str = "") -> None:
    """Release, in the background, the lock an unpublished ``task_id`` may have taken.

    One thread per store and process, started on the first call, releases
    them one after another: against a stalled server each release may wait
    out a timeout, which the caller does not.
    """
    per_process(store, "cleanup", _Cleanup.started).put((key, task_id, nonce))
