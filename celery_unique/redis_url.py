"""Lock-store URLs: every Redis URL form Celery and kombu accept, parsed, checked and redacted.

A URL becomes the keyword arguments of a redis-py connection (a
:class:`RedisAddress`). Each form means what it means to kombu:

* ``redis://[user:password@]host[:port][/db]`` and ``rediss://`` (TLS), with
  ``ssl_cert_reqs`` spelled ``CERT_REQUIRED``/``required`` and so on, and the
  TLS files in the query;
* ``unix:///path?db=N`` (redis-py's), ``redis+socket:///path?virtual_host=N``
  and ``socket:///path?virtual_host=N`` (kombu's and Celery's);
* ``sentinel://[user:password@]host:port[/db];sentinel://...``, the
  credentials and database being the data nodes'.

Anything malformed raises :class:`~celery_unique.ConfigurationError` naming the
setting it came from and the URL with its password hidden (:func:`redact`).
"""

from __future__ import annotations

import inspect
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import redis
from redis.connection import parse_url as redis_parse_url

from .errors import ConfigurationError

__all__ = [
    "SERVER_SCHEMES",
    "RedisAddress",
    "check_connection_options",
    "check_tls_options",
    "parse_redis_url",
    "redact",
]

#: Schemes that name one Redis server (kombu's ``redis+socket`` and ``socket``
#: as well as redis-py's ``unix``).
SERVER_SCHEMES = ("redis", "rediss", "unix", "redis+socket", "socket")
SOCKET_SCHEMES = ("redis+socket", "socket")

# The spellings Celery documents, kombu's lower-case ones, and the constants.
CERT_REQS: dict[Any, ssl.VerifyMode] = {
    "CERT_REQUIRED": ssl.CERT_REQUIRED,
    "CERT_OPTIONAL": ssl.CERT_OPTIONAL,
    "CERT_NONE": ssl.CERT_NONE,
    "required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE,
}

_SECRET_QUERY = re.compile(r"((?:^|[?&])[\w.]*password=)[^&;]*", re.IGNORECASE)


@dataclass(frozen=True)
class RedisAddress:
    """Where one Redis lives, as redis-py connection keyword arguments.

    With ``sentinels`` the keyword arguments are the Sentinel-managed master's
    (credentials, database, TLS) and the Sentinels are asked where it is.
    """

    #: The URL as given: it may hold a password, so show ``redact(url)``.
    url: str
    #: The setting the URL came from, for messages.
    setting: str
    #: Keyword arguments of a redis-py ``ConnectionPool``.
    connection: dict[str, Any] = field(default_factory=dict)
    #: ``(host, port)`` of every Sentinel, for a ``sentinel://`` URL.
    sentinels: tuple[tuple[str, int], ...] = ()

    @property
    def tls(self) -> bool:
        """Whether the connections are wrapped in TLS."""
        cls = self.connection.get("connection_class")
        return isinstance(cls, type) and issubclass(cls, redis.SSLConnection)


def redact(url: Any) -> Any:
    """Return ``url`` with every password hidden; other values are returned as they are.

    Works on ``;``-separated lists, lists and tuples, unix-socket and Sentinel
    URLs and malformed ones: everything between ``://`` and the last ``@`` of
    a part but the user name is replaced by ``***``, as is any ``password=``
    in a query. When in doubt it hides too much, never too little.
    """
    if isinstance(url, (list, tuple)):
        return type(url)(redact(item) for item in url)
    if not isinstance(url, str):
        return url
    return ";".join(_redact_part(part) for part in url.split(";"))


def _redact_part(part: str) -> str:
    scheme, sep, rest = part.partition("://")
    if not sep:
        scheme, rest = "", part
    at = rest.rfind("@")
    if at >= 0:
        user, colon, _ = rest[:at].partition(":")
        # A user name alone may be a password written in the wrong place.
        rest = (f"{user}:***" if colon else "***") + rest[at:]
    rest = _SECRET_QUERY.sub(r"\1***", rest)
    return f"{scheme}{sep}{rest}"


