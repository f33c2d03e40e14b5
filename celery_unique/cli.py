"""``celery -A proj unique list|count|release KEY|clear|reap|purge``: the lock admin on the command line.

Registered as a Celery subcommand through the ``celery.commands`` entry point.
What the subcommands share lives here once:

* errors of the lock store and of the settings end the command with one
  ``Error: ...`` line on stderr and exit status 1 (click's convention for a
  failed command; a bad option or argument exits 2);
* commands that read many locks first say which lock store they read, with
  any password hidden, so that an empty answer from the wrong store shows;
* ``--task`` and ``--queue`` filter, and ``--task`` takes a short name;
* ``--json`` (list, count, reap, purge) prints one JSON document on stdout
  instead, the lock store in it; errors stay on stderr with the same exit
  status, and so do warnings (``Warning: ...``, exit status 0);
* counts are spelt ``1 lock``, ``2 locks``; durations ``42s``, ``5m07s``,
  ``3h02m``, ``2d04h``.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .admin import LockStatus, UniqueLocks
from .config import describe_store
from .errors import UniqueTaskError
from .keys import slot_of

__all__ = ["unique"]

F = TypeVar("F", bound=Callable[..., Any])


class _AdminGroup(click.Group):
    """A command group whose subcommands report the package's errors in one line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UniqueTaskError as exc:
            # LockStoreError, ConfigurationError: the message says it all, a
            # traceback would only hide it.
            raise click.ClickException(str(exc)) from exc


class _WarningLine(logging.Handler):
    """Prints the admin's warnings (a result backend that fails) as one ``Warning: ...`` line on stderr."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"Warning: {record.getMessage()}", err=True)


@click.group(name="unique", cls=_AdminGroup)
def unique() -> None:
    """Inspect and release celery_unique locks."""
    logger = logging.getLogger("celery_unique.admin")
    if not any(isinstance(handler, _WarningLine) for handler in logger.handlers):
        logger.addHandler(_WarningLine())
        logger.propagate = False  # once is enough: not again through a handler of the app's


# -- shared by the subcommands -------------------------------------------------


def _filter_options(command: F) -> F:
    """Add ``--task`` (full or short name) and ``--queue`` to a subcommand."""
    task = click.option(
        "--task", "task_name", default=None, metavar="NAME", callback=_full_task_name,
        help="Only locks of this task: its full name, or its last part if no other task shares it.",
    )
    queue = click.option("--queue", default=None, metavar="QUEUE", help="Only locks of this queue.")
    return task(queue(command))


def _json_option(command: F) -> F:
    """Add ``--json`` to a subcommand."""
    return click.option(
        "--json", "as_json", is_flag=True, help="Print one JSON document on stdout instead (see the README)."
    )(command)


def _echo_json(document: dict[str, Any]) -> None:
    click.echo(json.dumps(document))


def _admin(ctx: click.Context) -> UniqueLocks:
    """The lock admin of the app given with ``celery -A``."""
    return UniqueLocks(ctx.obj.app)


def _say_store(ctx: click.Context) -> None:
    """Print which lock store the command reads."""
    click.echo(f"Lock store: {describe_store(ctx.obj.app)}")


def _head(ctx: click.Context, task_name: str | None, queue: str | None) -> dict[str, Any]:
    """The first fields of a JSON answer: the lock store read and the filters (null if not given)."""
    return {"lock_store": describe_store(ctx.obj.app), "filter": {"task_name": task_name, "queue": queue}}


def _plural(count: int, noun: str) -> str:
    """``1 lock``, ``2 locks``, ``0 locks``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _scope(task_name: str | None, queue: str | None) -> str:
    """The filters of a command, as a parenthesis for its messages."""
    parts = [f"task {task_name}"] * bool(task_name) + [f"queue {queue}"] * bool(queue)
    return f" ({', '.join(parts)})" if parts else ""


