"""What the Celery and kombu under test can do, for tests that depend on it.

The package itself decides its version-dependent behaviour in
``celery_unique/compat.py``; these are facts about Celery and kombu that only
change what a test can provoke or observe.
"""

from __future__ import annotations

import celery
import kombu


def _version(text: str) -> tuple[int, int]:
    major, minor = (int("".join(c for c in part if c.isdigit()) or 0) for part in text.split(".")[:2])
    return major, minor


CELERY = _version(celery.__version__)
KOMBU = _version(kombu.__version__)

#: Celery 5.4 ships ``celery.contrib.django.task.DjangoTask`` (delay_on_commit).
HAS_DJANGO_TASK = CELERY >= (5, 4)
#: Celery 5.7 stores REVOKED when a worker hears of a revoke of a task it does
#: not run, stores FAILURE for Reject(requeue=False), and has the
#: task_acks_on_timeout and task_retry_on_worker_lost settings.
CELERY_57 = CELERY >= (5, 7)
#: kombu 5.7's Redis transport takes unacked_restore_interval: without it a
#: redelivery after the visibility timeout takes tens of seconds to come.
QUICK_REDELIVERY = KOMBU >= (5, 7)

needs_django_task = "needs Celery 5.4+, whose DjangoTask UniqueDjangoTask extends"
needs_celery_57 = "needs Celery 5.7+"
needs_quick_redelivery = "needs kombu 5.7+ (unacked_restore_interval) to redeliver within seconds"
