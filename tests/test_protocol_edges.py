"""Two edges of the protocol where the scripts once broke an invariant of docs/protocol.md.

A chosen id enqueued again while a copy of its former incarnation may still
come, and a retry that ends before the attempt that sent it says so.
"""

from __future__ import annotations

import pytest
import redis

from celery_unique.lock import Attempt, LockStore
from celery_unique.testing import RedisServer
from tests.conftest import LOCK_DB

KEY = "unique:celery:tests.report:digest"
MARKER_TTL_MS = 1000


@pytest.fixture
def store(redis_server: RedisServer) -> LockStore:
    """The lock store's scripts on the suite's lock database."""
    return LockStore(redis.Redis(host=redis_server.host, port=redis_server.port, db=LOCK_DB))


@pytest.mark.parametrize("ending", ["ended", "revoked"])
def test_reusing_a_chosen_id_keeps_dropping_copies_of_its_earlier_incarnation(
    store: LockStore, ending: str
) -> None:
    """A copy of an ended or revoked incarnation is still dropped once its call and id are enqueued again."""
    first = Attempt("report-42", nonce="first")
    assert store.acquire(KEY, first.task_id, 60_000, nonce=first.nonce) is None
    if ending == "ended":
        assert store.begin(KEY, first, "w1/1", "m:1", MARKER_TTL_MS)[0] == "run"
        assert store.end(KEY, first, "w1/1", "release", leave_done=True)
    else:
        assert store.discard(KEY, first, drop_later=True)
    dropped = store.begin(KEY, first, "w2/2", "m:2", MARKER_TTL_MS)[0]
    assert dropped in ("skip", "drop")  # a redelivered or held-back copy of the first incarnation
    # Invariant 1: within the lock's TTL an attempt that ended never runs
    # again, and no two copies of one task id run at once.
    assert store.acquire(KEY, first.task_id, 60_000, nonce="second") is None
    assert store.begin(KEY, first, "w2/2", "m:2", MARKER_TTL_MS)[0] == dropped


def test_retry_that_ends_before_its_continue_releases_the_lock(store: LockStore) -> None:
    """An unmarked retry that succeeds before its marked parent's CONTINUE still releases the lock."""
    parent, retry = Attempt("gen-1"), Attempt("gen-1", retries=1)
    assert store.acquire(KEY, parent.task_id, 60_000) is None
    assert store.begin(KEY, parent, "w1/1", "m:1", MARKER_TTL_MS)[0] == "run"
    # The parent published the retry; another worker process ran it at
    # once, unmarked, and it succeeded before the parent's CONTINUE.
    store.end(KEY, retry, "w2/2", "release", leave_done=False)
    store.continue_(KEY, retry)
    # The task succeeded: its lock goes ("success" in docs/protocol.md), and
    # does not stay until its TTL refusing every call (its 'queued' marker
    # makes the SUCCESS look stale to the holder check and to the reaper).
    assert store.holder(KEY) is None, store.marker(KEY, parent.task_id)
