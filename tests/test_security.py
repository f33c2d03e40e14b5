"""Security: locks over TLS (``rediss://``) and through a Redis ACL user."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_unique import DuplicateTaskError, LockStoreError, UniqueTaskError
from celery_unique.config import lock_store
from celery_unique.testing import RedisServer
from tests.conftest import BROKER_DB, CI
from tests.reliability_support import (
    TlsFiles,
    TlsUnsupportedError,
    make_app,
    make_tls_files,
    tls_redis_server,
)


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[tuple[TlsFiles, int]]:
    """A TLS-only redis-server with a throwaway CA; skipped locally (failed in CI) without TLS."""
    if shutil.which("openssl") is None:
        if CI:
            pytest.fail("openssl is not on PATH")
        pytest.skip("openssl is not on PATH")
    files = make_tls_files(tmp_path)
    try:
        with tls_redis_server(files, tmp_path) as port:
            yield files, port
    except TlsUnsupportedError as exc:
        if CI:
            raise
        pytest.skip(f"this redis-server was built without TLS: {exc}")


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
