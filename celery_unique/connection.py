"""Build the lock store's Redis client: one server, Sentinel, or a Cluster.

The address comes resolved in a :class:`celery_unique.store_target.StoreTarget`
(URL, TLS and ``unique_redis_options`` merged); this module picks the client:

* one server (``redis://``, ``rediss://``, a unix socket): ``redis.Redis``;
* ``sentinel://`` URLs: the master of ``master_name``, looked up through the
  Sentinels whenever a connection to it is opened, so a failover is followed;
* ``unique_redis_cluster = True``: ``redis.cluster.RedisCluster`` seeded with
  the URL's node. Every lock operation touches one key, so each is valid on a
  cluster, and keys spread over all slots.

Every client waits at most ``unique_redis_socket_timeout`` for a connection or
a reply. A dropped connection (a restarted server, a pooled socket closed by a
proxy, a master demoted by a failover) is retried once on a fresh connection;
a timeout is not, so the caller hears of a stalled server within the timeout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import ClusterError, RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel

from .compat import cluster_retry_options
from .errors import ConfigurationError
from .redis_url import redact

if TYPE_CHECKING:
    from .store_target import StoreTarget

__all__ = ["CLUSTER_RETRIES", "MAX_CONNECTIONS", "connect"]

#: How many times a cluster command is retried after a connection error, a
#: timeout or CLUSTERDOWN. redis-py's default (3, with a backoff and a
#: topology refresh each time) made one failing call take 2.8 s at a 0.5 s
#: timeout; with none, a call fails after its own timeout plus one refresh.
CLUSTER_RETRIES = 0
#: Connections to one server per process (``unique_redis_options`` may set
#: ``max_connections``), and as many again for the hot paths' own.
MAX_CONNECTIONS = 50


def connect(target: StoreTarget, socket_timeout: float) -> Any:
    """Return a redis-py client for ``target`` that waits at most ``socket_timeout`` s."""
    kwargs: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        **target.address.connection,
    }
    if target.address.sentinels:
        if target.cluster:
            raise ConfigurationError(
                f"unique_redis_cluster is True, but the lock store is Sentinel: "
                f"{redact(target.address.url)!r}"
            )
        return _sentinel_master(target, kwargs)
    if target.cluster:
        return _cluster(target, kwargs)
    _retry_once(kwargs)
    # Bounded, and blocking when every connection is out: a gevent worker or
    # producer running hundreds of greenlets shares a few connections
    # instead of opening one per greenlet.
    limit = kwargs.pop("max_connections", MAX_CONNECTIONS)
    # redis-py 8 leaves BlockingConnectionPool's __init__ unannotated.
    pool = redis.BlockingConnectionPool(  # type: ignore[no-untyped-call,unused-ignore]
        max_connections=limit, timeout=socket_timeout, **kwargs
    )
    return redis.Redis(connection_pool=pool)


def _retry_once(kwargs: dict[str, Any]) -> None:
    """Resend a command once on a dropped connection, unless the URL says otherwise.

    Every script is safe to send twice (see :mod:`celery_unique.lock`).
    ``retry_on_error`` as well as ``retry``: before 5.1, redis-py retries a
    command only for the errors that one names, whatever ``retry`` says.
    """
    if "retry" not in kwargs:
        kwargs["retry"] = Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))
        kwargs.setdefault("retry_on_error", [redis.ConnectionError])


def _sentinel_master(target: StoreTarget, kwargs: dict[str, Any]) -> redis.Redis:
    sentinel_kwargs = dict(target.sentinel_kwargs)
    for name in ("socket_timeout", "socket_connect_timeout"):
        sentinel_kwargs.setdefault(name, kwargs[name])
    db = kwargs.pop("db", 0)
    _retry_once(kwargs)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(target.address.sentinels), sentinel_kwargs=sentinel_kwargs, **kwargs
    )
    # The master is looked up again whenever its connection fails, and a
    # pooled connection to a master since demoted answers READONLY, which
    # redis-py turns into a ConnectionError: the retry then reaches the new
    # master, so a release after a failover lands where the lock now lives.
    master: redis.Redis = sentinel.master_for(target.master_name, db=db)  # type: ignore[no-untyped-call]
    return master


class _LockStoreCluster(RedisCluster):
    """``RedisCluster`` whose failures are all ``redis.RedisError``.

    redis-py raises ``RedisClusterException`` (not a ``RedisError``) when no
    node answers a topology refresh or a slot has no node: callers that
    catch ``RedisError`` for "the lock store did not answer" would miss it.
    """

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().execute_command(*args, **kwargs)  # type: ignore[no-untyped-call]
        except RedisClusterException as exc:
            raise _as_redis_error(exc) from exc


def _as_redis_error(exc: RedisClusterException) -> ClusterError:
    return ClusterError(f"{type(exc).__name__}: {exc}")


def _cluster(target: StoreTarget, kwargs: dict[str, Any]) -> RedisCluster:
    where = f"{target.address.setting} {redact(target.address.url)!r}"
    if "path" in kwargs:
        raise ConfigurationError(f"a Redis Cluster is reached over TCP, not a unix socket: {where}")
    if kwargs.pop("db", 0) != 0:
        raise ConfigurationError(f"a Redis Cluster has only database 0: {where}")
    options = {**cluster_retry_options(CLUSTER_RETRIES), **kwargs}
    try:
        return _LockStoreCluster(
            host=options.pop("host", "localhost"), port=options.pop("port", 6379), **options
        )
    except RedisClusterException as exc:
        # Building the client reads the slot map from the seed node.
        raise _as_redis_error(exc) from exc
