"""Periodic reports: django-celery-beat's scheduler and admin on a unique task."""

import json
import logging
from datetime import timedelta

import pytest
import redis
from django.test import Client
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from django_celery_beat.schedulers import DatabaseScheduler
from proj.celery import app

from reports.tasks import build_report

CHANGELIST = "/admin/django_celery_beat/periodictask/"


def periodic_report(region: str = "north", **fields: object) -> PeriodicTask:
    """A PeriodicTask row running build_report(region) every ten seconds."""
    every, _ = IntervalSchedule.objects.get_or_create(every=10, period=IntervalSchedule.SECONDS)
    return PeriodicTask.objects.create(
        name=f"{region} report",
        task="reports.tasks.build_report",
        interval=every,
        args=json.dumps([region]),
        **fields,
    )


def run_selected(admin_client: Client, task: PeriodicTask) -> str:
    """POST the admin's "Run selected tasks" action; return the page it lands on."""
    admin_client.raise_request_exception = False
    response = admin_client.post(
        CHANGELIST, {"action": "run_tasks", "_selected_action": [task.pk]}, follow=True
    )
    assert response.status_code == 200, response.content[:2000]
    return response.content.decode()


@pytest.mark.django_db
def test_admin_run_takes_the_lock(admin_client: Client, locks: redis.Redis, broker: redis.Redis) -> None:
    """The admin's "Run selected tasks" enqueues through the lock."""
    page = run_selected(admin_client, periodic_report())
    assert "1 task was successfully run" in page
    assert broker.llen("celery") == 1
    assert locks.dbsize() == 1


@pytest.mark.django_db
def test_admin_run_with_lock_held_is_no_server_error(
    admin_client: Client, locks: redis.Redis, broker: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """"Run selected tasks" on a task whose lock is held answers 200 and logs the refusal at INFO."""
    task = periodic_report()
    held = build_report.delay("north")
    with caplog.at_level(logging.INFO, logger="celery_unique"):
        page = run_selected(admin_client, task)
    assert "1 task was successfully run" in page
    assert broker.llen("celery") == 1
    (key,) = locks.keys("*")
    assert locks.get(key).decode() == held.id
    refusals = [r for r in caplog.records if r.name.startswith("celery_unique") and held.id in r.getMessage()]
    assert refusals, caplog.text
    assert all(r.levelno == logging.INFO for r in refusals)


@pytest.mark.django_db(transaction=True)
def test_skipped_tick_still_counts_a_run(broker: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    """A DatabaseScheduler tick refused as a duplicate logs INFO, not an error, and still counts a run."""
    task = periodic_report(last_run_at=timezone.now() - timedelta(hours=1))
    held = build_report.delay("north")
    scheduler = DatabaseScheduler(app=app)
    try:
        with caplog.at_level(logging.INFO):
            scheduler.tick()
        scheduler.sync()
    finally:
        scheduler.close()
    task.refresh_from_db()
    assert task.total_run_count == 1
    assert task.last_run_at > timezone.now() - timedelta(minutes=1)
    assert broker.llen("celery") == 1
    assert "Sending due task north report (reports.tasks.build_report)" in caplog.text
    refusals = [r for r in caplog.records if r.name.startswith("celery_unique") and held.id in r.getMessage()]
    assert refusals, caplog.text
    assert all(r.levelno == logging.INFO for r in refusals)
    # The line docs/django.md shows for a skipped tick.
    assert "refused duplicate of reports.tasks.build_report" in refusals[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
