"""The example project's Celery app: ``celery -A example_project.app worker``."""

from __future__ import annotations

from celery import Celery

from example_project import config

app = Celery("example_project")
app.config_from_object(config)


def use_redis(server_url: str) -> None:
    """Point this process's app at another Redis server.

    Call it before the app first connects: Celery and celery-unique read the
    URLs once and keep their connections.
    """
    app.conf.update(config.redis_settings(server_url))
