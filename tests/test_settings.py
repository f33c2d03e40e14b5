"""Where the locks live: every Redis URL form Celery and kombu accept, inherited or set.

Each test enqueues through a real app against a real redis-server (over TCP
or a unix socket) and looks for the lock where the settings say it is.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_unique import ConfigurationError, DuplicateTaskError, UniqueTask
from celery_unique.config import describe_store
from celery_unique.redis_url import redact
from celery_unique.testing import RedisServer, free_port
from tests.conftest import BROKER_DB, CI

SECRET = "s3cret-pw"


def make_app(broker: Any = None, **conf: Any) -> Celery:
    """An app with one unique task, ``tests.settings``, and the given settings."""
    app = Celery("settings", broker=broker, set_as_current=False)
    app.conf.update(broker_connection_retry_on_startup=False, task_default_queue="celery", **conf)

    @app.task(base=UniqueTask, name="tests.settings", shared=False)
    def settings_task(x: int) -> int:
        return x

    return app


def enqueue(app: Celery, x: int = 1) -> Any:
    """Enqueue ``tests.settings(x)`` with a lock, and return the result."""
    return app.tasks["tests.settings"].apply_async((x,), unique=60)


def lock_keys(client: redis.Redis) -> list[bytes]:
    """The lock keys of ``tests.settings`` in ``client``'s database."""
    return list(client.scan_iter(match="unique:*:tests.settings:*"))


def refused(app: Celery, match: str) -> ConfigurationError:
    """Enqueue and return the ConfigurationError it must raise, naming ``match``."""
    with pytest.raises(ConfigurationError, match=match) as info:
        enqueue(app)
    return info.value


# --- the broker URL, wherever Celery reads it from ----------------------------------------------


