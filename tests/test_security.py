"""Security: locks over TLS (``rediss://``) and through a Redis ACL user."""

from __future__ import annotations

import logging
import shutil
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_unique import (
    ConfigurationError,
    DuplicateTaskError,
    LockStoreError,
    UniqueTaskError,
)
from celery_unique.config import describe_store, lock_store
from celery_unique.testing import RedisServer
from tests.conftest import BROKER_DB, CI
from tests.reliability_support import (
    QUEUE,
    TlsFiles,
    TlsUnsupportedError,
    make_app,
    make_tls_files,
    tls_redis_server,
)


def _tls_server(directory: Path, *, auth_clients: bool) -> Iterator[tuple[TlsFiles, int]]:
    if shutil.which("openssl") is None:
        if CI:
            pytest.fail("openssl is not on PATH")
        pytest.skip("openssl is not on PATH")
    files = make_tls_files(directory)
    try:
        with tls_redis_server(files, directory, auth_clients=auth_clients) as port:
            yield files, port
    except TlsUnsupportedError as exc:
        if CI:
            raise
        pytest.skip(f"this redis-server was built without TLS: {exc}")


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[tuple[TlsFiles, int]]:
    """A TLS-only redis-server with a throwaway CA; skipped locally (failed in CI) without TLS."""
    yield from _tls_server(tmp_path, auth_clients=False)


@pytest.fixture
def mtls(tmp_path: Path) -> Iterator[tuple[TlsFiles, int]]:
    """A TLS-only redis-server that also asks clients for a certificate signed by its CA."""
    yield from _tls_server(tmp_path, auth_clients=True)


def _tls_client(files: TlsFiles, port: int, db: int = 0) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1", port=port, db=db, ssl=True, ssl_ca_certs=str(files.ca_cert),
        ssl_certfile=str(files.client_cert), ssl_keyfile=str(files.client_key),
    )


def _tls_app(broker: RedisServer, url: str, **options: Any) -> Celery:
    return make_app(broker.url(BROKER_DB), url, unique_redis_socket_timeout=2, unique_redis_options=options)


def test_rediss_with_ca_option(redis_server: RedisServer, tls: tuple[TlsFiles, int]) -> None:
    """Locks over rediss:// with ssl_ca_certs in unique_redis_options: lock, refuse, release."""
    files, port = tls
    app = _tls_app(redis_server, f"rediss://127.0.0.1:{port}/2", ssl_ca_certs=str(files.ca_cert))
    task = app.tasks["rel.noop"]
    first = task.apply_async((1,), unique=60)
    with pytest.raises(DuplicateTaskError):
        task.apply_async((1,), unique=60)
    assert lock_store(app).release(task.lock_key((1,), {}, {}), first.id) is True


def test_rediss_with_ca_in_url(redis_server: RedisServer, tls: tuple[TlsFiles, int]) -> None:
    """Locks over rediss:// with the CA given as the URL query ssl_ca_certs=."""
    files, port = tls
    app = _tls_app(redis_server, f"rediss://127.0.0.1:{port}/2?ssl_ca_certs={files.ca_cert}")
    task = app.tasks["rel.noop"]
    task.apply_async((1,), unique=60)
    with pytest.raises(DuplicateTaskError):
        task.apply_async((1,), unique=60)


def test_rediss_rejects_an_unknown_ca(
    redis_server: RedisServer, tls: tuple[TlsFiles, int], broker: redis.Redis
) -> None:
    """Without the test CA the server's certificate is refused: LockStoreError, nothing published."""
    _, port = tls
    app = _tls_app(redis_server, f"rediss://127.0.0.1:{port}/2")
    with pytest.raises(LockStoreError) as info:
        app.tasks["rel.noop"].apply_async((1,), unique=60)
    assert "certificate" in str(info.value).lower()
    assert broker.dbsize() == 0


