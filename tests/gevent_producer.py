"""Enqueue distinct unique calls from as many greenlets of a gevent-patched producer.

``python -m tests.gevent_producer BROKER_URL LOCK_URL CALLS`` patches the
process first, as a gevent application does, then enqueues ``CALLS`` calls
of one ``UniqueTask``, each from a greenlet of its own, all at once, and
prints how many distinct task ids were accepted.
"""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

import gevent  # noqa: E402
from celery import Celery  # noqa: E402

from celery_unique import UniqueTask  # noqa: E402


def main(broker_url: str, lock_url: str, calls: int) -> int:
    """Enqueue ``calls`` distinct calls at once; return how many distinct ids were accepted."""
    app = Celery("gevent-producer", broker=broker_url, set_as_current=False)
    app.conf.update(
        unique_redis_url=lock_url, broker_connection_retry_on_startup=False, task_default_queue="celery"
    )

    @app.task(base=UniqueTask, name="tests.gevent.report", shared=False)
    def report(user_id: int) -> int:
        return user_id

    greenlets = [gevent.spawn(report.apply_async, (n,), unique=60) for n in range(calls)]
    gevent.joinall(greenlets, raise_error=True)
    return len({greenlet.value.id for greenlet in greenlets})


if __name__ == "__main__":
    print(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
