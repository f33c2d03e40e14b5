"""Sentinel as the lock store, with the primary reached through a proxy that loses one reply.

The Sentinels monitor the primary through a :class:`tests.reply_dropper.ReplyDropper`,
so every client that asks them for the master reaches it through the proxy.
Armed for the acquire script, the proxy lets the server take the lock and
closes the connection before the reply: redis-py resends the command on a
fresh connection, and the resend must find the lock its first attempt took.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import chain, states

from celery_unique.lock import LockStore
from celery_unique.testing import RedisServer
from tests.conftest import LOCK_DB
from tests.reply_dropper import ReplyDropper
from tests.test_sentinel import MASTER, SOCKET_TIMEOUT, make_app, queued
from tests.topology import SentinelTopology

ACQUIRE_SHA = hashlib.sha1(LockStore.ACQUIRE_SCRIPT.encode()).hexdigest().encode()


@pytest.fixture(scope="module")
def fronted() -> Iterator[tuple[SentinelTopology, ReplyDropper]]:
    """A Sentinel topology whose Sentinels, and so their clients, reach the primary through a dropper."""
    droppers: list[ReplyDropper] = []

    def front(port: int) -> int:
        droppers.append(ReplyDropper(port).start())
        return droppers[0].port

    try:
        with SentinelTopology(sentinels=1, front=front) as topology:
            yield topology, droppers[0]
    finally:
        for dropper in droppers:
            dropper.close()


def chain_link(report: Any) -> Any:
    """A chain's first link, sent with the id the chain chose for it as it froze its links."""
    return chain(report.si(1).set(unique=60), report.si(2).set(unique=60)).apply_async().parent


CALLS: dict[str, Callable[[Any], Any]] = {
    "chosen id": lambda report: report.apply_async((1,), task_id="chosen-1", unique=60),
    "generated id": lambda report: report.apply_async((1,), unique=60),
    "chain link": chain_link,
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_acquire_whose_reply_was_lost_takes_the_lock_and_publishes_once(
    redis_server: RedisServer,
    broker: redis.Redis,
    fronted: tuple[SentinelTopology, ReplyDropper],
    call: str,
) -> None:
    """Through Sentinel, an acquire whose reply was lost is resent, holds the lock and publishes once."""
    topology, dropper = fronted
    app = make_app(
        redis_server,
        topology.sentinel_url(LOCK_DB),
        unique_redis_transport_options={"master_name": MASTER},
        unique_redis_socket_timeout=SOCKET_TIMEOUT,
    )
    report = app.tasks["tests.sentinel.report"]
    primary = topology.primary.client(LOCK_DB)
    primary.flushdb()  # the topology serves every case of this module
    # Loaded beforehand, so that the reply dropped is that of a command the server ran.
    primary.script_load(LockStore.ACQUIRE_SCRIPT)
    dropper.arm(b"EVALSHA", ACQUIRE_SHA)

    result = CALLS[call](report)

    assert dropper.dropped.is_set(), "no reply was dropped: the test did not lose the acquire's reply"
    assert primary.get(report.lock_key((1,), {}, {})) == result.id.encode()
    assert queued(broker) == 1
    # Not recorded as a refused call either.
    assert app.backend.get_task_meta(result.id, cache=False)["status"] == states.PENDING
    primary.close()