def _full_task_name(ctx: click.Context, param: click.Parameter, name: str | None) -> str | None:
    """Turn ``--task`` into the full task name that lock keys hold.

    A registered name is taken as it is, and so is a name with locks held
    under it (a task this app does not import). Otherwise the name must be
    the last part(s) of exactly one registered task's name.
    """
    if name is None:
        return None
    app = ctx.obj.app
    app.loader.import_default_modules()  # the tasks of `include` and autodiscovery
    if name in app.tasks:
        return name
    names: list[str] = sorted(n for n in app.tasks if not n.startswith("celery."))
    matches = [n for n in names if n.endswith(f".{name}")]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise click.BadParameter(
            f"{name!r} could be any of {', '.join(matches)}: give the full name", ctx=ctx, param=param
        )
    if _admin(ctx).count(task_name=name):
        return name
    short_names = {n.rsplit(".", 1)[-1] for n in names}
    close = difflib.get_close_matches(name, [*names, *short_names], n=3)
    suggestions = [n for n in names if n in close or n.rsplit(".", 1)[-1] in close]
    hint = (
        f"did you mean {' or '.join(suggestions)}?" if suggestions
        else f"this app's tasks are {', '.join(names) or 'none'}"
    )
    raise click.BadParameter(
        f"no task {name!r} in this app, and no lock is held under that name: {hint}", ctx=ctx, param=param
    )


#: Lines of the lock table printed per write.
_TABLE_CHUNK = 1000


def _echo_table(locks: list[LockStatus]) -> None:
    """Print ``locks`` as a table aligned on its widest cells, a chunk of lines at a time."""
    header = ("TASK", "QUEUE", "HOLDER", "AGE", "TTL", "STATE", "KEY")
    rows = [
        (lock.task_name, lock.queue, lock.task_id, _duration(lock.age), _duration(lock.ttl),
         _state(lock), lock.key)
        for lock in locks
    ]
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header) - 1)]
    line = "  ".join(f"{{:<{width}}}" for width in widths) + "  {}"
    click.echo(line.format(*header))
    for start in range(0, len(rows), _TABLE_CHUNK):
        click.echo("\n".join(line.format(*row) for row in rows[start:start + _TABLE_CHUNK]))


def _duration(seconds: float | None) -> str:
    """``42s``, ``5m07s``, ``3h02m``, ``2d04h`` (whole units, rounded down), or ``-`` if unknown."""
    if seconds is None:
        return "-"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _state(lock: LockStatus) -> str:
    """The holder's stored state, with ``running`` if a copy of it runs: ``PENDING, running``."""
    parts = [lock.state] if lock.state else []
    if lock.running:
        parts.append("running")
    return ", ".join(parts) or "-"


def _lock_json(lock: LockStatus) -> dict[str, Any]:
    """One lock of ``list --json``: LockStatus's fields (and the slot after the key), its time in ISO 8601."""
    fields: dict[str, Any] = {"key": lock.key, "slot": slot_of(lock.key)[1], **lock._asdict()}
    if lock.issued_at is not None:
        fields["issued_at"] = lock.issued_at.isoformat(timespec="milliseconds")
    if lock.age is not None:
        fields["age"] = round(lock.age, 3)
    return fields


# -- the subcommands -----------------------------------------------------------


@unique.command(name="list")
@_filter_options
@_json_option
@click.pass_context
def list_locks(ctx: click.Context, task_name: str | None, queue: str | None, as_json: bool) -> None:
    """List held locks: task, queue, holder task id, age, TTL, the holder's state and key."""
    if not as_json:
        _say_store(ctx)
    locks = _admin(ctx).describe(task_name=task_name, queue=queue)
    if as_json:
        locks_json = [_lock_json(lock) for lock in locks]
        _echo_json({**_head(ctx, task_name, queue), "count": len(locks), "locks": locks_json})
        return
    if not locks:
        click.echo(f"No locks held{_scope(task_name, queue)}.")
        return
    _echo_table(locks)
    click.echo(f"{_plural(len(locks), 'lock')} held{_scope(task_name, queue)}.")


@unique.command(name="count")
@_filter_options
@_json_option
@click.pass_context
def count_locks(ctx: click.Context, task_name: str | None, queue: str | None, as_json: bool) -> None:
    """Count held locks, without reading them (a SCAN only)."""
    if not as_json:
        _say_store(ctx)
    count = _admin(ctx).count(task_name=task_name, queue=queue)
    if as_json:
        _echo_json({**_head(ctx, task_name, queue), "count": count})
        return
    click.echo(f"{_plural(count, 'lock')} held{_scope(task_name, queue)}.")


