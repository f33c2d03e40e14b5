from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_POST

from celery_unique import DuplicateTaskError

from .models import Order
from .tasks import send_receipt


@require_POST
def place_order(request: HttpRequest) -> JsonResponse:
    """Save an order; its receipt is queued when the order is committed."""
    with transaction.atomic():
        order = Order.objects.create(email=request.POST["email"])
        send_receipt.delay_on_commit(order.id)
    return JsonResponse({"order": order.id}, status=201)


@require_POST
def resend_receipt(request: HttpRequest, order_id: int) -> JsonResponse:
    """Queue a receipt now; 409 names the queued one if there is one."""
    try:
        result = send_receipt.delay(order_id)
    except DuplicateTaskError as exc:
        return JsonResponse({"queued": exc.task_id}, status=409)
    return JsonResponse({"queued": result.id}, status=202)
