"""Where the Celery releases this package supports (5.3 and later) differ.

Every behaviour of celery-unique that depends on the Celery version is
decided here, so a reader finds the differences in one place.
"""

from __future__ import annotations

from celery import VERSION

__all__ = ["BEAT_HEADER", "BEAT_MARKS_ITS_TASKS"]

#: The message header Celery beat puts on the tasks it sends.
BEAT_HEADER = "celery_beat_task"

#: Whether this Celery's beat sets :data:`BEAT_HEADER` itself (5.7 and later).
#: Before 5.7 a task cannot tell beat from any other caller, so a beat entry
#: whose duplicates should be logged rather than raised sets the header in its
#: options: ``{"unique": 300, "headers": {"celery_beat_task": True}}``.
BEAT_MARKS_ITS_TASKS: bool = (VERSION.major, VERSION.minor) >= (5, 7)
