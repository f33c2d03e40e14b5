"""``on_duplicate="join"``: a refused canvas step goes on with the holder's result.

Real prefork workers (``tests/lifecycle_app.py``). A holder of ``double(2)``
is sent with a short countdown, so a step ``double(2)`` sent meanwhile is a
duplicate that the holder finishes a moment later.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import chain, chord, group, states

from celery_unique import DuplicateTaskError, JoinError
from celery_unique.testing import RedisServer
from tests.lifecycle_app import QUEUE
from tests.lifecycle_support import Lifecycle, park, stored

pytestmark = pytest.mark.slow

TIMEOUT = 20


@pytest.fixture
def life(redis_server: RedisServer) -> Lifecycle:
    return Lifecycle.on(redis_server)


def test_a_refused_chain_link_goes_on_with_the_holders_result(life: Lifecycle, tmp_path: Path) -> None:
    """A link refused in a worker's hand-over joins the holder: the chain ends on the holder's result."""
    app = life.app()
    double = app.tasks["life.double"]
    with life.worker(tmp_path / "worker.log", concurrency=2):
        holder = double.apply_async((2,), unique=60, countdown=1)
        result = chain(
            double.s(1).set(unique=60),
            double.s().set(unique=60, on_duplicate="join"),
            double.s(),
        ).apply_async()
        assert result.get(timeout=TIMEOUT) == 8
        joined = result.parent
        assert joined.get(timeout=TIMEOUT) == 4
        assert holder.get(timeout=TIMEOUT) == 4
        meta = app.backend.get_task_meta(joined.id, cache=False)
        assert (meta["status"], meta["result"]) == (states.SUCCESS, 4)
        assert stored(app, result.parent.parent.id) == states.SUCCESS


def test_a_joined_step_fails_with_the_holders_error(life: Lifecycle, tmp_path: Path) -> None:
    """A holder that fails fails the joined chain with its own error, and the chain's errback hears it."""
    app = life.app()
    double, work = app.tasks["life.double"], app.tasks["life.work"]
    scratch = life.scratch_client()
    with life.worker(tmp_path / "worker.log", concurrency=2):
        holder = work.apply_async(("f",), {"seconds": 0.5, "fail": True}, unique=60)
        result = chain(
            double.s(1).set(unique=60),
            work.si("f", seconds=0.5, fail=True).set(unique=60, on_duplicate="join"),
            double.s(),
        ).on_error(app.tasks["life.errback"].s(token="join")).apply_async()
        with pytest.raises(RuntimeError, match="f failed on purpose"):
            result.get(timeout=TIMEOUT)
        with pytest.raises(RuntimeError):
            holder.get(timeout=TIMEOUT)
        assert stored(app, result.parent.parent.id) == states.SUCCESS
        assert scratch.blpop("errback:join", timeout=TIMEOUT) is not None
        # The holder ran; the joined step never ran the body.
        starts = [e for e in scratch.lrange("log:f", 0, -1) if e.startswith(b"start:")]
        assert len(starts) == 1
        assert starts[0].endswith(holder.id.encode())


def test_a_refused_chord_member_counts_with_the_holders_result(life: Lifecycle, tmp_path: Path) -> None:
    """A chord header member refused under "join" gives the body the holder's result in its place."""
    app = life.app()
    double, total = app.tasks["life.double"], app.tasks["life.total"]
    with life.worker(tmp_path / "worker.log", concurrency=2):
        double.apply_async((2,), unique=60, countdown=1)
        result = chord(
            [double.s(1).set(unique=60), double.s(2).set(unique=60, on_duplicate="join"),
             double.s(3).set(unique=60)],
            total.s(),
        ).apply_async()
        assert result.get(timeout=TIMEOUT) == 2 + 4 + 6


def test_a_refused_group_member_joins_and_the_others_run(life: Lifecycle, tmp_path: Path) -> None:
    """A group member refused under "join" returns the holder's result under its own id."""
    app = life.app()
    double = app.tasks["life.double"]
    with life.worker(tmp_path / "worker.log", concurrency=2):
        holder = double.apply_async((2,), unique=60, countdown=1)
        result = group(
            double.s(1).set(unique=60), double.s(2).set(unique=60, on_duplicate="join")
        ).apply_async()
        assert result.get(timeout=TIMEOUT) == [2, 4]
        assert result.results[1].id != holder.id


def test_a_join_gives_up_at_the_locks_ttl(life: Lifecycle, tmp_path: Path) -> None:
    """A holder that has not finished within the joined call's TTL fails the join with the refusal."""
    app = life.app()
    double = app.tasks["life.double"]
    with life.worker(tmp_path / "worker.log"):
        holder = park(app, 2)
        result = chain(
            double.s(1).set(unique=60), double.s().set(unique=1, on_duplicate="join")
        ).apply_async()
        with pytest.raises(DuplicateTaskError) as info:
            result.get(timeout=TIMEOUT)
        assert info.value.task_id == holder.id
        holder.revoke()


