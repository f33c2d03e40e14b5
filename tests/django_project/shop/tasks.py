from celery import shared_task
from django.db.models import F

from celery_unique.contrib.django import UniqueDjangoTask

from .models import Order


@shared_task(base=UniqueDjangoTask, unique=300)
def send_receipt(order_id: int) -> int:
    Order.objects.filter(pk=order_id).update(receipts_sent=F("receipts_sent") + 1)
    return order_id
