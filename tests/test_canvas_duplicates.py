"""Duplicates inside canvases never hang them; forwarded headers never steer a call.

Real prefork workers (``tests/lifecycle_app.py``). A holder of ``double(2)``
is parked with a countdown, so any canvas step ``double(2)`` is a duplicate.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import chain, chord, group, states
from celery.exceptions import ChordError

from celery_unique import DuplicateTaskError
from celery_unique.testing import RedisServer
from tests.conftest import BROKER_DB, wait_until
from tests.lifecycle_app import QUEUE
from tests.lifecycle_support import ROOT, Lifecycle, park, stored

pytestmark = pytest.mark.slow

TIMEOUT = 15



@pytest.fixture
def life(redis_server: RedisServer) -> Lifecycle:
    return Lifecycle.on(redis_server)


def test_chain_link_with_existing_fails_the_chain_promptly(life: Lifecycle, tmp_path: Path) -> None:
    """A duplicate chain link with "existing" fails the chain's result at once; its parent succeeded."""
    app = life.app()
    double, total = app.tasks["life.double"], app.tasks["life.total"]
    with life.worker(tmp_path / "worker.log"):
        holder = park(app, 2)
        result = chain(
            double.s(1).set(unique=60),
            double.s().set(unique=60, on_duplicate="existing"),
            total.s(),
        ).apply_async()
        with pytest.raises(DuplicateTaskError) as info:
            result.get(timeout=TIMEOUT)
        assert info.value.task_id == holder.id
        first = result.parent.parent
        assert first.get(timeout=TIMEOUT) == 2
        assert stored(app, first.id) == states.SUCCESS
        assert stored(app, result.parent.id) == states.FAILURE
        holder.revoke()


def test_chain_link_with_raise_fails_the_chain_not_the_parent(life: Lifecycle, tmp_path: Path) -> None:
    """With "raise" too, a refused link fails the chain at once; the parent keeps its SUCCESS and result."""
    app = life.app()
    double = app.tasks["life.double"]
    with life.worker(tmp_path / "worker.log"):
        holder = park(app, 2)
        result = chain(double.s(1).set(unique=60), double.s().set(unique=60), double.s()).apply_async()
        with pytest.raises(DuplicateTaskError) as info:
            result.get(timeout=TIMEOUT)
        assert info.value.task_id == holder.id
        parent = result.parent.parent
        assert parent.get(timeout=TIMEOUT) == 2
        assert stored(app, parent.id) == states.SUCCESS
        assert stored(app, result.parent.id) == states.FAILURE
        holder.revoke()


@pytest.mark.parametrize("on_duplicate", ["existing", "raise"])
def test_chord_body_duplicate_fails_the_chord(life: Lifecycle, tmp_path: Path, on_duplicate: str) -> None:
    """A duplicate chord body fails the chord's result promptly, naming the holder."""
    app = life.app()
    double, total = app.tasks["life.double"], app.tasks["life.total"]
    with life.worker(tmp_path / "worker.log", concurrency=2):
        holder = app.tasks["life.total"].apply_async(([2, 4],), unique=60, countdown=60)
        result = chord(
            [double.s(1), double.s(2)], total.s().set(unique=60, on_duplicate=on_duplicate)
        ).apply_async()
        # The body's own failure, under either policy: the worker that sent it
        # never raised, so Celery took no chord-failure path.
        with pytest.raises(DuplicateTaskError) as info:
            result.get(timeout=TIMEOUT)
        assert holder.id in str(info.value)
        assert [r.get(timeout=TIMEOUT) for r in result.parent.results] == [2, 4]
        holder.revoke()


def test_chord_header_member_with_existing_fails_the_chord(life: Lifecycle, tmp_path: Path) -> None:
    """A duplicate chord header member with "existing" makes the chord fail promptly, naming the holder."""
    app = life.app()
    double, total = app.tasks["life.double"], app.tasks["life.total"]
    with life.worker(tmp_path / "worker.log", concurrency=2):
        holder = park(app, 2)
        result = chord(
            [double.s(1).set(unique=60), double.s(2).set(unique=60, on_duplicate="existing")], total.s()
        ).apply_async()
        # get() re-raises the failed member's error, or the body's ChordError quoting it.
        with pytest.raises((DuplicateTaskError, ChordError)) as info:
            result.get(timeout=TIMEOUT)
        assert holder.id in str(info.value)
        holder.revoke()


def test_group_member_with_existing_fails_only_itself(life: Lifecycle, tmp_path: Path) -> None:
    """A duplicate group member with "existing" is recorded as failed; the other members run."""
    app = life.app()
    double = app.tasks["life.double"]
    with life.worker(tmp_path / "worker.log", concurrency=2):
        holder = park(app, 2)
        result = group(
            double.s(1).set(unique=60),
            double.s(2).set(unique=60, on_duplicate="existing"),
            double.s(3).set(unique=60),
        ).apply_async()
        members = result.results
        assert members[0].get(timeout=TIMEOUT) == 2
        assert members[2].get(timeout=TIMEOUT) == 6
        with pytest.raises(DuplicateTaskError) as info:
            members[1].get(timeout=TIMEOUT)
        assert info.value.task_id == holder.id
        holder.revoke()


