"""What makes two tasks the same: the lock key of a call.

Two calls are the same task exactly when they have the same task name, the
same routed queue, and the worker would receive equal arguments. So spelling
does not count (positional or keyword, dict order), and the task's serializer
decides what is distinct: for JSON, ``{1: "x"}`` and ``{"1": "x"}`` or a tuple
and a list arrive alike; for pickle they do not. Parameters left at their
default, or passed a value equal to it, are left out: the message never
carries a default, the worker applies its own.

The arguments are encoded canonically and only a sha256 digest of them goes
into the key: keys stay short and Redis holds no argument data. A key reads
``<prefix>:<queue>:<task name>:<digest>``. Queue and task name are escaped so
that neither can break the layout or act as a SCAN pattern, which lets the lock
admin list locks by task and queue without any payload.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import inspect
import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, NamedTuple, Protocol

from kombu import serialization
from kombu.exceptions import DecodeError, EncodeError, SerializerNotInstalled
from kombu.utils.json import JSONEncoder
from kombu.utils.json import dumps as _kombu_json_dumps

from .errors import UniqueTypeError, UniqueValueError

__all__ = [
    "LockKey",
    "argument_digest",
    "bind_arguments",
    "call_digest",
    "canonical_text",
    "format_key",
    "former_marker_key",
    "key_head",
    "lock_key",
    "marker_key",
    "parse_key",
    "routed_queue",
    "slot_key",
    "slot_keys",
    "slot_of",
    "waiting_key",
]

# One encoder for every call: it holds no state between calls, and building
# one per call costs more than encoding three small arguments.
_ENCODER = JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True
)
# kombu has no type hints.
_kombu_json: Callable[[Any], str] = _kombu_json_dumps
_kombu_dumps: Callable[[Any, str], tuple[str, str, Any]] = serialization.dumps
_kombu_loads: Callable[..., Any] = serialization.loads
_EMPTY = inspect.Parameter.empty
_VAR_KEYWORD = inspect.Parameter.VAR_KEYWORD
_POSITIONAL_OR_KEYWORD = inspect.Parameter.POSITIONAL_OR_KEYWORD
_KEYWORD_ONLY = inspect.Parameter.KEYWORD_ONLY
# What encoding an argument can raise: kombu wraps a serializer's own errors
# in EncodeError and DecodeError, which are neither TypeError nor ValueError.
_ENCODING_ERRORS = (TypeError, ValueError, RecursionError, EncodeError, DecodeError)

# Characters that would split a key part or act in a SCAN MATCH pattern, and
# braces, which Redis Cluster reads as a hash tag.
_ESCAPED = "%:*?[]\\{}"
_ESCAPE_TABLE = str.maketrans({c: f"%{ord(c):02X}" for c in _ESCAPED})
_UNESCAPE = re.compile("%([0-9A-F]{2})")


class LockKey(NamedTuple):
    """The parts of a lock key."""

    prefix: str
    queue: str
    task_name: str
    digest: str


def escape(part: str) -> str:
    """Escape one key part so it holds no ``:``, glob or brace characters."""
    return part.translate(_ESCAPE_TABLE)


def unescape(part: str) -> str:
    """Undo :func:`escape`."""
    return _UNESCAPE.sub(lambda m: chr(int(m.group(1), 16)), part)


def format_key(prefix: str, queue: str, task_name: str, digest: str) -> str:
    """Build the lock key of a call from its parts."""
    return key_head(prefix, queue, task_name) + digest


def marker_key(lock_key: str, task_id: str) -> str:
    """Return the key of ``task_id``'s marker under ``lock_key``: ``<prefix>:run:{<lock key>}:<task id>``.

    It starts with the prefix, as every key of the package does, so one ACL
    pattern or SCAN MATCH covers them all. The lock key inside braces is its
    Redis Cluster hash tag, so marker and lock share a slot; a prefix that
    holds a hash tag of its own (``"{locks}"``) lends it to both.
    """
    prefix = lock_key.rsplit(":", 3)[0]
    return f"{prefix}:run:{{{lock_key}}}:{task_id}"


def former_marker_key(lock_key: str, task_id: str) -> str:
    """Return the key of ``task_id``'s former incarnation's marker: ``<prefix>:was:{<lock key>}:<id>``.

    When a caller-chosen id is enqueued again, its new incarnation's marker
    takes the place of the old one's; the old "ended" or "revoked" marker
    moves here, so that a late copy of the old incarnation is still dropped.
    """
    prefix = lock_key.rsplit(":", 3)[0]
    return f"{prefix}:was:{{{lock_key}}}:{task_id}"


def waiting_key(lock_key: str) -> str:
    """Return the key of the call waiting for ``lock_key``: ``<prefix>:next:{<lock key>}``.

    Under ``unique_while_running="queue_one"`` it holds the id of the one
    call that waits for a holder that has begun; it shares the lock's
    Redis Cluster slot, as a marker does.
    """
    prefix = lock_key.rsplit(":", 3)[0]
    return f"{prefix}:next:{{{lock_key}}}"


#: What joins a lock key and the number of one of its slots 2..N (``unique_limit``).
SLOT_SEPARATOR = "~"
#: A slot number as slot_key() writes it: ASCII digits, 2 or more, no leading zero.
_SLOT_NUMBER = re.compile(r"[2-9]|[1-9][0-9]+")


def slot_key(lock_key: str, slot: int) -> str:
    """Return the key of slot ``slot`` of ``lock_key`` under ``unique_limit``: the key itself for slot 1.

    Slots 2..N are ``<lock key>~2`` ... ``<lock key>~N``: the digest is
    base64url and the escaped task name and queue hold no ``~`` that could
    end a key, so a slot key is never another call's lock key. It holds no
    braces: its markers (:func:`marker_key`) share its Redis Cluster slot.
    """
    return lock_key if slot == 1 else f"{lock_key}{SLOT_SEPARATOR}{slot}"


def slot_keys(lock_key: str, limit: int) -> list[str]:
    """The keys of the ``limit`` slots of ``lock_key``, slot 1 (the key itself) first."""
    return [slot_key(lock_key, slot) for slot in range(1, limit + 1)]


def slot_of(key: str) -> tuple[str, int]:
    """Split a lock or slot key into the lock key and the slot number (1 for a lock key itself)."""
    head, separator, number = key.rpartition(SLOT_SEPARATOR)
    if separator and _SLOT_NUMBER.fullmatch(number):
        return head, int(number)
    return key, 1


def key_head(prefix: str, queue: str, task_name: str) -> str:
    """Everything of a lock key but its digest, which follows it unchanged."""
    return f"{prefix}:{escape(queue)}:{escape(task_name)}:"


def parse_key(key: str) -> LockKey:
    """Split a lock key made by :func:`format_key` back into its parts.

    Raises ``ValueError`` naming ``key`` if it is not shaped like one. A slot
    key (``unique_limit``) parses as its lock key does, its ``~<slot>`` left
    on the digest: :func:`slot_of` splits it off.
    """
    parts = key.rsplit(":", 3)
    if len(parts) != 4 or not parts[0] or not parts[3]:
        raise UniqueValueError(f"{key!r} is not a lock key: expected <prefix>:<queue>:<task name>:<digest>")
    prefix, queue, task_name, digest = parts
    return LockKey(prefix, unescape(queue), unescape(task_name), digest)


# -- a call's identity -------------------------------------------------------


class KeySettings(Protocol):
    """The settings a lock key depends on (:class:`celery_unique.config.UniqueConfig` has them)."""

    @property
    def key_prefix(self) -> str: ...

    @property
    def default_queue(self) -> str: ...


def lock_key(
    task: Any,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    options: Mapping[str, Any],
    unique_on: Sequence[str] | None,
    config: KeySettings,
) -> str:
    """Return the lock key of a call of ``task`` (a ``UniqueTask``): prefix, routed queue, name, digest.

    The one place a key is made: :func:`call_digest` gives its last part,
    :func:`routed_queue` the queue Celery will publish to.
    """
    digest = call_digest(task, args, kwargs, unique_on, options)
    queue = routed_queue(task, args, kwargs, options, config.default_queue)
    # The escaped head of the key, per prefix and queue, is worked out once.
    heads: dict[tuple[str, str], str] = task.__dict__.setdefault("_unique_key_heads", {})
    head = heads.get((config.key_prefix, queue))
    if head is None:
        head = heads[(config.key_prefix, queue)] = key_head(config.key_prefix, queue, task.name)
    return head + digest


def routed_queue(
    task: Any,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    options: Mapping[str, Any],
    default_queue: str,
) -> str:
    """Return the queue Celery will publish a call of ``task`` to.

    The queue option, then the task's queue attribute, then
    ``task_routes``, then ``task_default_queue``.
    """
    app = task._get_app()
    router = app.amqp.router
    if not router.routes:
        # Without task_routes the router would only pick the first of
        # these; skipping it saves a third of the key's cost.
        queue = (
            options.get("queue")
            or task._get_exec_options().get("queue")
            or default_queue
        )
        return str(getattr(queue, "name", queue))
    # route() pops from the dict it is given, so it gets a fresh one.
    route = router.route(
        dict(task._get_exec_options(), **options), task.name, args, kwargs, task
    )
    queue = route.get("queue")
    if queue is not None:
        return str(queue.name)
    return str(route.get("routing_key") or "")


def call_digest(
    task: Any,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    unique_on: Sequence[str] | None,
    options: Mapping[str, Any] | None = None,
) -> str:
    """Return the digest of what identifies a call of ``task`` (the key's last part).

    The one place a call's identity is derived: dump pydantic models as Celery
    will, bind the arguments to the task's signature leaving out those at
    their default, keep the ``unique_on`` names, apply the task's
    ``unique_identity()`` hook, encode what the worker will receive under the
    call's serializer (``options["serializer"]``, else the task's, else the
    app's ``task_serializer``) canonically and hash it.
    """
    serializer, dumps_models = _serializer(task, options)
    dump_models = getattr(task, "_dump_pydantic_arguments", None) if dumps_models else None
    if dump_models is not None:
        # Celery's apply_async sends a pydantic=True task's models dumped,
        # unless the serializer is pickle.
        args, kwargs = dump_models(args, kwargs)
    shape = _shape(task)
    if shape is None:
        arguments = _as_given(args, kwargs)
    else:
        try:
            arguments = shape.bind(args, kwargs)
        except TypeError as exc:
            if task.typing:
                raise UniqueTypeError(f"{task.name}: {exc}") from None
            if unique_on is not None:
                raise UniqueTypeError(
                    f"{task.name}: unique_on selects parameters by name, but the call does "
                    f"not fit the task's signature {shape.signature}: {exc}"
                ) from None
            arguments = _as_given(args, kwargs)
    if unique_on is not None:
        arguments = _select(task.name, shape, arguments, unique_on)
    identity = task.unique_identity(arguments)
    return _digest(task.name, identity, serializer, from_hook=identity is not arguments)


def _serializer(task: Any, options: Mapping[str, Any] | None) -> tuple[str, bool]:
    # As Celery picks it: the call's option, else the task's (its exec
    # options), else the app's setting; models are dumped unless "pickle"
    # was asked for (Task.apply_async).
    if options and "serializer" in options:
        requested = options["serializer"]
    else:
        requested = task._get_exec_options().get("serializer")
    serializer = requested or task._get_app().conf.task_serializer
    return str(serializer), requested != "pickle"


def run_signature(task: Any) -> inspect.Signature | None:
    """Return the signature of ``task.run``, worked out once per task instance.

    A stand-in task may set ``task.__dict__["_unique_signature"]`` itself
    (``None`` when the parameters are unknown).
    """
    try:
        return task.__dict__["_unique_signature"]  # type: ignore[no-any-return]
    except KeyError:
        pass
    try:
        signature: inspect.Signature | None = inspect.signature(task.run)
    except (TypeError, ValueError):
        signature = None
    task.__dict__["_unique_signature"] = signature
    return signature


def _shape(task: Any) -> _Shape | None:
    try:
        return task.__dict__["_unique_shape"]  # type: ignore[no-any-return]
    except KeyError:
        pass
    signature = run_signature(task)
    shape = None if signature is None else _Shape(signature)
    task.__dict__["_unique_shape"] = shape
    return shape


class _Shape:
    """A signature, taken apart once so that binding a call is cheap."""

    def __init__(self, signature: inspect.Signature) -> None:
        self.signature = signature
        parameters = signature.parameters.values()
        kinds = {p.kind for p in parameters}
        #: Only plain parameters: a call binds with a zip and a few checks.
        self.plain = kinds <= {_POSITIONAL_OR_KEYWORD, _KEYWORD_ONLY}
        self.order = tuple(p.name for p in parameters)
        self.positional = tuple(p.name for p in parameters if p.kind is _POSITIONAL_OR_KEYWORD)
        self.names = frozenset(self.order)
        self.required = frozenset(p.name for p in parameters if p.default is _EMPTY
                                  and p.kind in (_POSITIONAL_OR_KEYWORD, _KEYWORD_ONLY))
        self.defaults = tuple((p.name, p.default) for p in parameters if p.default is not _EMPTY)
        self.var_keyword = next((p.name for p in parameters if p.kind is _VAR_KEYWORD), None)

    def bind(self, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
        """Map a call's arguments to parameter names, in parameter order, leaving out defaults."""
        args = args or ()
        kwargs = kwargs or {}
        arguments = self._bind_plain(args, kwargs) if self.plain else None
        if arguments is None:
            arguments = self.signature.bind(*args, **kwargs).arguments
        # A default is never sent: the worker applies its own, which need not
        # be this process's (a host name, a setting read at import) nor have
        # a canonical form (an object() sentinel). So an argument equal to
        # its default counts as left out, and no default is ever encoded.
        for name, default in self.defaults:
            if name in arguments and _is_default(arguments[name], default):
                del arguments[name]
        return arguments

    def _bind_plain(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
        # What Signature.bind does for plain parameters, at a fraction of its
        # cost; None lets Signature.bind word the error.
        if len(args) > len(self.positional):
            return None
        arguments = dict(zip(self.positional, args, strict=False))
        if kwargs:
            if not self.names.issuperset(kwargs) or not arguments.keys().isdisjoint(kwargs):
                return None
            arguments.update(kwargs)
            arguments = {name: arguments[name] for name in self.order if name in arguments}
        if not self.required.issubset(arguments):
            return None
        return arguments


def bind_arguments(
    signature: inspect.Signature | None,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    *,
    strict: bool = True,
) -> dict[str, Any]:
    """Map the call's arguments to parameter names, leaving out those at their default.

    ``f(1, 2)``, ``f(1, b=2)``, ``f(b=2, a=1)`` and (where ``b`` defaults to 2)
    ``f(1)`` all give ``{"a": 1}``, but ``f(1, b=2.0)`` gives ``{"a": 1, "b":
    2.0}``. A call that does not fit the signature raises ``TypeError`` when
    ``strict``, as Celery's own argument check does; otherwise (a task with
    ``typing=False``) it keeps its raw ``args`` and ``kwargs``.
    """
    if signature is not None:
        try:
            return _Shape(signature).bind(args, kwargs)
        except TypeError:
            if strict:
                raise
    return _as_given(args, kwargs)


def _as_given(args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    return {"*args": list(args or ()), "**kwargs": dict(kwargs or {})}


def _is_default(value: Any, default: Any) -> bool:
    """Whether ``value`` is ``default``: equal, and of the same types all the way down.

    ``2.0`` is not a default of ``2``, nor ``(1, 2.0)`` of ``(1, 2)``. A value
    whose ``==`` raises or answers anything but ``True`` is not a default.
    """
    if value is default:
        return True
    kind = type(value)
    if kind is not type(default):
        return False
    try:
        if kind is list or kind is tuple:
            return len(value) == len(default) and all(map(_is_default, value, default))
        if kind is dict:
            key_types = {key: type(key) for key in default}
            return len(value) == len(default) and all(
                key_types.get(key) is type(key) and _is_default(item, default[key])
                for key, item in value.items()
            )
        if kind is set or kind is frozenset:
            return {v: type(v) for v in value} == {v: type(v) for v in default}
        return (value == default) is True
    except Exception:
        return False


def _select(
    task_name: str, shape: _Shape | None, arguments: dict[str, Any], names: Sequence[str]
) -> dict[str, Any]:
    # A name left at its default is left out, as in the full identity, so a
    # call that passes the default and one that omits it select alike.
    parameters = shape.order if shape is not None else ()
    var_keyword = shape.var_keyword if shape is not None else None
    extra = arguments.get(var_keyword, {}) if var_keyword else {}
    selected: dict[str, Any] = {}
    for name in names:
        if name in parameters and name != var_keyword:
            if name in arguments:
                selected[name] = arguments[name]
        elif var_keyword is not None:
            if name in extra:
                selected[name] = extra[name]
        else:
            raise UniqueValueError(
                f"{task_name}: unique_on names {name!r}, which is not a parameter of the task "
                f"(parameters: {', '.join(parameters) or 'none'})"
            )
    return selected


# -- encoding what the worker receives ---------------------------------------


def argument_digest(task_name: str, arguments: Any, serializer: str = "json") -> str:
    """Return the sha256 (URL-safe base64) of the canonical form of ``arguments``.

    ``arguments`` is a call's identity: what ``unique_identity()`` returned,
    by default a dict of arguments by parameter name. Raises ``TypeError``
    naming the task and the argument if a value has no canonical form once
    sent with ``serializer``.
    """
    return _digest(task_name, arguments, serializer, from_hook=False)


def canonical_text(value: Any, serializer: str = "json") -> str:
    """Return the canonical text of ``value`` as a worker receives it through ``serializer``.

    Two values give the same text exactly when the worker receives them
    equal, with types (``1``, ``1.0``, ``True``, ``"1"``; a tuple and a list
    where the serializer keeps them apart) and dict keys compared exactly.
    Values that arrive as plain JSON (str-keyed dicts, lists, strings, numbers,
    booleans, ``None``) give their JSON with sorted keys, whatever the
    serializer. Raises ``TypeError`` or ``ValueError`` (kombu's ``EncodeError``
    or ``DecodeError`` among them) for a value without a canonical form, and
    ``kombu.exceptions.SerializerNotInstalled`` for an unknown serializer.
    """
    if serializer == "json":
        if _json_ready(value):
            return _ENCODER.encode(value)
        return _json_exact(value)
    received = _round_trip(value, serializer)
    if _plain_json(received):
        return _ENCODER.encode(received)
    # "\0" starts no JSON text: the tagged forms never meet the plain ones.
    return "\0" + _tagged(received)


def _digest(task_name: str, identity: Any, serializer: str, *, from_hook: bool) -> str:
    try:
        text = canonical_text(identity, serializer)
    except SerializerNotInstalled as exc:
        raise UniqueValueError(f"{task_name}: serializer {serializer!r} is not installed: {exc}") from None
    except _ENCODING_ERRORS as exc:
        raise UniqueTypeError(_no_canonical_form(task_name, identity, serializer, exc, from_hook)) from exc
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


# The JSON fast path: what the C encoder with sorted keys writes is already
# canonical, as long as every dict key is a str (int keys would sort as
# numbers, not as the strings the worker receives) and every other value is
# one whose JSON kombu fixes (no __json__ hook that could return such a dict).
_JSON_LEAVES = frozenset({str, int, float, bool, type(None), datetime, date, time, Decimal,
                          uuid.UUID, bytes})


def _json_ready(value: Any) -> bool:
    kind = type(value)
    if kind in _JSON_LEAVES:
        return True
    try:
        if kind is dict:
            for key, item in value.items():
                if type(key) is not str or (type(item) not in _JSON_LEAVES and not _json_ready(item)):
                    return False
            return True
        if kind is list or kind is tuple:
            # Loops, not all(): this runs on every call, and all() with a
            # generator costs twice as much.
            for item in value:  # noqa: SIM110
                if type(item) not in _JSON_LEAVES and not _json_ready(item):
                    return False
            return True
    except RecursionError:
        pass
    return False


def _json_exact(value: Any) -> str:
    # The worker receives the JSON document kombu writes: tuples as lists,
    # int, float, bool and None keys as strings. Read back without kombu's
    # object hook, it re-encodes with sorted keys to the same text as the fast
    # path, envelopes of datetimes and the like included.
    return _ENCODER.encode(json.loads(_kombu_json(value)))


def _plain_json(value: Any) -> bool:
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return True
    if kind is dict:
        return all(type(key) is str and _plain_json(item) for key, item in value.items())
    if kind is list:
        return all(map(_plain_json, value))
    return False


def _round_trip(value: Any, serializer: str) -> Any:
    # Through kombu's registry, as the producer and the worker do: whatever
    # the serializer turns a value into is what the worker gets.
    content_type, encoding, data = _kombu_dumps(value, serializer)
    return _kombu_loads(data, content_type, encoding, accept=[content_type])


def _tagged(value: Any) -> str:
    """Encode a received value with its type: a tagged JSON array for anything but scalars."""
    kind = type(value)
    if kind is str:
        return _quote(value)
    if kind is int or kind is float or kind is bool or value is None:
        return _ENCODER.encode(value)
    encode = _TAGGED.get(kind)
    if encode is not None:
        return encode(value)
    cls = _quote(f"{kind.__module__}.{kind.__qualname__}")
    if isinstance(value, enum.Enum):
        return f'["enum",{cls},{_quote(value.name)}]'
    if isinstance(value, tuple) and hasattr(kind, "_fields"):
        return _array("namedtuple", value, cls)
    if dataclasses.is_dataclass(kind):
        fields = [f"[{_quote(f.name)},{_tagged(getattr(value, f.name))}]" for f in dataclasses.fields(kind)]
        return f'["dataclass",{cls},{",".join(fields)}]'
    if callable(getattr(value, "model_dump", None)) and hasattr(kind, "__pydantic_fields__"):
        # A pydantic model, sent as it is (pickle): its class and its fields.
        return f'["model",{cls},{_tagged(dict(value))}]'
    raise TypeError(f"no canonical form for {kind.__module__}.{kind.__qualname__}")


_quote: Callable[[str], str] = json.encoder.encode_basestring


def _array(tag: str, items: Any, *head: str) -> str:
    return "[" + ",".join([_quote(tag), *head, *map(_tagged, items)]) + "]"


def _unordered(tag: str, entries: Any) -> str:
    return "[" + ",".join([_quote(tag), *sorted(entries)]) + "]"


def _tz(value: datetime | time) -> str:
    return "null" if value.tzinfo is None else _quote(repr(value.tzinfo))


_TAGGED: dict[type, Callable[[Any], str]] = {
    list: lambda v: _array("list", v),
    tuple: lambda v: _array("tuple", v),
    dict: lambda v: _unordered("dict", (f"[{_tagged(k)},{_tagged(x)}]" for k, x in v.items())),
    set: lambda v: _unordered("set", map(_tagged, v)),
    frozenset: lambda v: _unordered("frozenset", map(_tagged, v)),
    bytes: lambda v: f'["bytes","{v.hex()}"]',
    bytearray: lambda v: f'["bytearray","{v.hex()}"]',
    complex: lambda v: f'["complex",{_tagged(v.real)},{_tagged(v.imag)}]',
    datetime: lambda v: f'["datetime","{v.isoformat()}",{_tz(v)},{v.fold}]',
    date: lambda v: f'["date","{v.isoformat()}"]',
    time: lambda v: f'["time","{v.isoformat()}",{_tz(v)},{v.fold}]',
    timedelta: lambda v: f'["timedelta",{v.days},{v.seconds},{v.microseconds}]',
    Decimal: lambda v: f'["decimal","{v}"]',
    uuid.UUID: lambda v: f'["uuid","{v.hex}"]',
}


def _no_canonical_form(
    task_name: str, identity: Any, serializer: str, exc: BaseException, from_hook: bool
) -> str:
    subject, value = ("what unique_identity() returned" if from_hook else "the arguments"), identity
    if isinstance(identity, dict):
        for name, item in identity.items():
            try:
                canonical_text(item, serializer)
            except _ENCODING_ERRORS:
                subject = f"unique_identity() result {name!r}" if from_hook else f"argument {name!r}"
                value = item
                break
    return (
        f"{task_name}: {subject} cannot be part of a unique key: {type(value).__name__} "
        f"{_short_repr(value)} has no canonical form once sent with the {serializer!r} "
        f"serializer ({exc})"
    )


def _short_repr(value: Any, limit: int = 80) -> str:
    try:
        text = repr(value)
    except RecursionError:
        return "(too deeply nested to show)"
    except Exception:
        return f"<{type(value).__name__} that cannot be shown>"
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