def parse_redis_url(url: str, setting: str, *, kombu_tls: bool = False) -> RedisAddress:
    """Parse a lock-store URL from ``setting`` into a :class:`RedisAddress`.

    ``kombu_tls`` gives the URL kombu's meaning of TLS, for a URL inherited
    from the broker: ``ssl_*`` query options turn TLS on whatever the scheme.
    Otherwise they need ``rediss://``, as in Celery's result backend.
    """
    parts = [part.strip() for part in url.split(";") if part.strip()]
    if not parts:
        raise ConfigurationError(f"{setting} is empty")
    scheme = _scheme(parts[0])
    if scheme == "sentinel":
        return _parse_sentinels(url, parts, setting)
    if len(parts) > 1:
        raise ConfigurationError(
            f"{setting} names {len(parts)} servers ({redact(url)!r}): the locks must live "
            "in one place, so give one URL (or sentinel:// URLs, one per Sentinel)"
        )
    if scheme not in SERVER_SCHEMES:
        raise ConfigurationError(
            f"{setting} is not a Redis URL: {redact(url)!r} (use redis://, rediss://, "
            "unix://, redis+socket:// or sentinel://)"
        )
    if scheme in SOCKET_SCHEMES:
        connection = _parse_socket(url, setting)
    else:
        path = urlsplit(url).path.strip("/")
        if scheme != "unix" and path and not path.isdigit():
            # redis-py would quietly use database 0; kombu refuses it too.
            raise ConfigurationError(
                f"{setting}: the database must be a number, not {path!r} ({redact(url)!r})"
            )
        try:
            connection = _redis_parse_url(url)
        except ValueError as exc:
            raise ConfigurationError(
                f"{setting} is not a valid Redis URL ({exc}): {redact(url)!r}"
            ) from None
    tls_keys = sorted(key for key in connection if key.startswith("ssl_"))
    if tls_keys and scheme != "rediss":
        if not (kombu_tls and scheme == "redis"):
            raise ConfigurationError(
                f"{setting}: {', '.join(tls_keys)} need a rediss:// URL, not {redact(url)!r}"
            )
        # kombu reads ssl_* options in a redis:// broker URL as TLS.
        connection["connection_class"] = redis.SSLConnection
    address = RedisAddress(url, setting, connection)
    if address.tls:
        check_tls_options(connection, f"{setting} ({redact(url)!r})")
    check_connection_options(address.connection, f"{setting} ({redact(url)!r})")
    return address


def _redis_parse_url(url: str) -> dict[str, Any]:
    options: dict[str, Any] = redis_parse_url(url)  # type: ignore[no-untyped-call]
    return options


def _scheme(part: str) -> str:
    scheme, sep, _ = part.partition("://")
    return scheme.lower() if sep else ""


