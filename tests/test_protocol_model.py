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