def test_broker_from_environment_variable(
    redis_server: RedisServer, broker: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker given only as CELERY_BROKER_URL (read by Celery's conf.broker_url) holds the locks."""
    monkeypatch.setenv("CELERY_BROKER_URL", redis_server.url(BROKER_DB))
    app = make_app()
    first = enqueue(app)
    with pytest.raises(DuplicateTaskError) as info:
        enqueue(app)
    assert broker.get(info.value.key) == first.id.encode()
    source = "from the CELERY_BROKER_URL environment variable"
    assert describe_store(app) == f"{redis_server.url(BROKER_DB)} ({source})"


def test_broker_write_url_holds_the_locks(redis_server: RedisServer) -> None:
    """With broker_write_url set, the locks go where Celery publishes: the write URL."""
    app = make_app(redis_server.url(BROKER_DB), broker_write_url=redis_server.url(3))
    enqueue(app)
    assert len(lock_keys(redis_server.client(3))) == 1
    assert lock_keys(redis_server.client(BROKER_DB)) == []
    assert describe_store(app) == f"{redis_server.url(3)} (from broker_write_url)"


def test_broker_write_url_from_environment(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CELERY_BROKER_WRITE_URL wins over broker_url, as in Celery's conf.broker_write_url."""
    monkeypatch.setenv("CELERY_BROKER_WRITE_URL", redis_server.url(4))
    app = make_app(redis_server.url(BROKER_DB))
    enqueue(app)
    assert len(lock_keys(redis_server.client(4))) == 1


@pytest.mark.parametrize("form", ["string", "list"])
def test_failover_broker_takes_the_first_redis(redis_server: RedisServer, form: str) -> None:
    """A failover broker_url (';'-separated or a list) puts the locks in its first Redis URL."""
    # Nothing listens on the second one: the locks must not go there.
    urls = [redis_server.url(BROKER_DB), f"redis://127.0.0.1:{free_port()}/0"]
    app = make_app(";".join(urls) if form == "string" else urls)
    first = enqueue(app)
    with pytest.raises(DuplicateTaskError) as info:
        enqueue(app)
    assert redis_server.client(BROKER_DB).get(info.value.key) == first.id.encode()
    assert describe_store(app) == f"{urls[0]} (from broker_url)"


def test_failover_list_skips_entries_that_are_not_redis(redis_server: RedisServer) -> None:
    """In a failover list the first Redis URL is used, whatever precedes it."""
    app = make_app(broker_write_url=["memory://", redis_server.url(5)])
    assert describe_store(app) == f"{redis_server.url(5)} (from broker_write_url)"


# --- unix sockets ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def socket_server() -> Iterator[tuple[RedisServer, str]]:
    """A redis-server that also listens on a unix socket in a short temporary directory."""
    # Short: a unix socket path is limited to about 100 bytes.
    directory = tempfile.mkdtemp(prefix="cu-sock-")
    path = str(Path(directory) / "redis.sock")
    try:
        server = RedisServer(extra_args=["--unixsocket", path, "--unixsocketperm", "700"]).start()
    except RuntimeError as exc:
        shutil.rmtree(directory, ignore_errors=True)
        if CI:
            raise
        pytest.skip(f"no Redis server: {exc}")
    try:
        yield server, path
    finally:
        server.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize(
    ("url", "db"),
    [
        ("unix://{path}?db=3", 3),
        ("unix://{path}", 0),
        ("redis+socket://{path}?virtual_host=4", 4),
        ("redis+socket://{path}", 0),
        ("socket://{path}?virtual_host=5", 5),
    ],
)
def test_unix_socket_lock_store(
    redis_server: RedisServer, socket_server: tuple[RedisServer, str], url: str, db: int
) -> None:
    """unique_redis_url over a unix socket, in redis-py's and kombu's spellings, uses its database."""
    server, path = socket_server
    server.client(db).flushdb()
    app = make_app(redis_server.url(BROKER_DB), unique_redis_url=url.format(path=path))
    first = enqueue(app)
    with pytest.raises(DuplicateTaskError) as info:
        enqueue(app)
    assert server.client(db).get(info.value.key) == first.id.encode()


def test_unix_socket_broker_is_inherited(socket_server: tuple[RedisServer, str]) -> None:
    """A redis+socket:// broker (kombu's form) holds the locks in its virtual_host database."""
    server, path = socket_server
    server.client(6).flushdb()
    app = make_app(f"redis+socket://{path}?virtual_host=6")
    enqueue(app)
    assert len(lock_keys(server.client(6))) == 1
    # The message went there too: kombu reads the URL the same way.
    assert server.client(6).llen("celery") == 1


def test_unix_socket_url_with_db_is_refused(socket_server: tuple[RedisServer, str]) -> None:
    """redis+socket://...?db=N, which kombu ignores, is a ConfigurationError naming virtual_host."""
    _, path = socket_server
    app = make_app("memory://", unique_redis_url=f"redis+socket://:{SECRET}@{path}?db=2")
    error = refused(app, "virtual_host")
    assert "unique_redis_url" in str(error)
    assert SECRET not in str(error)


# --- Sentinel brokers --------------------------------------------------------------------------


def test_sentinel_broker_inherits_its_master_name() -> None:
    """A sentinel:// broker is inherited with broker_transport_options' master_name, and nothing else."""
    app = make_app(
        f"sentinel://u:{SECRET}@127.0.0.1:26379/3;sentinel://127.0.0.1:26380",
        broker_transport_options={"master_name": "mymaster", "visibility_timeout": 5},
    )
    description = describe_store(app)
    assert description == (
        "sentinel://u:***@127.0.0.1:26379/3;sentinel://127.0.0.1:26380 master 'mymaster' (from broker_url)"
    )
    from celery_unique.config import app_state

    target = app_state(app).target
    assert target.master_name == "mymaster"
    assert target.address.connection == {"username": "u", "password": SECRET, "db": 3}
    assert "visibility_timeout" not in target.sentinel_kwargs


def test_sentinel_broker_without_master_name() -> None:
    """A sentinel:// broker with no master_name anywhere is a ConfigurationError naming both settings."""
    app = make_app(f"sentinel://:{SECRET}@127.0.0.1:{free_port()}")
    error = refused(app, "master_name")
    assert "broker_transport_options" in str(error)
    assert "unique_redis_transport_options" in str(error)
    assert SECRET not in str(error)


# --- errors name the setting, and never print a secret ------------------------------------------


@pytest.mark.parametrize(
    ("conf", "named"),
    [
        ({"broker_url": f"amqp://u:{SECRET}@rabbit//"}, "broker_url"),
        ({"broker_url": [f"amqp://u:{SECRET}@a//", f"amqp://u:{SECRET}@b//"]}, "broker_url"),
        ({"unique_redis_url": f"redis://u:{SECRET}@127.0.0.1:notaport/0"}, "unique_redis_url"),
        ({"unique_redis_url": f"redis://u:{SECRET}@127.0.0.1/zero"}, "unique_redis_url"),
        ({"unique_redis_url": f"redis://:{SECRET}@a:1/0;redis://:{SECRET}@b:1/0"}, "unique_redis_url"),
        ({"unique_redis_url": f"http://u:{SECRET}@127.0.0.1/"}, "unique_redis_url"),
        ({"unique_redis_url": f"redis://u:{SECRET}@127.0.0.1/0?bogus=1"}, "unique_redis_url"),
        ({"unique_redis_url": f"redis://127.0.0.1/0?password={SECRET}&ssl_cert_reqs=required"},
         "unique_redis_url"),
        ({"unique_redis_url": f"sentinel://u:{SECRET}@127.0.0.1:26379/x"}, "unique_redis_url"),
        ({"unique_redis_url": f"sentinel://u:{SECRET}@127.0.0.1:26379;redis://h"}, "unique_redis_url"),
        ({"unique_redis_url": f"unix://u:{SECRET}@/tmp/x.sock?db=zero"}, "unique_redis_url"),
        ({"unique_redis_url": f"rediss://u:{SECRET}@127.0.0.1/0?ssl_cert_reqs=CERT_SOMETIMES"},
         "ssl_cert_reqs"),
        ({"unique_redis_url": f"redis://u:{SECRET}@127.0.0.1/0",
          "unique_redis_options": {"ssl_ca_certs": "/ca.pem"}}, "unique_redis_options"),
        ({"unique_redis_url": f"redis://u:{SECRET}@127.0.0.1/0",
          "unique_redis_options": {"no_such_option": 1}}, "unique_redis_options"),
        ({"unique_redis_url": (f"redis://u:{SECRET}@127.0.0.1/0",)}, "unique_redis_url"),
    ],
)
def test_bad_urls_are_named_and_redacted(
    redis_server: RedisServer, broker: redis.Redis, conf: dict[str, Any], named: str
) -> None:
    """A malformed URL is a ConfigurationError at the first enqueue, naming it, password hidden."""
    conf = dict(conf)
    app = make_app(conf.pop("broker_url", redis_server.url(BROKER_DB)), **conf)
    error = refused(app, named)
    assert SECRET not in str(error)
    assert broker.dbsize() == 0  # nothing published


def test_inheriting_logs_the_store_without_its_password(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The INFO line that says the broker's Redis holds the locks hides the password."""
    admin = redis_server.client()
    admin.execute_command("ACL", "SETUSER", "lockuser", "on", f">{SECRET}", "~*", "+@all")
    try:
        url = f"redis://lockuser:{SECRET}@127.0.0.1:{redis_server.port}/{BROKER_DB}"
        app = make_app(url)
        with caplog.at_level(logging.INFO, logger="celery_unique"):
            enqueue(app)
        assert f"redis://lockuser:***@127.0.0.1:{redis_server.port}/{BROKER_DB}" in caplog.text
        assert SECRET not in caplog.text
        assert SECRET not in describe_store(app)
    finally:
        admin.execute_command("ACL", "DELUSER", "lockuser")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"redis://user:{SECRET}@h:6379/0", "redis://user:***@h:6379/0"),
        (f"redis://:{SECRET}@h:6379/0", "redis://:***@h:6379/0"),
        (f"redis://{SECRET}@h/0", "redis://***@h/0"),
        (f"redis://u:{SECRET}@h/0;redis://v:{SECRET}@k/0", "redis://u:***@h/0;redis://v:***@k/0"),
        (f"sentinel://u:{SECRET}@a:26379/2;sentinel://:{SECRET}@b:26379",
         "sentinel://u:***@a:26379/2;sentinel://:***@b:26379"),
        (f"redis+socket://:{SECRET}@/run/redis.sock?virtual_host=2",
         "redis+socket://:***@/run/redis.sock?virtual_host=2"),
        (f"unix:///run/redis.sock?db=2&password={SECRET}", "unix:///run/redis.sock?db=2&password=***"),
        (f"redis://u:p@ss:{SECRET}@h/0", "redis://u:***@h/0"),  # an unquoted '@' in the password
        (f"u:{SECRET}@h:6379", "u:***@h:6379"),  # no scheme at all
        (f"rediss://h/0?ssl_password={SECRET}&ssl_cert_reqs=none", "rediss://h/0?ssl_password=***&ssl_cert_reqs=none"),
        ("redis://h:6379/0", "redis://h:6379/0"),
    ],
)
def test_redact(url: str, shown: str) -> None:
    """redact() hides the password of every URL form, and leaves the rest readable."""
    assert redact(url) == shown
    assert redact([url]) == [shown]


# --- Django-style settings -----------------------------------------------------------------------


def _django_app(**settings: Any) -> Celery:
    namespace = type("DjangoSettings", (), {f"CELERY_{key}": value for key, value in settings.items()})
    app = Celery("django", set_as_current=False)
    app.config_from_object(namespace, namespace="CELERY")

    @app.task(base=UniqueTask, name="tests.settings", shared=False)
    def settings_task(x: int) -> int:
        return x

    return app


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"UNIQUE_KEY_PREFIX": ""}, "CELERY_UNIQUE_KEY_PREFIX"),
        ({"UNIQUE_REDIS_SOCKET_TIMEOUT": "5"}, "CELERY_UNIQUE_REDIS_SOCKET_TIMEOUT"),
        ({"UNIQUE_ON_DUPLICATE": "ignore"}, "CELERY_UNIQUE_ON_DUPLICATE"),
        ({"UNIQUE_REDIS_URL": f"rediss://:{SECRET}@h/0?ssl_cert_reqs=sometimes"}, "CELERY_UNIQUE_REDIS_URL"),
        ({"BROKER_URL": f"amqp://u:{SECRET}@rabbit//"}, "CELERY_BROKER_URL"),
        ({"BROKER_URL": "redis://h/0", "BROKER_USE_SSL": {"ssl_cert_reqs": "maybe"}},
         "CELERY_BROKER_USE_SSL"),
    ],
)
def test_errors_name_django_settings(settings: dict[str, Any], named: str) -> None:
    """With namespace='CELERY', a configuration error names the Django setting (CELERY_...)."""
    settings.setdefault("BROKER_URL", "memory://")
    app = _django_app(**settings)
    error = refused(app, named)
    assert SECRET not in str(error)