def test_a_join_that_cannot_read_the_holders_result_fails_promptly(life: Lifecycle, tmp_path: Path) -> None:
    """With results ignored, "join" refuses as "existing" does: the chain fails at once, naming the holder."""
    app = life.app()
    double = app.tasks["life.double"]
    with life.worker(tmp_path / "worker.log"):
        holder = park(app, 2)
        result = chain(
            double.s(1).set(unique=60), double.s().set(unique=60, on_duplicate="join", ignore_result=True)
        ).apply_async()
        with pytest.raises(DuplicateTaskError) as info:
            result.get(timeout=TIMEOUT)
        assert info.value.task_id == holder.id
        holder.revoke()


def test_a_join_nothing_waits_on_returns_the_holder(life: Lifecycle, broker: redis.Redis) -> None:
    """A plain call refused under "join" gets the holder's AsyncResult and sends no follow-up."""
    app = life.app()
    holder = park(app, 2)
    queued = broker.llen(QUEUE)
    result = app.tasks["life.double"].apply_async((2,), unique=60, on_duplicate="join")
    assert result.id == holder.id
    assert broker.llen(QUEUE) == queued
    holder.revoke()


def test_a_refused_first_step_chord_body_and_callback_join(life: Lifecycle, tmp_path: Path) -> None:
    """A first step, a chord body and a frozen callback refused under "join" get the holder's result."""
    app = life.app()
    double, total = app.tasks["life.double"], app.tasks["life.total"]
    with life.worker(tmp_path / "worker.log", concurrency=2):
        double.apply_async((2,), unique=60, countdown=1)
        total.apply_async(([2, 4],), unique=60, countdown=1)
        first = chain(double.s(2).set(unique=60, on_duplicate="join"), double.s()).apply_async()
        body = chord([double.s(1), double.s(2)], total.s().set(unique=60, on_duplicate="join")).apply_async()
        callback = double.s().set(unique=60, on_duplicate="join")
        callback.freeze()
        parent = double.apply_async((1,), link=callback)
        assert first.get(timeout=TIMEOUT) == 8
        assert body.get(timeout=TIMEOUT) == 6
        assert parent.get(timeout=TIMEOUT) == 2
        assert app.AsyncResult(callback.id).get(timeout=TIMEOUT) == 4


def test_a_join_follows_the_call_that_replaced_its_holder(life: Lifecycle, tmp_path: Path) -> None:
    """A holder replaced by a debounce's later call is not the end: the join goes on with that call's."""
    app = life.app()
    double = app.tasks["life.double"]
    with life.worker(tmp_path / "worker.log"):
        double.apply_async((2,), unique=60, on_duplicate="replace", countdown=1.5)
        result = chain(double.s(2).set(unique=60, on_duplicate="join"), double.s()).apply_async()
        latest = double.apply_async((2,), unique=60, on_duplicate="replace", countdown=1.5)
        assert latest.get(timeout=TIMEOUT) == 4
        assert result.get(timeout=TIMEOUT) == 8


def test_a_holder_that_lets_go_without_a_result_fails_the_join_at_once(
    life: Lifecycle, tmp_path: Path
) -> None:
    """A holder whose result is ignored fails its join with JoinError once it lets go, not at the TTL."""
    app = life.app()
    double = app.tasks["life.double"]
    with life.worker(tmp_path / "worker.log"):
        holder = double.apply_async((2,), unique=60, ignore_result=True, countdown=0.5)
        result = chain(double.s(2).set(unique=60, on_duplicate="join"), double.s()).apply_async()
        with pytest.raises(JoinError) as info:
            result.get(timeout=TIMEOUT)
        assert info.value.task_id == holder.id


def test_a_join_is_routed_by_the_refused_calls_arguments(life: Lifecycle, broker: redis.Redis) -> None:
    """A router that reads the call's arguments sends the follow-up where the refused call would go."""

    def by_argument(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any) -> Any:
        return {"queue": f"shard-{args[0]}"} if name == "life.double" else None

    app = life.app(task_routes=[by_argument])
    double = app.tasks["life.double"]
    holder = double.apply_async((2,), unique=60, countdown=60)
    joined = double.apply_async((2,), unique=60, on_duplicate="join", task_id="chosen-2")
    assert joined.id == "chosen-2"
    assert broker.llen("shard-2") == 2
    holder.revoke()


def test_a_group_with_a_join_sends_on_the_groups_own_producer(life: Lifecycle) -> None:
    """With one pooled producer, which the group holds, a member's join goes out on it: the group returns."""
    app = life.app(broker_pool_limit=1)
    double = app.tasks["life.double"]
    holder = park(app, 2)
    sent: list[Any] = []
    thread = threading.Thread(
        daemon=True,
        target=lambda: sent.append(
            group(double.s(1).set(unique=60), double.s(2).set(unique=60, on_duplicate="join")).apply_async()
        ),
    )
    thread.start()
    thread.join(TIMEOUT)
    assert len(sent) == 1
    assert [r.id for r in sent[0].results][1] != holder.id
