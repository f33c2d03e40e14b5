"""What makes two tasks the same: the lock key of a call.

Two calls are the same task when they have the same task name, the same routed
queue and the same arguments once bound to the task function's signature (with
defaults applied). The arguments are serialized canonically, as JSON with
sorted keys and kombu's encoders for datetime, UUID, Decimal and bytes, so the
key depends on values and types, never on how the call was spelt. Only a
sha256 digest of them goes into the key: keys stay short and Redis holds no
argument data.

A key reads ``<prefix>:<queue>:<task name>:<digest>``. Queue and task name are
escaped so that neither can break the layout or act as a SCAN pattern, which
lets the lock admin list locks by task and queue without any payload.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from kombu.utils.json import JSONEncoder

if TYPE_CHECKING:
    from .task import UniqueTask

__all__ = ["LockKey", "argument_digest", "bind_arguments", "call_digest", "format_key", "parse_key"]

# One encoder for every call: it holds no state between calls, and building
# one per call costs more than encoding three small arguments.
_ENCODER = JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True
)

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
    return f"{prefix}:{escape(queue)}:{escape(task_name)}:{digest}"


def parse_key(key: str) -> LockKey:
    """Split a lock key made by :func:`format_key` back into its parts."""
    prefix, queue, task_name, digest = key.rsplit(":", 3)
    return LockKey(prefix, unescape(queue), unescape(task_name), digest)


def call_digest(
    task: UniqueTask,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    unique_on: Sequence[str] | None,
) -> str:
    """Return the digest of what identifies a call of ``task`` (the key's last part).

    The one place a call's identity is derived: bind the arguments to the
    task's signature, keep the ``unique_on`` names, apply the task's
    ``unique_identity()`` hook, encode canonically and hash.
    """
    signature = run_signature(task)
    try:
        arguments = bind_arguments(signature, args, kwargs, strict=bool(task.typing))
    except TypeError as exc:
        raise TypeError(f"{task.name}: {exc}") from None
    if unique_on is not None:
        arguments = _select(task.name, signature, arguments, unique_on)
    return argument_digest(task.name, task.unique_identity(arguments))


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


def _select(
    task_name: str,
    signature: inspect.Signature | None,
    arguments: dict[str, Any],
    names: Sequence[str],
) -> dict[str, Any]:
    parameters = signature.parameters if signature is not None else {}
    var_keyword = next(
        (p.name for p in parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None
    )
    extra = arguments.get(var_keyword, {}) if var_keyword else {}
    selected: dict[str, Any] = {}
    for name in names:
        if name in parameters and name != var_keyword:
            selected[name] = arguments[name]
        elif var_keyword is not None:
            selected[name] = extra.get(name)
        else:
            raise ValueError(
                f"{task_name}: unique_on names {name!r}, which is not a parameter of the task "
                f"(parameters: {', '.join(parameters) or 'none'})"
            )
    return selected


def bind_arguments(
    signature: inspect.Signature | None,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    *,
    strict: bool = True,
) -> dict[str, Any]:
    """Map the call's arguments to parameter names, with defaults applied.

    ``f(1, 2)``, ``f(1, b=2)``, ``f(b=2, a=1)`` and (where ``b`` defaults to 2)
    ``f(1)`` all give ``{"a": 1, "b": 2}``. A call that does not fit the
    signature raises ``TypeError`` when ``strict``, as Celery's own argument
    check does; otherwise (a task with ``typing=False``) it keeps its raw
    ``args`` and ``kwargs``.
    """
    args = tuple(args or ())
    kwargs = dict(kwargs or {})
    if signature is not None:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            if strict:
                raise
        else:
            bound.apply_defaults()
            return dict(bound.arguments)
    return {"*args": list(args), "**kwargs": kwargs}


def argument_digest(task_name: str, arguments: Mapping[str, Any]) -> str:
    """Return the sha256 of the canonical JSON of ``arguments`` (URL-safe base64).

    Raises ``TypeError`` naming the task and the argument if a value has no
    canonical JSON form.
    """
    try:
        encoded = _ENCODER.encode(arguments)
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(_unserializable(task_name, arguments, exc)) from exc
    digest = hashlib.sha256(encoded.encode("utf-8", "surrogatepass")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _unserializable(task_name: str, arguments: Mapping[str, Any], exc: Exception) -> str:
    for name, value in arguments.items():
        try:
            _ENCODER.encode(value)
        except (TypeError, ValueError, RecursionError):
            return (
                f"{task_name}: argument {name!r} cannot be part of a unique key: "
                f"{type(value).__name__} {_short_repr(value)} has no canonical JSON form ({exc})"
            )
    return f"{task_name}: the arguments cannot be part of a unique key ({exc})"


def _short_repr(value: Any, limit: int = 80) -> str:
    try:
        text = repr(value)
    except RecursionError:
        return "(too deeply nested to show)"
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
