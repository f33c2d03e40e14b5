"""Errors, publish failures, eager mode and configuration."""

from __future__ import annotations

import multiprocessing
import pickle
from types import SimpleNamespace

import pytest
import redis
from celery import Celery
from kombu.exceptions import OperationalError

from celery_unique import (
    ConfigurationError,
    DuplicateTaskError,
    JoinError,
    LockStoreError,
    UniqueTask,
    UniqueTaskError,
)
from celery_unique.testing import RedisServer


def test_error_hierarchy() -> None:
    """Every error has the one root, UniqueTaskError."""
    for error in (ConfigurationError, DuplicateTaskError, LockStoreError):
        assert issubclass(error, UniqueTaskError)


def test_duplicate_error_pickles() -> None:
    """DuplicateTaskError survives pickling with its task id, key and message."""
    error = DuplicateTaskError("proj.send_report", "abc-123", "unique:celery:proj.send_report:xyz")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.task_name, copy.task_id, copy.key) == ("proj.send_report", "abc-123", error.key)
    assert str(copy) == str(error)
    assert "proj.send_report" in str(copy)


def test_lock_store_error_pickles() -> None:
    """LockStoreError survives pickling."""
    error = LockStoreError("t", "k", "ConnectionError: refused")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.task_name, copy.key, copy.reason, str(copy)) == ("t", "k", error.reason, str(error))


def test_unreachable_lock_store(celery_app: Celery, broker: redis.Redis) -> None:
    """An unreachable lock store raises LockStoreError with the Redis error as cause; nothing sent."""
    celery_app.conf.unique_redis_url = "redis://127.0.0.1:1/0"

    @celery_app.task(base=UniqueTask, name="tests.unreachable")
    def unreachable(x: int) -> int:
        return x

    with pytest.raises(LockStoreError, match=r"tests\.unreachable") as info:
        unreachable.apply_async((1,), unique=60)
    assert isinstance(info.value.__cause__, redis.ConnectionError)
    assert broker.llen("celery") == 0


def test_broker_down_releases_the_lock(redis_server: RedisServer, locks: redis.Redis) -> None:
    """If publishing fails after locking, the lock is released and the broker error re-raised."""
    app = Celery("down", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.unique_redis_url = redis_server.url(2)

    @app.task(base=UniqueTask, name="tests.down")
    def down(x: int) -> int:
        return x

    with pytest.raises(OperationalError):
        down.apply_async((1,), unique=60, retry=False)
    assert locks.dbsize() == 0


def test_serializer_error_releases_the_lock(tasks: SimpleNamespace, locks: redis.Redis) -> None:
    """A serializer failure at publish gives the lock back."""
    with pytest.raises(Exception, match="bogus"):
        tasks.send_report.apply_async((1,), unique=60, serializer="bogus")
    assert locks.dbsize() == 0
    tasks.send_report.apply_async((1,), unique=60)


def test_eager_mode_takes_and_releases(
    celery_app: Celery, tasks: SimpleNamespace, locks: redis.Redis
) -> None:
    """With task_always_eager the lock is held during the run and released on success."""
    celery_app.conf.task_always_eager = True
    result = tasks.held_by.apply_async((1,), unique=60)
    assert result.get() == result.id
    assert locks.dbsize() == 0


def test_eager_failure_keeps_the_lock(celery_app: Celery, tasks: SimpleNamespace, locks: redis.Redis) -> None:
    """In eager mode too, a failed task keeps its lock."""
    celery_app.conf.task_always_eager = True
    result = tasks.fail.apply_async((1,), unique=60)
    assert result.failed()
    assert locks.dbsize() == 1
    with pytest.raises(DuplicateTaskError):
        tasks.fail.apply_async((1,), unique=60)


def test_falls_back_to_redis_broker(redis_server: RedisServer, broker: redis.Redis) -> None:
    """Without unique_redis_url, locks live in the broker's Redis."""
    app = Celery("fallback", broker=redis_server.url(0), set_as_current=False)

    @app.task(base=UniqueTask, name="tests.fallback")
    def fallback(x: int) -> int:
        return x

    fallback.apply_async((1,), unique=60)
    assert broker.keys("unique:*")


def test_non_redis_broker_needs_a_url(broker: redis.Redis) -> None:
    """An AMQP broker and no unique_redis_url is a clear ConfigurationError at enqueue."""
    app = Celery("amqp", broker="amqp://user:pw@rabbit:5672//", set_as_current=False)

    @app.task(base=UniqueTask, name="tests.amqp")
    def on_amqp(x: int) -> int:
        return x

    with pytest.raises(ConfigurationError, match="unique_redis_url") as info:
        on_amqp.apply_async((1,), unique=60)
    assert "pw" not in str(info.value)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("unique_key_prefix", ""),
        ("unique_key_prefix", 5),
        ("unique_redis_socket_timeout", 0),
        ("unique_redis_socket_timeout", "5"),
        ("unique_redis_options", ["ssl"]),
        ("unique_redis_url", 6379),
        ("unique_redis_cluster", "yes"),
        ("unique_redis_transport_options", ["mymaster"]),
    ],
)
def test_bad_settings_are_refused(celery_app: Celery, setting: str, value: object) -> None:
    """A bad setting is a ConfigurationError naming it and the value."""
    celery_app.conf[setting] = value

    @celery_app.task(base=UniqueTask, name="tests.badconf")
    def badconf(x: int) -> int:
        return x

    with pytest.raises(ConfigurationError, match=setting) as info:
        badconf.apply_async((1,), unique=60)
    assert repr(value) in str(info.value)


