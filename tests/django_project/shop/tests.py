"""Orders: unique receipts from views, at commit, on a real worker."""

import logging

import pytest
import redis
from celery.contrib.django.task import DjangoTask
from django.db import transaction
from django.test import Client
from proj.celery import app

from celery_unique import DuplicateTaskError
from celery_unique.contrib.django import UniqueDjangoTask
from celery_unique.testing import wait_for
from shop.models import Order
from shop.tasks import send_receipt


def only_lock(locks: redis.Redis) -> tuple[str, str]:
    """Return the one lock's key and holder."""
    keys = locks.keys("*")
    assert len(keys) == 1, keys
    return keys[0].decode(), locks.get(keys[0]).decode()


def test_unique_task_keeps_the_django_task_class() -> None:
    """Under the fixup the app's task class is DjangoTask, and a UniqueDjangoTask is one."""
    assert issubclass(app.Task, DjangoTask)
    task = app.tasks["shop.tasks.send_receipt"]
    assert isinstance(task, UniqueDjangoTask)
    assert isinstance(task, DjangoTask)


def test_view_answers_409_naming_the_queued_receipt(
    client: Client, locks: redis.Redis, broker: redis.Redis
) -> None:
    """A second resend of the same receipt gets 409 with the queued task's id."""
    first = client.post("/orders/7/receipt/")
    assert first.status_code == 202
    second = client.post("/orders/7/receipt/")
    assert second.status_code == 409
    assert second.json()["queued"] == first.json()["queued"]
    assert only_lock(locks)[1] == first.json()["queued"]
    assert broker.llen("celery") == 1


@pytest.mark.django_db(transaction=True)
def test_delay_on_commit_locks_at_commit(locks: redis.Redis, broker: redis.Redis) -> None:
    """delay_on_commit takes the lock and publishes when the transaction commits, not before."""
    with transaction.atomic():
        order = Order.objects.create(email="a@example.com")
        send_receipt.delay_on_commit(order.id)
        assert locks.dbsize() == 0
        assert broker.llen("celery") == 0
    key, _ = only_lock(locks)
    assert key.startswith("unique:celery:shop.tasks.send_receipt:")
    assert broker.llen("celery") == 1


@pytest.mark.django_db(transaction=True)
def test_rolled_back_transaction_takes_no_lock(locks: redis.Redis, broker: redis.Redis) -> None:
    """A rolled-back transaction leaves neither a lock nor a message."""
    def declined() -> None:
        with transaction.atomic():
            send_receipt.delay_on_commit(7)
            raise RuntimeError("payment declined")

    with pytest.raises(RuntimeError):
        declined()
    assert locks.dbsize() == 0
    assert broker.llen("celery") == 0


@pytest.mark.django_db(transaction=True)
def test_order_view_receipt_runs_on_a_worker(client: Client, locks: redis.Redis, worker: object) -> None:
    """An order placed through the view gets its receipt from the worker, which frees the lock."""
    response = client.post("/orders/", {"email": "b@example.com"})
    assert response.status_code == 201
    order = Order.objects.get(pk=response.json()["order"])
    assert wait_for(lambda: Order.objects.get(pk=order.pk).receipts_sent == 1), "no receipt sent"
    assert wait_for(lambda: locks.dbsize() == 0), "lock not released after success"


@pytest.mark.django_db(transaction=True)
def test_duplicate_at_commit_is_logged_not_raised(
    broker: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A duplicate refused at commit is an INFO line; the commit and its other callbacks go on."""
    held = send_receipt.delay(7)
    after: list[str] = []
    with caplog.at_level(logging.INFO, logger="celery_unique"), transaction.atomic():
        send_receipt.delay_on_commit(7)
        transaction.on_commit(lambda: after.append("ran"))
    assert after == ["ran"]
    assert broker.llen("celery") == 1
    refusals = [r for r in caplog.records if r.name.startswith("celery_unique") and held.id in r.getMessage()]
    assert refusals, caplog.text
    assert all(r.levelno == logging.INFO for r in refusals)


@pytest.mark.django_db(transaction=True)
def test_explicit_on_duplicate_raise_escapes_the_commit(locks: redis.Redis) -> None:
    """on_duplicate="raise" is honoured: the error leaves the commit, and later callbacks are lost."""
    held = send_receipt.delay(7)
    after: list[str] = []

    def order() -> None:
        with transaction.atomic():
            Order.objects.create(email="c@example.com")
            send_receipt.apply_async_on_commit((7,), on_duplicate="raise")
            transaction.on_commit(lambda: after.append("ran"))

    with pytest.raises(DuplicateTaskError) as info:
        order()
    assert info.value.task_id == held.id
    assert Order.objects.filter(email="c@example.com").exists()
    assert after == []


@pytest.mark.django_db(transaction=True)
def test_apply_async_on_commit_passes_options(locks: redis.Redis) -> None:
    """apply_async_on_commit's options reach apply_async: countdown plus TTL set the lock's life."""
    with transaction.atomic():
        send_receipt.apply_async_on_commit((8,), countdown=60, unique=10)
    key, _ = only_lock(locks)
    assert 60_000 < locks.pttl(key) <= 70_000


@pytest.mark.django_db(transaction=True)
def test_outside_a_transaction_it_runs_at_once(locks: redis.Redis, broker: redis.Redis) -> None:
    """In autocommit mode delay_on_commit enqueues at once, and a duplicate does not raise."""
    send_receipt.delay_on_commit(9)
    assert locks.dbsize() == 1
    send_receipt.delay_on_commit(9)
    assert broker.llen("celery") == 1


@pytest.mark.django_db(transaction=True)
def test_misspelt_option_is_refused_at_the_call(locks: redis.Redis, broker: redis.Redis) -> None:
    """apply_async_on_commit refuses a misspelt option at the call: no callback, no lock, no message."""
    after: list[str] = []
    with transaction.atomic():
        with pytest.raises(TypeError, match=r"shop\.tasks\.send_receipt: unknown option 'uniqe'"):
            send_receipt.apply_async_on_commit((7,), uniqe=60)
        transaction.on_commit(lambda: after.append("ran"))
    assert after == ["ran"]  # the commit ran: the refused call left no callback to fail in it
    assert locks.dbsize() == 0
    assert broker.llen("celery") == 0
