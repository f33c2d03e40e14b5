"""Each defect the lock protocol once had, put back into its script, makes the model fail.

See tests/test_protocol_model.py and tests/protocol_model.py.
"""

from __future__ import annotations

import pytest
import redis

from celery_unique import execution
from celery_unique.lock import LockStore
from tests.test_protocol_model import model_client, run_model

__all__ = ["model_client"]


def _mutated(script: str, old: str, new: str) -> str:
    text = getattr(LockStore, script)
    assert old in text, f"{script} no longer holds {old!r}"
    return text.replace(old, new)


#: Defects the protocol once had, each put back into one script.
DEFECTS = {
    # A "done" marker that lives a fixed while instead of until the lock's
    # deadline: a copy held back or restored late runs an ended attempt again.
    "done marker shorter than its lock": (
        "_end", "END_SCRIPT", "state('d', n, k, ARGV[4], dl), dl, now, nil)",
        "state('d', n, k, ARGV[4], dl), dl, now, 15000)",
    ),
    # A discard (revoke, purge) that does not look for a running copy.
    "purge releases while a copy runs": (
        "_discard", "DISCARD_SCRIPT",
        "(f.nonce ~= ARGV[4] or newer(f, n, k) or (f.s == 'r' and same(f, n, k)))",
        "(f.nonce ~= ARGV[4] or newer(f, n, k))",
    ),
    # A take-over that trusts a state stored before the current attempt (a
    # retry(throw=False) stores SUCCESS while its retry waits).
    "take-over on a stale result": (
        "_take_over", "TAKE_OVER_SCRIPT", "(f.s == 'r' or f.s == 'q')", "(f.s == 'r')",
    ),
    # A take-over whose resend, after a lost reply, refuses its own caller.
    "resent take-over refuses itself": (
        "_take_over", "TAKE_OVER_SCRIPT", "if holder and holder == ARGV[2] then", "if false then",
    ),
    # An acquire of a chosen id whose resend refuses itself.
    "resent acquire refuses itself": (
        "_acquire", "ACQUIRE_SCRIPT", "if holder == ARGV[1] then", "if false then",
    ),
    # A begin whose resend holds its own copy back.
    "resent begin holds itself back": (
        "_begin", "BEGIN_SCRIPT", "f.owner ~= ARGV[5] and marker ~= ARGV[9]", "marker ~= ARGV[9]",
    ),
    # A chosen id enqueued again overwrites its former incarnation's "ended"
    # marker: a late copy of that incarnation runs again.
    "reused chosen id forgets its former incarnation": (
        "_acquire", "ACQUIRE_SCRIPT", "redis.call('SET', KEYS[3], old, 'PX', dl - now)", "",
    ),
    # An end that keeps the lock while the attempt that published it (a
    # retry) still holds its marker: the lock then stays until its TTL.
    "retry's end waits on the attempt that sent it": (
        "_end", "END_SCRIPT", "if f.s == 'r' and same(f, n, k) and f.owner ~= ARGV[5] then return 0 end",
        "if f.s == 'r' and not (same(f, n, k) and f.owner == ARGV[5]) then return 0 end",
    ),
    # An end that releases while another copy of the id runs.
    "end releases under a running copy": (
        "_end", "END_SCRIPT",
        "if f.s == 'r' and same(f, n, k) and f.owner ~= ARGV[5] then return 0 end", "",
    ),
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_model_finds_each_defect_put_back(model_client: redis.Redis, defect: str) -> None:
    """With one past defect put back into its script, the model finds an invariant broken."""
    attribute, script, old, new = DEFECTS[defect]
    mutated = {attribute: _mutated(script, old, new)}
    with pytest.raises(AssertionError):
        run_model(model_client, mutated, examples=2000, derandomize=True, shrink=False)


def test_model_finds_a_throttle_released_at_its_end(
    model_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With "expiry" ending like "success", the model finds the throttle's window broken."""
    settled = execution.settled
    monkeypatch.setattr(
        execution, "settled", lambda until, *, succeeded: settled("success" if until == "expiry" else until,
                                                                  succeeded=succeeded)
    )
    with pytest.raises(AssertionError, match="throttle"):
        run_model(model_client, {}, examples=2000, derandomize=True, shrink=False)
