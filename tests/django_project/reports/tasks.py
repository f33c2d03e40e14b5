from celery import shared_task

from celery_unique.contrib.django import UniqueDjangoTask


# A PeriodicTask row has no free-form options: the task's own default
# makes every call, beat's and the admin's included, unique.
@shared_task(base=UniqueDjangoTask, unique=300)
def build_report(region: str) -> str:
    return f"report for {region}"
