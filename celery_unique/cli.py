"""``celery -A proj unique list|release KEY|clear``: the lock admin on the command line.

Registered as a Celery subcommand through the ``celery.commands`` entry point.
"""

from __future__ import annotations

from typing import Any

import click

from .admin import UniqueLocks

__all__ = ["unique"]


def _locks(ctx: click.Context) -> UniqueLocks:
    return UniqueLocks(ctx.obj.app)


@click.group(name="unique")
def unique() -> None:
    """Inspect and release celery_unique locks."""


@unique.command(name="list")
@click.option("--task", "task_name", default=None, help="Only locks of this task name.")
@click.option("--queue", default=None, help="Only locks of this queue.")
@click.pass_context
def list_locks(ctx: click.Context, task_name: str | None, queue: str | None) -> None:
    """List held locks: task, queue, holder task id, TTL and key."""
    locks = _locks(ctx).list(task_name=task_name, queue=queue)
    if not locks:
        click.echo("No locks held.")
        return
    rows = [("TASK", "QUEUE", "HOLDER", "TTL", "KEY")] + [
        (lock.task_name, lock.queue, lock.task_id, _ttl(lock.ttl), lock.key) for lock in locks
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        click.echo("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[4]]))
    click.echo(f"{len(locks)} lock{'s' if len(locks) != 1 else ''} held.")


@unique.command(name="release")
@click.argument("key")
@click.pass_context
def release_lock(ctx: click.Context, key: str) -> None:
    """Release the lock KEY, whoever holds it."""
    if _locks(ctx).release(key):
        click.echo(f"Released {key}.")
    else:
        raise click.ClickException(f"No lock held at {key}.")


@unique.command(name="clear")
@click.option("--task", "task_name", default=None, help="Only locks of this task name.")
@click.option("--queue", default=None, help="Only locks of this queue.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def clear_locks(ctx: click.Context, task_name: str | None, queue: str | None, yes: bool) -> None:
    """Release every lock, or those of one task and/or queue."""
    locks = _locks(ctx)
    count = len(locks.list(task_name=task_name, queue=queue))
    if count == 0:
        click.echo("No locks held.")
        return
    if not yes:
        click.confirm(f"Release {count} lock{'s' if count != 1 else ''}?", abort=True)
    click.echo(f"Released {locks.clear(task_name=task_name, queue=queue)} locks.")


def _ttl(seconds: Any) -> str:
    return "-" if seconds is None else f"{seconds:.0f}s"