def test_plain_redis_to_a_tls_port_fails_clearly(
    redis_server: RedisServer, tls: tuple[TlsFiles, int]
) -> None:
    """A redis:// URL pointed at the TLS port fails with LockStoreError, not a hang."""
    _, port = tls
    app = _tls_app(redis_server, f"redis://127.0.0.1:{port}/2")
    with pytest.raises(LockStoreError):
        app.tasks["rel.noop"].apply_async((1,), unique=60)


@pytest.fixture
def acl_server() -> Iterator[RedisServer]:
    """A redis-server with an ACL user ``unique`` (password ``secret``) and no default access."""
    with RedisServer() as server:
        admin = server.client()
        admin.execute_command("ACL", "SETUSER", "unique", "on", ">secret", "~*", "+@all")
        # Switch the default user off last, so only the named user can work from now on.
        admin.execute_command("ACL", "SETUSER", "default", "off")
        admin.close()
        yield server


def test_acl_user(redis_server: RedisServer, acl_server: RedisServer) -> None:
    """Locks work as an ACL user given in the URL (redis://unique:secret@host:port/0)."""
    app = make_app(redis_server.url(BROKER_DB), f"redis://unique:secret@127.0.0.1:{acl_server.port}/0")
    task = app.tasks["rel.noop"]
    task.apply_async((1,), unique=60)
    with pytest.raises(DuplicateTaskError):
        task.apply_async((1,), unique=60)


def test_acl_wrong_password(redis_server: RedisServer, acl_server: RedisServer, broker: redis.Redis) -> None:
    """A wrong password is a UniqueTaskError subclass that does not echo any password."""
    app = make_app(
        redis_server.url(BROKER_DB), f"redis://unique:not-the-s3cret@127.0.0.1:{acl_server.port}/0"
    )
    with pytest.raises(UniqueTaskError) as info:
        app.tasks["rel.noop"].apply_async((1,), unique=60)
    assert isinstance(info.value, LockStoreError)
    assert isinstance(info.value.__cause__, redis.AuthenticationError)
    assert "not-the-s3cret" not in str(info.value)
    assert broker.dbsize() == 0


def test_acl_user_without_scripting(redis_server: RedisServer, acl_server: RedisServer) -> None:
    """A user barred from Lua scripts gets LockStoreError naming the refused permission."""
    # The default user is off, so the new user is made by the one that can.
    admin = redis.Redis(host="127.0.0.1", port=acl_server.port, username="unique", password="secret")
    admin.execute_command("ACL", "SETUSER", "noscript", "on", ">pw", "~*", "+@all", "-@scripting")
    admin.close()
    app = make_app(redis_server.url(BROKER_DB), f"redis://noscript:pw@127.0.0.1:{acl_server.port}/0")
    with pytest.raises(LockStoreError) as info:
        app.tasks["rel.noop"].apply_async((1,), unique=60)
    assert isinstance(info.value.__cause__, redis.ResponseError)
    assert "permission" in str(info.value).lower()


# --- TLS settings in every form Celery documents -----------------------------------------------


@pytest.mark.parametrize("reqs", ["CERT_REQUIRED", "required", "CERT_OPTIONAL", "optional"])
def test_rediss_cert_reqs_spellings(redis_server: RedisServer, tls: tuple[TlsFiles, int], reqs: str) -> None:
    """ssl_cert_reqs in a rediss:// URL works in Celery's spelling (CERT_REQUIRED) and kombu's (required)."""
    files, port = tls
    app = _tls_app(redis_server, f"rediss://127.0.0.1:{port}/2?ssl_cert_reqs={reqs}&ssl_ca_certs={files.ca_cert}")
    task = app.tasks["rel.noop"]
    first = task.apply_async((1,), unique=60)
    with pytest.raises(DuplicateTaskError) as info:
        task.apply_async((1,), unique=60)
    assert _tls_client(files, port, db=2).get(info.value.key) == first.id.encode()


