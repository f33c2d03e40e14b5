"""``UniqueDjangoTask``: a unique task that keeps Celery's Django helpers.

Under Django, Celery makes ``celery.contrib.django.task.DjangoTask`` the app's
task class; it adds ``delay_on_commit`` and ``apply_async_on_commit``. A task
declared with ``base=UniqueTask`` does not inherit from it, so both helpers are
gone; ``base=UniqueDjangoTask`` has them::

    @shared_task(base=UniqueDjangoTask, unique=300)
    def send_receipt(order_id): ...

    with transaction.atomic():
        order = Order.objects.create(...)
        send_receipt.delay_on_commit(order.id)   # locked and published at commit

The lock is taken when the transaction commits, not when the helper is called:
a rolled-back transaction leaves no lock behind. By then the view has usually
returned, so nobody could catch a ``DuplicateTaskError``; Django would let it
escape from the commit (failing the request after its data was saved) and
drop the transaction's remaining ``on_commit`` callbacks. A duplicate refused
at commit is therefore logged at INFO and sends ``task_duplicate``, as
``on_duplicate="existing"`` does, unless the call passes ``on_duplicate``.
"""

from __future__ import annotations

import functools
from typing import Any

try:
    from celery.contrib.django.task import DjangoTask
except ImportError as exc:  # Celery 5.3: no DjangoTask, no delay_on_commit to keep
    raise ImportError(
        "celery_unique.contrib.django needs Celery 5.4 or later: UniqueDjangoTask extends its "
        "DjangoTask (delay_on_commit); with Celery 5.3 use UniqueTask"
    ) from exc
from django.db import transaction  # type: ignore[import-untyped,import-not-found,unused-ignore]

from ..option_names import check_option_names
from ..task import UniqueTask

__all__ = ["UniqueDjangoTask"]


class UniqueDjangoTask(UniqueTask, DjangoTask):  # type: ignore[misc]
    """``UniqueTask`` with ``DjangoTask``'s ``delay_on_commit`` and ``apply_async_on_commit``."""

    def delay_on_commit(self, *args: Any, **kwargs: Any) -> None:
        """Call ``delay(*args, **kwargs)`` when the current transaction commits.

        A duplicate refused then is logged, not raised (see the module docstring).
        """
        transaction.on_commit(functools.partial(self._apply_at_commit, args, kwargs))

    def apply_async_on_commit(self, *args: Any, **options: Any) -> None:
        """Call ``apply_async(*args, **options)`` when the current transaction commits.

        A duplicate refused then is logged, not raised, unless ``on_duplicate``
        is given. A misspelt option (``uniqe=``) raises here, at the call, not
        at commit.
        """
        check_option_names(self.name, options)
        transaction.on_commit(functools.partial(self._apply_at_commit, *args, **options))

    def _apply_at_commit(self, *args: Any, **options: Any) -> None:
        options.setdefault("on_duplicate", "existing")
        self.apply_async(*args, **options)
