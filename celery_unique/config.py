"""Settings read from the Celery app, once, and the per-app state built on them.

Every setting is a lower-case Celery setting with the ``unique_`` prefix, so it
works in ``app.conf``, in a config module and in Django-style settings loaded
with ``app.config_from_object(settings, namespace="CELERY")``
(``CELERY_UNIQUE_REDIS_URL``); errors name a setting as the app spells it.
They are read at the first unique enqueue (or the first release in a worker)
and cached on the app: change them before that.

Without ``unique_redis_url`` the locks go to the broker's Redis: the URL
Celery publishes with (``broker_write_url``, else ``broker_url``, each
possibly from its ``CELERY_BROKER_*`` environment variable), read with the
meaning kombu gives it, and ``broker_use_ssl``. Nothing else of the broker's
is inherited, except the Sentinel ``master_name`` and ``sentinel_kwargs`` of
a ``sentinel://`` broker, which say where its master is.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
from celery.utils.text import match_case

from .errors import ConfigurationError, UniqueTypeError, UniqueValueError
from .options import (
    MAX_LIMIT,
    ON_DUPLICATE,
    ON_STORE_ERROR,
    UNTIL,
    WHILE_RUNNING,
    OnDuplicate,
    OnStoreError,
    Until,
    WhileRunning,
    check_limit,
)
from .redis_url import (
    SERVER_SCHEMES,
    RedisAddress,
    check_connection_options,
    check_tls_options,
    parse_redis_url,
    redact,
)
from .store_target import StoreTarget
from .ttl import max_wait_ms

if TYPE_CHECKING:
    from celery import Celery

    from .lock import LockStore

__all__ = [
    "ENABLED_VARIABLE",
    "StoreTarget",
    "UniqueConfig",
    "describe_store",
    "lock_store",
    "locking_switch",
    "setting_name",
    "store_target",
]

logger = logging.getLogger(__name__)

#: Attribute of the Celery app that holds this library's state for that app.
_STATE_ATTR = "_celery_unique_state"
_state_lock = threading.Lock()

#: The parts of ``broker_transport_options`` a ``sentinel://`` broker's locks
#: inherit: where the master is and how to reach the Sentinels, nothing that
#: tunes kombu's transport.
SENTINEL_ADDRESS_OPTIONS = ("master_name", "sentinel_kwargs")

#: The environment variable that turns locking on or off, whatever the settings say.
ENABLED_VARIABLE = "CELERY_UNIQUE_ENABLED"
_ENV_FLAGS = {
    "0": False, "false": False, "no": False, "off": False,
    "1": True, "true": True, "yes": True, "on": True,
}


def setting_name(app: Celery, key: str) -> str:
    """Return the name of setting ``key`` as ``app`` reads it: ``CELERY_UNIQUE_REDIS_URL``
    for an app configured with ``namespace="CELERY"``, else ``key`` itself."""
    prefix = getattr(app.conf, "prefix", None)
    return match_case(prefix + key, prefix) if prefix else key


@dataclass(frozen=True)
class UniqueConfig:
    """The ``unique_*`` settings of one Celery app."""

    #: Where the locks live. ``None`` falls back to a Redis broker.
    redis_url: str | None = None
    #: First part of every lock key.
    key_prefix: str = "unique"
    #: Seconds to wait for the lock store to connect or answer.
    socket_timeout: float = 5.0
    #: Extra keyword arguments for the redis-py connections (TLS files, ...).
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
    #: App-wide default of the ``unique_on_store_error`` option.
    on_store_error: OnStoreError = "raise"
    #: App-wide default of the ``unique_max_wait`` option (seconds, a timedelta or None).
    max_wait: Any = None
    #: App-wide default of the ``unique_limit`` option: calls with one key queued or running at once.
    limit: int = 1
    #: App-wide default of the ``unique_while_running`` option.
    while_running: WhileRunning = "refuse"
    #: Seconds a running marker lives without a heartbeat (renewed every third
    #: of it): how long a copy of a task id waits after its worker died.
    running_ttl: float = 30.0
    #: Check a refused duplicate's holder against its stored state, and take
    #: over the lock of a holder that has finished (needs a result backend).
    check_holder: bool = True
    #: Whether unique calls take locks at all (``unique_enabled``, overridden
    #: by the ``CELERY_UNIQUE_ENABLED`` environment variable).
    enabled: bool = True

    @classmethod
    def from_app(cls, app: Celery) -> UniqueConfig:
        """Read the ``unique_*`` settings of ``app``, checking each one."""
        conf = app.conf

        def name(key: str) -> str:
            return setting_name(app, key)

        prefix = conf.get("unique_key_prefix", cls.key_prefix)
        if not isinstance(prefix, str) or not prefix:
            raise ConfigurationError(
                f"{name('unique_key_prefix')} must be a non-empty string, not {prefix!r}"
            )
        if not _whole_hash_tag(prefix):
            raise ConfigurationError(
                f"{name('unique_key_prefix')} may hold braces only as a whole Redis Cluster hash "
                f"tag, such as '{{locks}}': {prefix!r} would put a lock and its marker in different slots"
            )
        timeout = conf.get("unique_redis_socket_timeout", cls.socket_timeout)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigurationError(
                f"{name('unique_redis_socket_timeout')} must be a positive number of seconds, "
                f"not {timeout!r}"
            )
        options = conf.get("unique_redis_options") or {}
        if not isinstance(options, dict):
            raise ConfigurationError(f"{name('unique_redis_options')} must be a dict, not {options!r}")
        transport_options = conf.get("unique_redis_transport_options") or {}
        if not isinstance(transport_options, dict):
            raise ConfigurationError(
                f"{name('unique_redis_transport_options')} must be a dict, not {transport_options!r}"
            )
        cluster = conf.get("unique_redis_cluster", False)
        if not isinstance(cluster, bool):
            raise ConfigurationError(
                f"{name('unique_redis_cluster')} must be True or False, not {cluster!r}"
            )
        running_ttl = conf.get("unique_running_ttl", cls.running_ttl)
        if (
            isinstance(running_ttl, bool)
            or not isinstance(running_ttl, (int, float))
            or not running_ttl >= 1
        ):
            raise ConfigurationError(
                f"{name('unique_running_ttl')} must be a number of seconds, at least 1, "
                f"not {running_ttl!r}"
            )
        check_holder = conf.get("unique_check_holder", cls.check_holder)
        if not isinstance(check_holder, bool):
            raise ConfigurationError(
                f"{name('unique_check_holder')} must be True or False, not {check_holder!r}"
            )
        enabled, _ = locking_switch(app)
        url = conf.get("unique_redis_url")
        if url is not None and not isinstance(url, str):
            raise ConfigurationError(f"{name('unique_redis_url')} must be a string, not {redact(url)!r}")
        until = conf.get("unique_until") or cls.until
        on_duplicate = conf.get("unique_on_duplicate") or cls.on_duplicate
        on_store_error = conf.get("unique_on_store_error") or cls.on_store_error
        while_running = conf.get("unique_while_running") or cls.while_running
        for setting, value, choices in (
            ("unique_until", until, UNTIL),
            ("unique_on_duplicate", on_duplicate, ON_DUPLICATE),
            ("unique_on_store_error", on_store_error, ON_STORE_ERROR),
            ("unique_while_running", while_running, WHILE_RUNNING),
        ):
            if value not in choices:
                raise ConfigurationError(
                    f"{name(setting)} must be one of {', '.join(map(repr, choices))}, not {value!r}"
                )
        max_wait = conf.get("unique_max_wait")
        try:
            max_wait_ms("app settings", max_wait)
        except (UniqueTypeError, UniqueValueError) as exc:
            raise ConfigurationError(
                f"{name('unique_max_wait')} must be a number of seconds or a timedelta, at least 0, "
                f"not {max_wait!r}"
            ) from exc
        limit = conf.get("unique_limit", cls.limit)
        if limit is None:
            limit = cls.limit
        try:
            check_limit("app settings", limit)
        except (UniqueTypeError, UniqueValueError) as exc:
            raise ConfigurationError(
                f"{name('unique_limit')} must be a whole number from 1 to {MAX_LIMIT}, not {limit!r}"
            ) from exc
        return cls(
            limit=limit,
            default_queue=str(conf.get("task_default_queue") or cls.default_queue),
            transport_options=dict(transport_options),
            cluster=cluster,
            until=until,
            on_duplicate=on_duplicate,
            on_store_error=on_store_error,
            max_wait=max_wait,
            while_running=while_running,
            redis_url=url,
            key_prefix=prefix,
            socket_timeout=float(timeout),
            redis_options=dict(options),
            running_ttl=float(running_ttl),
            check_holder=check_holder,
            enabled=enabled,
        )


def _whole_hash_tag(prefix: str) -> bool:
    # Redis hashes the part between the first "{" and the next "}" when it is
    # not empty. A lock key "<prefix>:..." and its marker "<prefix>:run:{<lock
    # key>}:..." share a slot when the prefix has no brace, or when its first
    # "{" opens a non-empty tag before any "}".
    if "{" not in prefix and "}" not in prefix:
        return True
    start = prefix.find("{")
    end = prefix.find("}", start + 1) if start >= 0 else -1
    return start >= 0 and end > start + 1 and "}" not in prefix[:start]


def store_target(app: Celery, config: UniqueConfig) -> StoreTarget:
    """Resolve the lock store's address from ``app``'s settings, checking every part."""
    if config.redis_url:
        address = parse_redis_url(config.redis_url, setting_name(app, "unique_redis_url"))
        target = StoreTarget(address, cluster=config.cluster)
    else:
        target = _broker_target(app, config)
    return _with_options(target, app, config)


def _broker_target(app: Celery, config: UniqueConfig) -> StoreTarget:
    source, broker_url = _broker_url(app)
    entries = [
        part.strip()
        for item in (broker_url if isinstance(broker_url, (list, tuple)) else [broker_url])
        if isinstance(item, str)
        for part in item.split(";")
        if part.strip()
    ]
    schemes = [entry.partition("://")[0].lower() for entry in entries]
    if schemes and schemes[0] == "sentinel":
        sentinels = ";".join(e for e, s in zip(entries, schemes, strict=True) if s == "sentinel")
        address = parse_redis_url(sentinels, source, kombu_tls=True)
        return StoreTarget(address, inherited=True, cluster=config.cluster)
    for entry, scheme in zip(entries, schemes, strict=True):
        if scheme in SERVER_SCHEMES:
            # A failover list names one broker per entry. The locks must
            # live in one place: they take the first Redis and do not fail
            # over with the broker.
            address = parse_redis_url(entry, source, kombu_tls=True)
            return StoreTarget(address, inherited=True, cluster=config.cluster)
    raise ConfigurationError(
        f"celery_unique needs a Redis for its locks: set {setting_name(app, 'unique_redis_url')} "
        f"({source} {redact(broker_url)!r} has no redis://, rediss://, redis+socket://, "
        "unix:// or sentinel:// URL)"
    )


def _with_options(target: StoreTarget, app: Celery, config: UniqueConfig) -> StoreTarget:
    connection = dict(target.address.connection)
    tls = _inherit_broker_tls(app, target.address, connection) if target.inherited else target.address.tls
    options = dict(config.redis_options)
    options_name = setting_name(app, "unique_redis_options")
    options_tls = any(key.startswith("ssl") for key in options)
    wants_tls = options_tls or any(key.startswith("ssl") for key in connection)
    if target.address.sentinels and wants_tls:
        source = options_name if options_tls else target.address.setting
        raise ConfigurationError(
            f"{source}: TLS to Sentinel-managed Redis is not supported by the lock store "
            f"({redact(target.address.url)!r}); set {setting_name(app, 'unique_redis_url')} "
            "to a rediss:// URL instead"
        )
    if options_tls:
        if not tls:
            raise ConfigurationError(
                f"{options_name} has TLS options ({', '.join(sorted(options))}) but the lock "
                f"store's URL is not rediss://: {redact(target.address.url)!r}"
            )
        check_tls_options(options, options_name)
    if not target.cluster:
        cls = connection.get("connection_class") or redis.Connection
        check_connection_options({**options, "connection_class": cls}, options_name)
    connection.update(options)
    master_name, sentinel_kwargs = _sentinel_options(target, app, config)
    if tls and connection.get("ssl_cert_reqs") == ssl.CERT_NONE:
        logger.warning(
            "celery_unique: the lock store's TLS certificate is not verified "
            "(ssl_cert_reqs is CERT_NONE): %s", target.describe()
        )
    address = RedisAddress(target.address.url, target.address.setting, connection, target.address.sentinels)
    return StoreTarget(address, target.inherited, target.cluster, master_name, sentinel_kwargs)


def _sentinel_options(
    target: StoreTarget, app: Celery, config: UniqueConfig
) -> tuple[str | None, dict[str, Any]]:
    if not target.address.sentinels:
        return None, {}
    options = dict(config.transport_options)
    if target.inherited:
        broker_options = app.conf.get("broker_transport_options") or {}
        for key in SENTINEL_ADDRESS_OPTIONS:
            if key in broker_options:
                options.setdefault(key, broker_options[key])
    master_name = options.get("master_name")
    if not master_name or not isinstance(master_name, str):
        where = setting_name(app, "unique_redis_transport_options")
        if target.inherited:
            where += f" or {setting_name(app, 'broker_transport_options')}"
        raise ConfigurationError(
            f"a sentinel:// lock store ({target.address.setting} {redact(target.address.url)!r}) "
            f"needs the master's name: set {where} = {{'master_name': ...}} "
            f"(got master_name={master_name!r})"
        )
    sentinel_kwargs = options.get("sentinel_kwargs") or {}
    if not isinstance(sentinel_kwargs, dict):
        # Not shown: it may hold the Sentinels' password.
        raise ConfigurationError(
            f"sentinel_kwargs must be a dict, not a {type(sentinel_kwargs).__name__}"
        )
    return master_name, dict(sentinel_kwargs)


def locking_switch(app: Celery) -> tuple[bool, str]:
    """Return whether ``app``'s unique calls lock, and what says so.

    The ``CELERY_UNIQUE_ENABLED`` environment variable, when set, wins over
    the ``unique_enabled`` setting, which wins over the default (on): an
    emergency switch needs no change to the code or the settings module.
    """
    value = os.environ.get(ENABLED_VARIABLE, "").strip()
    if value:
        flag = _ENV_FLAGS.get(value.lower())
        if flag is None:
            raise ConfigurationError(
                f"the {ENABLED_VARIABLE} environment variable must be one of "
                f"{', '.join(_ENV_FLAGS)}, not {value!r}"
            )
        return flag, f"environment variable {ENABLED_VARIABLE}={value}"
    name = setting_name(app, "unique_enabled")
    enabled = app.conf.get("unique_enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigurationError(f"{name} must be True or False, not {enabled!r}")
    return enabled, f"{name}={enabled}"


def _broker_url(app: Celery) -> tuple[str, Any]:
    """Return the setting the URL Celery publishes with comes from, and that URL.

    Celery's ``conf.broker_write_url`` property, spelled out to name its
    source: the ``CELERY_BROKER_WRITE_URL`` environment variable, then
    ``broker_write_url``, then ``CELERY_BROKER_URL``, then ``broker_url``.
    Writes go there, and locks are writes.
    """
    conf = app.conf
    for variable, key in (
        ("CELERY_BROKER_WRITE_URL", "broker_write_url"),
        ("CELERY_BROKER_URL", "broker_url"),
    ):
        if os.environ.get(variable):
            return f"the {variable} environment variable", os.environ[variable]
        value = conf.first(key, "broker_host") if key == "broker_url" else conf.get(key)
        if value:
            return setting_name(app, key), value
    return setting_name(app, "broker_url"), None


def _inherit_broker_tls(app: Celery, address: RedisAddress, connection: dict[str, Any]) -> bool:
    """Apply ``broker_use_ssl`` to a URL inherited from the broker, as kombu does; return
    whether the connection is now TLS."""
    if any(key.startswith("ssl_") for key in connection):
        return address.tls  # kombu: ssl_* options in the URL replace broker_use_ssl
    name = setting_name(app, "broker_use_ssl")
    use_ssl = app.conf.get("broker_use_ssl")
    # kombu's Redis transport applies only a dict (anything else is ignored).
    if isinstance(use_ssl, dict) and use_ssl:
        if address.connection.get("path"):
            raise ConfigurationError(
                f"{name} is set, but the broker is a unix socket: {redact(address.url)!r}"
            )
        options = dict(use_ssl)
        check_tls_options(options, name)
        check_connection_options({**options, "connection_class": redis.SSLConnection}, name)
        connection.update(options)
        if not address.sentinels:
            connection["connection_class"] = redis.SSLConnection
        return True
    if address.tls:
        # kombu's default for a bare rediss:// broker: no verification.
        connection["ssl_cert_reqs"] = ssl.CERT_NONE
    return address.tls


class _AppState:
    """What celery_unique keeps on one app: its config and its lock store."""

    def __init__(self, app: Celery) -> None:
        self.config = UniqueConfig.from_app(app)
        if not self.config.enabled:
            _warn_disabled_once(app)
        self._app = app
        self._target: StoreTarget | None = None
        self._store: LockStore | None = None
        self._redelivery_window: float | None = None
        #: Task name -> when it last warned that it failed open (events.unlocked).
        self.unlocked_warned: dict[str, float] = {}

    @property
    def redelivery_window(self) -> float:
        """Seconds a message may stay unacknowledged before the broker can deliver a copy of it.

        The visibility timeout of a transport that has one (Redis, SQS),
        from ``broker_transport_options`` or the transport's default; 0 for
        a broker that redelivers an unacknowledged message whenever its
        connection drops (RabbitMQ), so that a copy may appear at any time.
        """
        if self._redelivery_window is None:
            self._redelivery_window = _redelivery_window(self._app)
        return self._redelivery_window

    @property
    def target(self) -> StoreTarget:
        """Where the locks live, resolved (and checked) once."""
        if self._target is None:
            target = store_target(self._app, self.config)
            if target.inherited:
                logger.info(
                    "celery_unique: unique_redis_url is not set, the locks go to the broker's "
                    "Redis: %s", target.describe()
                )
            self._target = target
        return self._target

    @property
    def store(self) -> LockStore:
        if self._store is None:
            from .connection import connect
            from .lock import LockStore

            with _state_lock:
                if self._store is None:
                    self._store = LockStore(connect(self.target, self.config.socket_timeout))
        return self._store


def _redelivery_window(app: Celery) -> float:
    try:
        connection = app.connection_for_read()
        try:
            channel = getattr(connection.transport, "Channel", None)
            options = connection.transport_options or {}
        finally:
            connection.release()
    except Exception:  # an unusable broker setting: the worker says so itself
        return 0.0
    default = getattr(channel, "visibility_timeout", None) or getattr(
        channel, "default_visibility_timeout", None
    )
    if not isinstance(default, (int, float)):
        return 0.0
    timeout = options.get("visibility_timeout", default)
    return float(timeout) if isinstance(timeout, (int, float)) and timeout > 0 else float(default)


_warned_disabled = threading.Event()


def _warn_disabled_once(app: Celery) -> None:
    # A production process should never run with the switch off unnoticed.
    # Under pytest, where turning it off is the point, PYTEST_CURRENT_TEST is
    # set for each test and inherited by the processes a test starts (a
    # worker subprocess); `"pytest" in sys.modules` would miss those, and
    # would hold in any process that merely imported celery_unique.testing.
    if _warned_disabled.is_set() or os.environ.get("PYTEST_CURRENT_TEST"):
        return
    _warned_disabled.set()
    _, source = locking_switch(app)
    logger.warning(
        "celery_unique: locking is disabled (%s): unique tasks are published without locks", source
    )


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


def describe_store(app: Celery) -> str:
    """Say where ``app``'s locks live, every password hidden, without connecting.

    For example ``redis://:***@10.0.0.5:6379/2 (unique_redis_url)``,
    ``rediss://10.0.0.5:6380/0 (from broker_url)``,
    ``sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26379/2 master 'mymaster'
    (unique_redis_url)`` or ``Redis Cluster redis://10.0.0.1:7000/0
    (unique_redis_url)``. Raises ``ConfigurationError`` as the first unique
    enqueue would.
    """
    return app_state(app).target.describe()
