"""Integrations with frameworks, one module each (``celery_unique.contrib.django``)."""

from __future__ import annotations

__all__: list[str] = []
