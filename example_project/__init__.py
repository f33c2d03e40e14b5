"""An example Celery project whose tasks are unique while queued (celery-unique)."""
