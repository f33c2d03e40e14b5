"""issued_at: when a task id celery_unique made was issued, and None for any other id."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone

import pytest
from kombu.utils.uuid import uuid as kombu_uuid

from celery_unique.ids import CLOCK_SKEW, issued_at, new_task_id


def _uuid7_at(ms: int) -> str:
    """A version 7 UUID whose time is ``ms`` (Unix ms), its random bits zero."""
    return str(uuid.UUID(int=ms << 80 | 0x7 << 76 | 0b10 << 62))


def test_issued_at_reads_the_time_of_a_new_id() -> None:
    """issued_at() of a new id is the millisecond it was made, in UTC."""
    before = time.time_ns() // 1_000_000
    task_id = new_task_id()
    after = time.time_ns() // 1_000_000
    when = issued_at(task_id)
    assert when is not None
    assert when.tzinfo == timezone.utc
    assert before <= round(when.timestamp() * 1000) <= after


def test_issued_at_of_a_known_time() -> None:
    """issued_at() gives the exact time written in a version 7 id, any case of its hex digits."""
    ms = 1_700_000_000_123
    expected = datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=timezone.utc)
    assert issued_at(_uuid7_at(ms)) == expected
    assert issued_at(_uuid7_at(ms).upper()) == expected


@pytest.mark.parametrize(
    "task_id",
    [
        pytest.param(kombu_uuid(), id="celery-uuid4"),
        pytest.param(str(uuid.uuid1()), id="uuid1"),
        pytest.param("report-42", id="caller-chosen"),
        pytest.param("", id="empty"),
        pytest.param(_uuid7_at(1_700_000_000_123).replace("-", ""), id="no-hyphens"),
        pytest.param("01890a5d-ac96-774b-bcce-b302099a8057 ", id="trailing-space"),
        pytest.param("01890a5d-ac96-774b-7cce-b302099a8057", id="wrong-variant"),
        pytest.param(123, id="not-a-string"),
    ],
)
def test_issued_at_is_none_for_ids_without_a_time(task_id: object) -> None:
    """Ids that are not version 7 UUIDs (Celery's uuid4, a caller's own) tell no time."""
    assert issued_at(task_id) is None  # type: ignore[arg-type]


def test_issued_at_refuses_a_time_in_the_future() -> None:
    """A version 7 id more than CLOCK_SKEW ahead of the clock tells no time; one within it does."""
    now = 1_800_000_000.0
    ahead_ms = int((now + CLOCK_SKEW) * 1000)
    assert issued_at(_uuid7_at(ahead_ms + 1), now=now) is None
    within = issued_at(_uuid7_at(ahead_ms - 1000), now=now)
    assert within is not None
    assert within.timestamp() == pytest.approx(now + CLOCK_SKEW - 1)
    far = _uuid7_at(int(time.time() * 1000) + 3_600_000)  # an hour ahead of this clock
    assert issued_at(far) is None