def _parse_socket(url: str, setting: str) -> dict[str, Any]:
    # kombu and Celery: redis+socket:///path/to/redis.sock?virtual_host=2.
    # redis-py reads unix:///path?db=2 the same way once translated.
    parts = urlsplit(url.split("+", 1)[-1] if url.startswith("redis+") else url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    if "db" in query:
        raise ConfigurationError(
            f"{setting}: a {_scheme(url)}:// URL takes its database as virtual_host=N, "
            f"as in kombu, which ignores db= (or use unix:///path?db=N): {redact(url)!r}"
        )
    if not parts.path:
        raise ConfigurationError(f"{setting}: no socket path in {redact(url)!r}")
    db = query.pop("virtual_host", "0").strip("/") or "0"
    query["db"] = db
    userinfo = parts.netloc.rpartition("@")[0]
    translated = f"unix://{userinfo + '@' if userinfo else ''}{quote(unquote(parts.path))}"
    try:
        return _redis_parse_url(f"{translated}?{urlencode(query)}")
    except ValueError as exc:
        raise ConfigurationError(
            f"{setting} is not a valid Redis URL ({exc}): {redact(url)!r}"
        ) from None


def _parse_sentinels(url: str, parts: list[str], setting: str) -> RedisAddress:
    hosts: list[tuple[str, int]] = []
    connection: dict[str, Any] = {}
    for part in parts:
        try:
            parsed = urlsplit(part)
            port = parsed.port or 26379
        except ValueError:
            parsed, port = None, 0
        if parsed is None or parsed.scheme != "sentinel" or not parsed.hostname:
            raise ConfigurationError(
                f"{setting}: {redact(part)!r} is not a sentinel://host:port URL"
            )
        if parsed.query:
            raise ConfigurationError(
                f"{setting}: a sentinel:// URL takes no query ({redact(part)!r}); "
                "give options in unique_redis_transport_options or unique_redis_options"
            )
        hosts.append((parsed.hostname, port))
        # As in kombu, the credentials and database are the data nodes'; the
        # first URL that names them wins.
        if parsed.username and "username" not in connection:
            connection["username"] = unquote(parsed.username)
        if parsed.password and "password" not in connection:
            connection["password"] = unquote(parsed.password)
        path = parsed.path.strip("/")
        if path and "db" not in connection:
            if not path.isdigit():
                raise ConfigurationError(
                    f"{setting}: the database must be a number, not {path!r} ({redact(part)!r})"
                )
            connection["db"] = int(path)
    return RedisAddress(url, setting, connection, tuple(hosts))


def cert_reqs(value: Any, where: str) -> ssl.VerifyMode:
    """Return ``ssl_cert_reqs`` as an ``ssl.VerifyMode``, from any spelling Celery accepts."""
    if value is None:
        return ssl.CERT_NONE  # as redis-py reads it
    if isinstance(value, str) and value in CERT_REQS:
        return CERT_REQS[value]
    if isinstance(value, int) and not isinstance(value, bool) and value in set(CERT_REQS.values()):
        return ssl.VerifyMode(value)
    raise ConfigurationError(
        f"{where}: ssl_cert_reqs must be CERT_REQUIRED, CERT_OPTIONAL or CERT_NONE "
        f"(or required, optional, none, or an ssl.CERT_* constant), not {value!r}"
    )


def check_tls_options(options: dict[str, Any], where: str) -> None:
    """Normalise ``ssl_cert_reqs`` in ``options`` and check that the TLS files load."""
    if "ssl_cert_reqs" in options:
        options["ssl_cert_reqs"] = cert_reqs(options["ssl_cert_reqs"], where)
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        path = options.get(name)
        if path is not None and not (isinstance(path, (str, os.PathLike)) and os.path.isfile(path)):
            raise ConfigurationError(f"{where}: {name} {path!r} is not a readable file")
    ca_path = options.get("ssl_ca_path")
    if ca_path is not None and not os.path.isdir(ca_path):
        raise ConfigurationError(f"{where}: ssl_ca_path {ca_path!r} is not a directory")
    # Load them once now: a bad file is a configuration error at the first
    # enqueue, not a "lock store did not answer" at every one.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        if options.get("ssl_ca_certs") or ca_path:
            context.load_verify_locations(cafile=options.get("ssl_ca_certs"), capath=ca_path)
        if options.get("ssl_certfile"):
            context.load_cert_chain(
                options["ssl_certfile"], options.get("ssl_keyfile"), options.get("ssl_password")
            )
        elif options.get("ssl_keyfile"):
            raise ConfigurationError(f"{where}: ssl_keyfile needs ssl_certfile")
    except (ssl.SSLError, OSError) as exc:
        raise ConfigurationError(f"{where}: the TLS files do not load: {exc}") from None


def check_connection_options(options: Mapping[str, Any], where: str) -> None:
    """Raise ``ConfigurationError`` for an option the connection class would refuse."""
    cls = options.get("connection_class") or redis.Connection
    unknown = sorted(set(options) - _accepted(cls) - {"connection_class", "max_connections"})
    if unknown:
        raise ConfigurationError(
            f"{where}: {', '.join(map(repr, unknown))} is not an option of a "
            f"{cls.__name__} (redis-py)"
        )


@cache
def _accepted(cls: type) -> frozenset[str]:
    # Every keyword the constructors up the class's MRO take: each passes the
    # rest of its keywords to the next one.
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names.update(
                name for name, param in inspect.signature(init).parameters.items()
                if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
            )
    names.discard("self")
    return frozenset(names)