@unique.command(name="release")
@click.argument("key")
@click.pass_context
def release_lock(ctx: click.Context, key: str) -> None:
    """Release the lock KEY, whoever holds it."""
    try:
        released = _admin(ctx).release(key)
    except ValueError as exc:  # not a lock key of this app
        raise click.BadParameter(str(exc), ctx=ctx, param_hint="KEY") from exc
    if not released:
        raise click.ClickException(f"No lock held at {key} in {describe_store(ctx.obj.app)}.")
    click.echo(f"Released {key}.")


@unique.command(name="clear")
@_filter_options
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def clear_locks(ctx: click.Context, task_name: str | None, queue: str | None, yes: bool) -> None:
    """Release every lock, or those of one task and/or queue."""
    _say_store(ctx)
    locks = _admin(ctx)
    if not yes:
        count = locks.count(task_name=task_name, queue=queue)
        if count == 0:
            click.echo(f"No locks held{_scope(task_name, queue)}.")
            return
        click.confirm(f"Release {_plural(count, 'lock')}{_scope(task_name, queue)}?", abort=True)
    released = locks.clear(task_name=task_name, queue=queue)
    if released == 0:
        click.echo(f"No locks held{_scope(task_name, queue)}.")
    else:
        click.echo(f"Released {_plural(released, 'lock')}{_scope(task_name, queue)}.")


@unique.command(name="reap")
@_filter_options
@_json_option
@click.pass_context
def reap_locks(ctx: click.Context, task_name: str | None, queue: str | None, as_json: bool) -> None:
    """Release the locks of tasks that have finished (per the result backend) but kept them."""
    if not as_json:
        _say_store(ctx)
    reaped = _admin(ctx).reap(task_name=task_name, queue=queue)
    if as_json:
        _echo_json({**_head(ctx, task_name, queue), "released": reaped})
        return
    if reaped == 0:
        click.echo(f"No lock of a finished task{_scope(task_name, queue)}.")
    else:
        click.echo(f"Released {_plural(reaped, 'lock')} of finished tasks{_scope(task_name, queue)}.")


@unique.command(name="purge")
@click.option("-Q", "--queues", default=None, metavar="QUEUES",
              help="Comma separated list of queue names to purge (default: every task queue).")
@click.option("-X", "--exclude-queues", default=None, metavar="QUEUES",
              help="Comma separated list of queue names not to purge.")
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
@_json_option
@click.pass_context
def purge_queued(
    ctx: click.Context, queues: str | None, exclude_queues: str | None, force: bool, as_json: bool
) -> None:
    """Remove the queued messages, as `celery purge` does, and release exactly their locks."""
    from kombu.exceptions import OperationalError

    from .purge import queue_names

    app = ctx.obj.app
    names = queue_names(app, _split(queues), _split(exclude_queues) or ())
    if not names:
        if as_json:
            _echo_json({"lock_store": describe_store(app), "queues": [], "messages": 0, "released": 0})
        else:
            click.echo("No queue to purge.")
        return
    if not as_json:
        _say_store(ctx)
    if not force:
        # With --json the question goes to stderr: stdout holds the document only.
        click.confirm(
            f"Delete every message of {_plural(len(names), 'queue')} ({', '.join(names)}) "
            "and release their locks?",
            abort=True, err=as_json,
        )
    try:
        result = _admin(ctx).purge(names)
    except OperationalError as exc:
        raise click.ClickException(f"the broker did not answer: {exc}") from exc
    if as_json:
        _echo_json({
            "lock_store": describe_store(app), "queues": names,
            "messages": result.messages, "released": result.released,
        })
        return
    click.echo(
        f"Purged {_plural(result.messages, 'message')} from {_plural(len(names), 'queue')}; "
        f"released {_plural(result.released, 'lock')}."
    )


def _split(names: str | None) -> list[str] | None:
    return [name.strip() for name in names.split(",") if name.strip()] if names else None