def test_link_with_existing_is_skipped_and_its_errback_told(life: Lifecycle, tmp_path: Path) -> None:
    """A duplicate link callback with "existing" is not run; its own errback hears DuplicateTaskError."""
    app = life.app()
    double = app.tasks["life.double"]
    scratch = life.scratch_client()
    with life.worker(tmp_path / "worker.log"):
        holder = park(app, 2)
        callback = double.s().set(unique=60, on_duplicate="existing")
        callback.link_error(app.tasks["life.errback"].s(token="link"))
        result = double.apply_async((1,), link=callback)
        assert result.get(timeout=TIMEOUT) == 2
        assert stored(app, result.id) == states.SUCCESS
        wait_until(lambda: scratch.lrange("errback:link", 0, -1), what="errback called")
        assert holder.id in scratch.lrange("errback:link", 0, -1)[0].decode()
        holder.revoke()


def test_forwarded_headers_do_not_steer_the_call(life: Lifecycle, tmp_path: Path) -> None:
    """A child enqueued with its parent's headers gets its own key, release mode and duplicate policy."""
    app = life.app()
    double = app.tasks["life.double"]
    parent = app.tasks["life.work"]
    parent_key = parent.lock_key(("p",), {}, {})
    forwarded = {
        "celery_unique_lock": parent_key,
        "celery_unique_until": "start",
        "celery_unique_replaces": "some-id",
        "celery_beat_task": True,
        "periodic_task_name": "every-minute",
    }
    locks = redis.Redis.from_url(life.locks)
    with life.worker(tmp_path / "worker.log"):
        first = double.apply_async((5,), unique=60, countdown=60, headers=forwarded)
        own_key = double.lock_key((5,), {}, {})
        assert locks.get(own_key) == first.id.encode()
        # Sent from inside a running task, as a forwarding task would.
        app.conf.update(task_always_eager=False)
        published = _enqueue_from_a_task(life, tmp_path, forwarded)
        assert "DuplicateTaskError" in published  # the beat marker did not turn "raise" into "existing"
        first.revoke()


def _enqueue_from_a_task(life: Lifecycle, tmp_path: Path, headers: dict[str, Any]) -> str:
    """Run a script that enqueues double(5) from inside an executing task, with ``headers``."""
    script = tmp_path / "forward.py"
    script.write_text(
        "import sys\n"
        "from tests.lifecycle_support import Lifecycle\n"
        f"life = Lifecycle(broker={life.broker!r}, backend={life.backend!r}, locks={life.locks!r},"
        f" scratch={life.scratch!r})\n"
        "app = life.app()\n"
        "work = app.tasks['life.work']\n"
        "work.push_request(id='parent', called_directly=False, headers={})\n"
        "from celery.app.task import _task_stack\n"
        "_task_stack.push(work)\n"
        "try:\n"
        f"    app.tasks['life.double'].apply_async((5,), unique=60, headers={headers!r})\n"
        "    print('published')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=60, env=life.env()
    )
    return done.stdout + done.stderr


def test_real_beat_duplicate_tick_is_logged_not_an_error(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A real `celery beat` sends a unique entry once; later ticks are INFO lines, never scheduling errors."""
    life = Lifecycle.on(
        redis_server,
        beat_schedule={
            "double-every-second": {
                "task": "life.double", "schedule": 1.0, "args": [21], "options": {"unique": 300},
            }
        },
    )
    log = tmp_path / "beat.log"
    args = [
        sys.executable, "-m", "celery", "-A", "tests.lifecycle_app", "beat", "--loglevel=INFO",
        "-s", str(tmp_path / "schedule"), "--pidfile=",
    ]
    broker = redis_server.client(BROKER_DB)
    with log.open("wb") as out:
        process = subprocess.Popen(args, cwd=ROOT, env=life.env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: log.read_text(errors="replace").count("refused duplicate") >= 2,
                   timeout=30, what="two refused ticks")
    finally:
        process.terminate()
        process.wait(timeout=20)
    text = log.read_text(errors="replace")
    assert broker.llen(QUEUE) == 1
    assert "ERROR" not in text
    assert "SchedulingError" not in text
    assert "Traceback" not in text


def test_first_chain_step_with_existing_fails_the_chain(life: Lifecycle, tmp_path: Path) -> None:
    """A chain whose first step is a duplicate with "existing" returns, and its result raises at once."""
    app = life.app()
    double = app.tasks["life.double"]
    holder = park(app, 2)
    result = chain(double.s(2).set(unique=60, on_duplicate="existing"), double.s()).apply_async()
    with pytest.raises(DuplicateTaskError) as info:
        result.get(timeout=TIMEOUT)
    assert info.value.task_id == holder.id
    holder.revoke()


def test_link_with_raise_tells_the_errback_and_keeps_the_parent(life: Lifecycle, tmp_path: Path) -> None:
    """A duplicate link callback with "raise" leaves its parent SUCCESS; its errback hears of it."""
    app = life.app()
    double = app.tasks["life.double"]
    scratch = life.scratch_client()
    with life.worker(tmp_path / "worker.log"):
        holder = park(app, 2)
        callback = double.s().set(unique=60)
        callback.link_error(app.tasks["life.errback"].s(token="raised"))
        result = double.apply_async((1,), link=callback)
        assert result.get(timeout=TIMEOUT) == 2
        wait_until(lambda: scratch.lrange("errback:raised", 0, -1), what="errback called")
        assert stored(app, result.id) == states.SUCCESS
        holder.revoke()
