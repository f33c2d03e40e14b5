"""``celery -A proj unique list|release KEY|clear|reap|purge``: the lock admin on the command line.

Registered as a Celery subcommand through the ``celery.commands`` entry point.
What the subcommands share lives here once:

* errors of the lock store and of the settings end the command with one
  ``Error: ...`` line on stderr and exit status 1 (click's convention for a
  failed command; a bad option or argument exits 2);
* commands that read many locks first say which lock store they read, with
  any password hidden, so that an empty answer from the wrong store shows;
* ``--task`` and ``--queue`` filter, and ``--task`` takes a short name;
* counts are spelt ``1 lock``, ``2 locks``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .admin import LockInfo, UniqueLocks
from .config import describe_store
from .errors import UniqueTaskError

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


@click.group(name="unique", cls=_AdminGroup)
def unique() -> None:
    """Inspect and release celery_unique locks."""


# -- shared by the subcommands -------------------------------------------------


def _filter_options(command: F) -> F:
    """Add ``--task`` (full or short name) and ``--queue`` to a subcommand."""
    task = click.option(
        "--task", "task_name", default=None, metavar="NAME", callback=_full_task_name,
        help="Only locks of this task: its full name, or its last part if no other task shares it.",
    )
    queue = click.option("--queue", default=None, metavar="QUEUE", help="Only locks of this queue.")
    return task(queue(command))


def _admin(ctx: click.Context) -> UniqueLocks:
    """The lock admin of the app given with ``celery -A``."""
    return UniqueLocks(ctx.obj.app)


def _say_store(ctx: click.Context) -> None:
    """Print which lock store the command reads."""
    click.echo(f"Lock store: {describe_store(ctx.obj.app)}")


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


def _echo_table(locks: list[LockInfo]) -> None:
    """Print ``locks`` as a table aligned on its widest cells, a chunk of lines at a time."""
    header = ("TASK", "QUEUE", "HOLDER", "TTL", "KEY")
    widths = [
        max(len(header[0]), *(len(lock.task_name) for lock in locks)),
        max(len(header[1]), *(len(lock.queue) for lock in locks)),
        max(len(header[2]), *(len(lock.task_id) for lock in locks)),
        max(len(header[3]), *(len(_ttl(lock.ttl)) for lock in locks)),
    ]
    line = "  ".join(f"{{:<{width}}}" for width in widths) + "  {}"
    click.echo(line.format(*header))
    for start in range(0, len(locks), _TABLE_CHUNK):
        click.echo("\n".join(
            line.format(lock.task_name, lock.queue, lock.task_id, _ttl(lock.ttl), lock.key)
            for lock in locks[start:start + _TABLE_CHUNK]
        ))


def _ttl(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.0f}s"


# -- the subcommands -----------------------------------------------------------


@unique.command(name="list")
@_filter_options
@click.pass_context
def list_locks(ctx: click.Context, task_name: str | None, queue: str | None) -> None:
    """List held locks: task, queue, holder task id, TTL and key."""
    _say_store(ctx)
    locks = _admin(ctx).list(task_name=task_name, queue=queue)
    if not locks:
        click.echo(f"No locks held{_scope(task_name, queue)}.")
        return
    _echo_table(locks)
    click.echo(f"{_plural(len(locks), 'lock')} held{_scope(task_name, queue)}.")


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
@click.pass_context
def reap_locks(ctx: click.Context, task_name: str | None, queue: str | None) -> None:
    """Release the locks of tasks that have finished (per the result backend) but kept them."""
    _say_store(ctx)
    reaped = _admin(ctx).reap(task_name=task_name, queue=queue)
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
@click.pass_context
def purge_queued(
    ctx: click.Context, queues: str | None, exclude_queues: str | None, force: bool
) -> None:
    """Remove the queued messages, as `celery purge` does, and release exactly their locks."""
    from kombu.exceptions import OperationalError

    from .purge import queue_names

    app = ctx.obj.app
    names = queue_names(app, _split(queues), _split(exclude_queues) or ())
    if not names:
        click.echo("No queue to purge.")
        return
    _say_store(ctx)
    if not force:
        click.confirm(
            f"Delete every message of {_plural(len(names), 'queue')} ({', '.join(names)}) "
            "and release their locks?",
            abort=True,
        )
    try:
        result = _admin(ctx).purge(names)
    except OperationalError as exc:
        raise click.ClickException(f"the broker did not answer: {exc}") from exc
    click.echo(
        f"Purged {_plural(result.messages, 'message')} from {_plural(len(names), 'queue')}; "
        f"released {_plural(result.released, 'lock')}."
    )


def _split(names: str | None) -> list[str] | None:
    return [name.strip() for name in names.split(",") if name.strip()] if names else None