@pytest.mark.parametrize("reqs", ["CERT_NONE", "none"])
def test_rediss_cert_none_needs_no_ca(
    redis_server: RedisServer, tls: tuple[TlsFiles, int], reqs: str
) -> None:
    """ssl_cert_reqs=CERT_NONE (or none) connects without the CA, as the setting says."""
    _, port = tls
    app = _tls_app(redis_server, f"rediss://127.0.0.1:{port}/2?ssl_cert_reqs={reqs}")
    app.tasks["rel.noop"].apply_async((1,), unique=60)
    with pytest.raises(DuplicateTaskError):
        app.tasks["rel.noop"].apply_async((1,), unique=60)


def test_rediss_client_certificate_in_url(
    redis_server: RedisServer, mtls: tuple[TlsFiles, int], broker: redis.Redis
) -> None:
    """ssl_ca_certs, ssl_certfile and ssl_keyfile in the URL reach a server that asks for a client cert."""
    files, port = mtls
    base = f"rediss://127.0.0.1:{port}/2?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs={files.ca_cert}"
    app = _tls_app(redis_server, f"{base}&ssl_certfile={files.client_cert}&ssl_keyfile={files.client_key}")
    app.tasks["rel.noop"].apply_async((1,), unique=60)
    with pytest.raises(DuplicateTaskError):
        app.tasks["rel.noop"].apply_async((1,), unique=60)
    # Without the client certificate the server refuses the connection.
    without = _tls_app(redis_server, base)
    with pytest.raises(LockStoreError):
        without.tasks["rel.noop"].apply_async((2,), unique=60)


@pytest.mark.parametrize(
    ("scheme", "reqs"),
    [
        ("rediss", ssl.CERT_REQUIRED),
        ("rediss", "required"),
        # kombu reads a dict broker_use_ssl as TLS whatever the scheme.
        ("redis", ssl.CERT_REQUIRED),
    ],
)
def test_broker_use_ssl_is_inherited(
    mtls: tuple[TlsFiles, int], scheme: str, reqs: Any
) -> None:
    """A TLS broker set with broker_use_ssl (a dict) holds the locks over the same TLS settings."""
    files, port = mtls
    app = make_app(
        f"{scheme}://127.0.0.1:{port}/0",
        None,
        broker_use_ssl={
            "ssl_cert_reqs": reqs,
            "ssl_ca_certs": str(files.ca_cert),
            "ssl_certfile": str(files.client_cert),
            "ssl_keyfile": str(files.client_key),
        },
    )
    first = app.tasks["rel.noop"].apply_async((1,), unique=60)
    with pytest.raises(DuplicateTaskError) as info:
        app.tasks["rel.noop"].apply_async((1,), unique=60)
    server = _tls_client(files, port)
    assert server.get(info.value.key) == first.id.encode()
    assert server.llen(QUEUE) == 1  # kombu published there with the same settings
    assert describe_store(app) == f"{scheme}://127.0.0.1:{port}/0 (from broker_url)"


def test_tls_options_in_a_redis_broker_url(tls: tuple[TlsFiles, int]) -> None:
    """ssl_* options in a redis:// broker URL mean TLS, as kombu reads them, for the locks too."""
    files, port = tls
    query = f"ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs={files.ca_cert}"
    app = make_app(f"redis://127.0.0.1:{port}/0?{query}", None)
    store = lock_store(app)
    assert store.acquire("unique:reliability:rel.noop:y", "task-2", 60_000) is None
    assert _tls_client(files, port).get("unique:reliability:rel.noop:y") == b"task-2"


def test_broker_use_ssl_in_celerys_spelling(mtls: tuple[TlsFiles, int]) -> None:
    """broker_use_ssl's ssl_cert_reqs may be the string "CERT_REQUIRED", as Celery spells it in URLs."""
    # kombu hands this string to redis-py unchanged, which refuses it, so only
    # the lock store is exercised here.
    files, port = mtls
    app = make_app(
        f"rediss://127.0.0.1:{port}/0",
        None,
        broker_use_ssl={
            "ssl_cert_reqs": "CERT_REQUIRED",
            "ssl_ca_certs": str(files.ca_cert),
            "ssl_certfile": str(files.client_cert),
            "ssl_keyfile": str(files.client_key),
        },
    )
    store = lock_store(app)
    assert store.acquire("unique:reliability:rel.noop:x", "task-1", 60_000) is None
    assert _tls_client(files, port).get("unique:reliability:rel.noop:x") == b"task-1"
    assert store.release("unique:reliability:rel.noop:x", "task-1") is True


