"""Build the lock store's Redis client: one server, Sentinel, or a Cluster.

The settings follow Celery's own Redis conventions:

* ``redis://``, ``rediss://`` and ``unix://`` URLs name one server, as
  ``broker_url`` does; TLS files go in the URL or in ``unique_redis_options``.
* ``sentinel://host:port;sentinel://host2:port`` names Sentinels, with the
  master's name in ``unique_redis_transport_options={"master_name": ...}``,
  as ``broker_transport_options`` and ``result_backend_transport_options`` do.
* ``unique_redis_cluster = True`` makes the URL a seed node of a Redis Cluster
  (redis-py's ``RedisCluster``). Every lock operation touches one key, so each
  is valid on a cluster, and keys spread over all slots.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from .errors import ConfigurationError

__all__ = ["connect"]


def connect(
    url: str,
    *,
    socket_timeout: float,
    options: Mapping[str, Any],
    transport_options: Mapping[str, Any],
    cluster: bool,
) -> Any:
    """Return a redis-py client for ``url`` that waits at most ``socket_timeout`` s.

    A dropped connection (a restarted server, a pooled socket closed by a
    proxy) is retried once on a fresh connection; timeouts are not retried,
    so the caller hears of a stalled server within ``socket_timeout``.
    """
    kwargs: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        **options,
    }
    if url.startswith("sentinel://"):
        return _sentinel_master(url, kwargs, transport_options)
    if cluster:
        return RedisCluster.from_url(url, **kwargs)
    kwargs.setdefault("retry", _retry_once())
    return redis.Redis.from_url(url, **kwargs)


def _retry_once() -> Retry:
    return Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))


def _sentinel_master(
    url: str, kwargs: dict[str, Any], transport_options: Mapping[str, Any]
) -> redis.Redis:
    master_name = transport_options.get("master_name")
    if not master_name:
        raise ConfigurationError(
            f"a sentinel:// unique_redis_url needs the master's name: set "
            f"unique_redis_transport_options = {{'master_name': ...}} (got {dict(transport_options)!r})"
        )
    hosts: list[tuple[str, int]] = []
    password = db = None
    for part in url.split(";"):
        parts = urlsplit(part.strip())
        if parts.scheme != "sentinel" or not parts.hostname:
            raise ConfigurationError(f"unique_redis_url: {part.strip()!r} is not a sentinel://host:port URL")
        hosts.append((parts.hostname, parts.port or 26379))
        password = password or (unquote(parts.password) if parts.password else None)
        path = parts.path.strip("/")
        db = db if db is not None else (int(path) if path.isdigit() else None)
    sentinel_kwargs = dict(transport_options.get("sentinel_kwargs") or {})
    for name in ("socket_timeout", "socket_connect_timeout"):
        sentinel_kwargs.setdefault(name, kwargs[name])
    sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs, **kwargs)  # type: ignore[no-untyped-call]
    # The master is looked up again whenever its connection fails, so after a
    # failover the next enqueue reaches the new master.
    master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        master_name, db=db or 0, password=password, retry=_retry_once()
    )
    return master