def test_key_prefix_setting(celery_app: Celery, tasks: SimpleNamespace, locks: redis.Redis) -> None:
    """unique_key_prefix starts every lock key."""
    celery_app.conf.unique_key_prefix = "myapp:locks"
    tasks.send_report.apply_async((1,), unique=60)
    (key,) = locks.keys("*")
    assert key.startswith(b"myapp:locks:celery:tests.send_report:")


def test_django_style_namespace(redis_server: RedisServer, locks: redis.Redis) -> None:
    """CELERY_UNIQUE_* settings loaded with namespace='CELERY' are used."""

    class DjangoSettings:
        CELERY_BROKER_URL = redis_server.url(0)
        CELERY_UNIQUE_REDIS_URL = redis_server.url(2)
        CELERY_UNIQUE_KEY_PREFIX = "django"

    app = Celery("django", set_as_current=False)
    app.config_from_object(DjangoSettings, namespace="CELERY")

    @app.task(base=UniqueTask, name="tests.django")
    def django_task(x: int) -> int:
        return x

    first = django_task.apply_async((1,), unique=60)
    with pytest.raises(DuplicateTaskError) as info:
        django_task.apply_async((1,), unique=60)
    assert info.value.key.startswith("django:celery:tests.django:")
    assert locks.get(info.value.key) == first.id.encode()


def _enqueue_in_child(app: Celery, task: UniqueTask, queue: multiprocessing.Queue) -> None:
    try:
        task.apply_async((99,), unique=60)
        queue.put("ok")
    except Exception as exc:
        queue.put(repr(exc))


def test_lock_store_survives_fork(celery_app: Celery, tasks: SimpleNamespace, locks: redis.Redis) -> None:
    """A forked process (a prefork worker child) uses the app's lock store safely."""
    tasks.send_report.apply_async((1,), unique=60)  # the parent's pool now has a connection
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_enqueue_in_child, args=(celery_app, tasks.send_report, queue))
    child.start()
    child.join(20)
    assert queue.get(timeout=5) == "ok"
    tasks.send_report.apply_async((2,), unique=60)  # the parent still works too
    assert locks.dbsize() == 3


def test_script_flush_is_recovered(tasks: SimpleNamespace, locks: redis.Redis) -> None:
    """After SCRIPT FLUSH the scripts reload themselves and locking goes on."""
    tasks.send_report.apply_async((1,), unique=60)
    locks.script_flush()
    with pytest.raises(DuplicateTaskError):
        tasks.send_report.apply_async((1,), unique=60)
    tasks.send_report.apply_async((2,), unique=60)


def test_duplicate_error_rebuilds_from_its_args() -> None:
    """A result backend rebuilds errors as cls(*args): the copy equals the original."""
    error = DuplicateTaskError("proj.t", "id-1", "unique:celery:proj.t:d")
    copy = DuplicateTaskError(*error.args)
    assert (copy.task_id, copy.key, str(copy)) == ("id-1", error.key, str(error))


def test_join_error_pickles_and_rebuilds_from_its_args() -> None:
    """A JoinError comes back equal from a pickle and from cls(*args), as a result backend rebuilds it."""
    error = JoinError("proj.t", "id-1", "unique:celery:proj.t:d")
    for copy in (pickle.loads(pickle.dumps(error)), JoinError(*error.args)):
        assert (copy.task_name, copy.task_id, copy.key) == ("proj.t", "id-1", error.key)
        assert str(copy) == str(error)
    assert isinstance(error, UniqueTaskError)