def test_describe_store_names_django_setting(redis_server: RedisServer) -> None:
    """describe_store() names CELERY_UNIQUE_REDIS_URL for a Django-configured app."""
    app = _django_app(BROKER_URL="memory://", UNIQUE_REDIS_URL=redis_server.url(2))
    assert describe_store(app) == f"{redis_server.url(2)} (CELERY_UNIQUE_REDIS_URL)"


# --- combinations the lock store refuses -------------------------------------------------------


@pytest.mark.parametrize(
    ("conf", "named"),
    [
        ({"broker_url": f"sentinel://:{SECRET}@127.0.0.1:26379",
          "broker_transport_options": {"master_name": "m"},
          "broker_use_ssl": {"ssl_cert_reqs": "required"}}, "not supported"),
        ({"unique_redis_url": f"sentinel://:{SECRET}@127.0.0.1:26379",
          "unique_redis_transport_options": {"master_name": "m"},
          "unique_redis_options": {"ssl_cert_reqs": "required"}}, "not supported"),
        ({"broker_url": f"redis+socket://:{SECRET}@/tmp/r.sock",
          "broker_use_ssl": {"ssl_cert_reqs": "required"}}, "unix socket"),
        ({"unique_redis_url": f"unix://:{SECRET}@/tmp/r.sock", "unique_redis_cluster": True}, "unix socket"),
        ({"unique_redis_url": f"redis://:{SECRET}@127.0.0.1:7000/3", "unique_redis_cluster": True},
         "database 0"),
        ({"unique_redis_url": f"sentinel://:{SECRET}@127.0.0.1:26379",
          "unique_redis_transport_options": {"master_name": "m"},
          "unique_redis_cluster": True}, "Sentinel"),
    ],
)
def test_unsupported_combinations(conf: dict[str, Any], named: str) -> None:
    """Settings that cannot work together are a ConfigurationError at the first enqueue, password hidden."""
    conf = dict(conf)
    app = make_app(conf.pop("broker_url", "memory://"), **conf)
    error = refused(app, named)
    assert SECRET not in str(error)


def test_describe_store_of_a_cluster() -> None:
    """describe_store() says when the URL is a Redis Cluster's seed node."""
    app = make_app("memory://", unique_redis_url="redis://10.0.0.1:7000/0", unique_redis_cluster=True)
    assert describe_store(app) == "Redis Cluster redis://10.0.0.1:7000/0 (unique_redis_url)"


def test_redis_options_win_over_the_url(redis_server: RedisServer) -> None:
    """unique_redis_options override what the URL says (here, its database)."""
    app = make_app("memory://", unique_redis_url=redis_server.url(2), unique_redis_options={"db": 7})
    enqueue(app)
    assert len(lock_keys(redis_server.client(7))) == 1
    assert lock_keys(redis_server.client(2)) == []
