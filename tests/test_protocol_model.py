"""The lock protocol's invariants hold under a model of every moving part, on the real scripts.

See tests/protocol_model.py for the model and docs/protocol.md for the
invariants. A fixed seed keeps ``make test`` repeatable; ``make soak`` runs
the same machine for much longer with fresh seeds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from celery_unique.lock import LockStore
from celery_unique.testing import RedisServer
from tests.protocol_model import ProtocolMachine

MODEL_DB = 9
SOAK = int(os.environ.get("PROTOCOL_SOAK_EXAMPLES", "0"))


@pytest.fixture
def model_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client(MODEL_DB)
    yield client
    client.flushdb()


def run_model(
    client: redis.Redis, mutations: dict[str, str], examples: int, derandomize: bool, shrink: bool = True
) -> None:
    machine = type("Machine", (ProtocolMachine,), {"client": client, "mutations": mutations})
    phases = tuple(Phase) if shrink else (Phase.explicit, Phase.reuse, Phase.generate)
    run_state_machine_as_test(
        machine,
        settings=settings(
            phases=phases,
            max_examples=examples,
            stateful_step_count=40,
            deadline=None,
            derandomize=derandomize,
            database=None,
            suppress_health_check=list(HealthCheck),
            print_blob=False,
        ),
    )


def test_protocol_invariants_hold(model_client: redis.Redis) -> None:
    """Every invariant of docs/protocol.md holds after every step of many random runs."""
    run_model(model_client, {}, examples=SOAK or 150, derandomize=not SOAK)


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
        "_discard", "DISCARD_SCRIPT", "(f.nonce ~= ARGV[4] or f.s == 'r' or newer(f, n, k))",
        "(f.nonce ~= ARGV[4] or newer(f, n, k))",
    ),
    # A take-over that trusts a state stored before the current attempt (a
    # retry(throw=False) stores SUCCESS while its retry waits).
    "take-over on a stale result": (
        "_take_over", "TAKE_OVER_SCRIPT", "(f.s == 'q' or (f.s == 'r'", "(false or (f.s == 'r'",
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
    # An end that releases while another copy of the id runs.
    "end releases under a running copy": (
        "_end", "END_SCRIPT",
        "if f.s == 'r' and not (same(f, n, k) and f.owner == ARGV[5]) then return 0 end", "",
    ),
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_model_finds_each_defect_put_back(model_client: redis.Redis, defect: str) -> None:
    """With one past defect put back into its script, the model finds an invariant broken."""
    attribute, script, old, new = DEFECTS[defect]
    mutated = {attribute: _mutated(script, old, new)}
    with pytest.raises(AssertionError):
        run_model(model_client, mutated, examples=1500, derandomize=True, shrink=False)