def test_bare_rediss_broker_is_read_as_kombu_reads_it(
    tls: tuple[TlsFiles, int], caplog: pytest.LogCaptureFixture
) -> None:
    """A rediss:// broker with no TLS options is unverified in kombu, so in the lock store, with a warning."""
    files, port = tls
    app = make_app(f"rediss://127.0.0.1:{port}/0", None)
    with caplog.at_level(logging.WARNING, logger="celery_unique"):
        first = app.tasks["rel.noop"].apply_async((1,), unique=60)
    with pytest.raises(DuplicateTaskError) as info:
        app.tasks["rel.noop"].apply_async((1,), unique=60)
    assert _tls_client(files, port).get(info.value.key) == first.id.encode()
    assert "not verified" in caplog.text


@pytest.mark.parametrize(
    ("conf", "named", "value"),
    [
        ({"unique_redis_url": "rediss://u:{secret}@127.0.0.1:1/0?ssl_cert_reqs=CERT_SOMETIMES"},
         "unique_redis_url", "CERT_SOMETIMES"),
        ({"unique_redis_url": "rediss://u:{secret}@127.0.0.1:1/0?ssl_ca_certs={missing}"},
         "ssl_ca_certs", "{missing}"),
        ({"unique_redis_url": "rediss://u:{secret}@127.0.0.1:1/0?ssl_certfile={bogus}&ssl_keyfile={bogus}"},
         "ssl_certfile", "do not load"),
        ({"broker_url": "rediss://u:{secret}@127.0.0.1:1/0",
          "broker_use_ssl": {"ssl_cert_reqs": "sometimes"}}, "broker_use_ssl", "sometimes"),
        ({"broker_url": "rediss://u:{secret}@127.0.0.1:1/0",
          "broker_use_ssl": {"ssl_ca_certs": "{missing}"}}, "broker_use_ssl", "{missing}"),
        ({"broker_url": "rediss://u:{secret}@127.0.0.1:1/0", "broker_use_ssl": {"ssl_verify": True}},
         "broker_use_ssl", "ssl_verify"),
        ({"unique_redis_url": "rediss://u:{secret}@127.0.0.1:1/0",
          "unique_redis_options": {"ssl_ca_certs": "{bogus}"}}, "unique_redis_options", "do not load"),
        ({"unique_redis_url": "rediss://u:{secret}@127.0.0.1:1/0",
          "unique_redis_options": {"ssl_cert_reqs": 7}}, "unique_redis_options", "7"),
    ],
)
def test_malformed_tls_settings(
    redis_server: RedisServer,
    broker: redis.Redis,
    tmp_path: Path,
    conf: dict[str, Any],
    named: str,
    value: str,
) -> None:
    """A malformed TLS setting is a ConfigurationError naming it and its value, password hidden."""
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate\n")
    fill = {"secret": "s3cret-pw", "missing": str(tmp_path / "missing.pem"), "bogus": str(bogus)}

    def filled(item: Any) -> Any:
        if isinstance(item, str):
            return item.format(**fill)
        return {k: filled(v) for k, v in item.items()} if isinstance(item, dict) else item

    conf = {key: filled(item) for key, item in conf.items()}
    app = make_app(conf.pop("broker_url", redis_server.url(BROKER_DB)), None, **conf)
    with pytest.raises(ConfigurationError, match=named) as info:
        app.tasks["rel.noop"].apply_async((1,), unique=60)
    assert value.format(**fill) in str(info.value)
    assert "s3cret-pw" not in str(info.value)
    assert broker.dbsize() == 0
