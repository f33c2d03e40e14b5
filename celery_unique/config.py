"""Settings read from the Celery app, once, and the per-app state built on them.

Every setting is a lower-case Celery setting with the ``unique_`` prefix, so it
works in ``app.conf``, in a config module and in Django-style settings loaded
with ``app.config_from_object(settings, namespace="CELERY")``
(``CELERY_UNIQUE_REDIS_URL``). They are read at the first unique enqueue (or
the first release in a worker) and cached on the app: change them before that.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError
from .options import ON_DUPLICATE, UNTIL, OnDuplicate, Until

if TYPE_CHECKING:
    from celery import Celery

    from .lock import LockStore

__all__ = ["UniqueConfig", "lock_store"]

logger = logging.getLogger(__name__)

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")  # a broker_url the locks can share

#: Attribute of the Celery app that holds this library's state for that app.
_STATE_ATTR = "_celery_unique_state"
_state_lock = threading.Lock()


@dataclass(frozen=True)
class UniqueConfig:
    """The ``unique_*`` settings of one Celery app."""

    #: Where the locks live. ``None`` falls back to a Redis ``broker_url``.
    redis_url: str | None = None
    #: First part of every lock key.
    key_prefix: str = "unique"
    #: Seconds to wait for the lock store to connect or answer.
    socket_timeout: float = 5.0
    #: Extra keyword arguments for ``redis.Redis.from_url`` (TLS files, ...).
    redis_options: dict[str, Any] = field(default_factory=dict)
    #: Sentinel options, as in ``broker_transport_options``: ``master_name``
    #: (required with a ``sentinel://`` URL) and ``sentinel_kwargs``.
    transport_options: dict[str, Any] = field(default_factory=dict)
    #: Treat the URL as a seed node of a Redis Cluster.
    cluster: bool = False
    #: Celery's ``task_default_queue``, read once with the rest: the queue of
    #: every call that names none, when there are no ``task_routes``.
    default_queue: str = "celery"
    #: App-wide default of the ``unique_until`` option.
    until: Until = "success"
    #: App-wide default of the ``on_duplicate`` option.
    on_duplicate: OnDuplicate = "raise"
    #: Seconds a running marker lives without a heartbeat (renewed every third
    #: of it): how long a copy of a task id waits after its worker died.
    running_ttl: float = 30.0
    #: Check a refused duplicate's holder against its stored state, and take
    #: over the lock of a holder that has finished (needs a result backend).
    check_holder: bool = True

    @classmethod
    def from_app(cls, app: Celery) -> UniqueConfig:
        """Read the ``unique_*`` settings of ``app``, checking each one."""
        conf = app.conf
        prefix = conf.get("unique_key_prefix", cls.key_prefix)
        if not isinstance(prefix, str) or not prefix:
            raise ConfigurationError(
                f"unique_key_prefix must be a non-empty string, not {prefix!r}"
            )
        timeout = conf.get("unique_redis_socket_timeout", cls.socket_timeout)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigurationError(
                f"unique_redis_socket_timeout must be a positive number of seconds, not {timeout!r}"
            )
        options = conf.get("unique_redis_options") or {}
        if not isinstance(options, dict):
            raise ConfigurationError(
                f"unique_redis_options must be a dict, not {options!r}"
            )
        transport_options = conf.get("unique_redis_transport_options") or {}
        if not isinstance(transport_options, dict):
            raise ConfigurationError(
                f"unique_redis_transport_options must be a dict, not {transport_options!r}"
            )
        cluster = conf.get("unique_redis_cluster", False)
        if not isinstance(cluster, bool):
            raise ConfigurationError(f"unique_redis_cluster must be True or False, not {cluster!r}")
        running_ttl = conf.get("unique_running_ttl", cls.running_ttl)
        if (
            isinstance(running_ttl, bool)
            or not isinstance(running_ttl, (int, float))
            or not running_ttl >= 1
        ):
            raise ConfigurationError(
                f"unique_running_ttl must be a number of seconds, at least 1, not {running_ttl!r}"
            )
        check_holder = conf.get("unique_check_holder", cls.check_holder)
        if not isinstance(check_holder, bool):
            raise ConfigurationError(
                f"unique_check_holder must be True or False, not {check_holder!r}"
            )
        url = conf.get("unique_redis_url")
        if url is not None and not isinstance(url, str):
            raise ConfigurationError(f"unique_redis_url must be a string, not {url!r}")
        until = conf.get("unique_until") or cls.until
        on_duplicate = conf.get("unique_on_duplicate") or cls.on_duplicate
        for setting, value, choices in (
            ("unique_until", until, UNTIL),
            ("unique_on_duplicate", on_duplicate, ON_DUPLICATE),
        ):
            if value not in choices:
                raise ConfigurationError(
                    f"{setting} must be one of {', '.join(map(repr, choices))}, not {value!r}"
                )
        return cls(
            default_queue=str(conf.get("task_default_queue") or cls.default_queue),
            transport_options=dict(transport_options),
            cluster=cluster,
            until=until,
            on_duplicate=on_duplicate,
            redis_url=url,
            key_prefix=prefix,
            socket_timeout=float(timeout),
            redis_options=dict(options),
            running_ttl=float(running_ttl),
            check_holder=check_holder,
        )

    def resolve_redis_url(self, app: Celery) -> str:
        """Return the lock store's URL: ``unique_redis_url``, else a Redis broker's."""
        if self.redis_url:
            return self.redis_url
        broker_url = app.conf.get("broker_url")
        if isinstance(broker_url, str) and broker_url.startswith(REDIS_SCHEMES):
            # A failover list ("redis://a;redis://b") names one server per entry;
            # locks must live in one place, so take the first.
            url = broker_url.split(";")[0].strip()
            # Only the URL is inherited, never broker_transport_options: options
            # meant for kombu's transport are not redis-py's.
            logger.info("celery_unique: unique_redis_url is not set, using the broker's Redis")
            return url
        raise ConfigurationError(
            "celery_unique needs a Redis for its locks: set unique_redis_url "
            f"(the broker URL {_redact(broker_url)!r} is not a redis://, rediss:// or unix:// URL)"
        )


def _redact(url: Any) -> Any:
    """Hide a password in a URL shown in an error message."""
    if isinstance(url, str) and "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


class _AppState:
    """What celery_unique keeps on one app: its config and its lock store."""

    def __init__(self, app: Celery) -> None:
        self.config = UniqueConfig.from_app(app)
        self._app = app
        self._store: LockStore | None = None

    @property
    def store(self) -> LockStore:
        if self._store is None:
            from .connection import connect
            from .lock import LockStore

            with _state_lock:
                if self._store is None:
                    self._store = LockStore(
                        connect(
                            self.config.resolve_redis_url(self._app),
                            socket_timeout=self.config.socket_timeout,
                            options=self.config.redis_options,
                            transport_options=self.config.transport_options,
                            cluster=self.config.cluster,
                        )
                    )
        return self._store


def app_state(app: Celery) -> _AppState:
    """Return the state cached on ``app``, creating it on first use."""
    state: _AppState | None = app.__dict__.get(_STATE_ATTR)
    if state is None:
        with _state_lock:
            state = app.__dict__.get(_STATE_ATTR)
            if state is None:
                state = _AppState(app)
                setattr(app, _STATE_ATTR, state)
    return state


def lock_store(app: Celery) -> LockStore:
    """Return the app's lock store (one Redis connection pool per app)."""
    return app_state(app).store
