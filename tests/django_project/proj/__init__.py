"""A small Django project: orders with receipts, and periodic reports."""

from .celery import app as celery_app

__all__ = ["celery_app"]
