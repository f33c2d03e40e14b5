"""An acquire that never reached a server needs no cleanup; one that may have, gets one."""

from __future__ import annotations

import logging
import threading

import pytest
from celery import Celery

from celery_unique import LockStoreError, UniqueTask
from celery_unique.testing import RedisServer, free_port, wait_for
from tests.conftest import BROKER_DB


def cleanup_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "celery-unique-cleanup"]


@pytest.fixture
def unreachable_app(redis_server: RedisServer) -> Celery:
    """An app whose lock store is a loopback port nothing listens on."""
    app = Celery("unreachable", broker=redis_server.url(BROKER_DB), set_as_current=False)
    app.conf.update(
        unique_redis_url=f"redis://127.0.0.1:{free_port()}/0",
        unique_redis_socket_timeout=0.5,
        broker_connection_retry_on_startup=False,
    )

    @app.task(base=UniqueTask, name="faults.report", shared=False)
    def report(n: int) -> int:
        return n

    return app


def test_refused_connection_starts_no_cleanup_and_logs_no_warning(
    unreachable_app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    """100 enqueues against a refused connection start no thread and log no false release warning."""
    before = len(cleanup_threads())
    task = unreachable_app.tasks["faults.report"]
    with caplog.at_level(logging.WARNING, logger="celery_unique"):
        for n in range(100):
            with pytest.raises(LockStoreError) as info:
                task.apply_async((n,), unique=60)
            assert "ConnectionError" in str(info.value)
    assert len(cleanup_threads()) == before
    assert not [r for r in caplog.records if r.name.startswith("celery_unique")]


def test_timed_out_acquire_is_cleaned_up_in_one_thread(redis_server: RedisServer) -> None:
    """Acquires that time out (the command was sent) are released in the background by one thread."""
    with RedisServer() as lock_server:
        app = Celery("stalled", broker=redis_server.url(BROKER_DB), set_as_current=False)
        app.conf.update(
            unique_redis_url=lock_server.url(0),
            unique_redis_socket_timeout=0.3,
            broker_connection_retry_on_startup=False,
        )

        @app.task(base=UniqueTask, name="faults.stalled", shared=False)
        def stalled(n: int) -> int:
            return n

        stalled.apply_async((-1,), unique=60)  # a pooled connection, so the next commands are sent
        lock_server.client().execute_command("CLIENT", "PAUSE", 2000, "ALL")
        for n in range(3):
            with pytest.raises(LockStoreError) as info:
                stalled.apply_async((n,), unique=60)
            assert "TimeoutError" in str(info.value)
        assert len([t for t in cleanup_threads() if t.is_alive()]) >= 1
        client = lock_server.client()
        # Once the pause is over: no lock of an unpublished task is left, only the published one.
        assert wait_for(lambda: client.dbsize() == 1, timeout=10)
