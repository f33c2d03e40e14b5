"""Each defect the lock protocol once had, put back into its script, makes the model fail.

See tests/test_protocol_model.py and tests/protocol_model.py. Each defect has
a scenario: the model's own rules, in an order that breaks one of its
invariants when the defect is back, with the copies each rule picks named by
number. Every scenario passes on the real scripts. The model's random search
(``make soak``) finds these defects too, but only after minutes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import pytest
import redis

from celery_unique import execution
from celery_unique.lock import LockStore
from tests.protocol_model import ProtocolMachine
from tests.test_protocol_model import model_client

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
        "_acquire", "ACQUIRE_SCRIPT", "if holder == id then", "if false then",
    ),
    # A begin whose resend holds its own copy back.
    "resent begin holds itself back": (
        "_begin", "BEGIN_SCRIPT", "f.owner ~= ARGV[5] and marker ~= ARGV[9]", "marker ~= ARGV[9]",
    ),
    # A chosen id enqueued again overwrites its former incarnation's "ended"
    # marker: a late copy of that incarnation runs again.
    "reused chosen id forgets its former incarnation": (
        "_acquire", "ACQUIRE_SCRIPT", "redis.call('SET', former, old, 'PX', dl - now)", "",
    ),
    # An end that keeps the lock while the attempt that published it (a
    # retry) still holds its marker: the lock then stays until its TTL.
    "retry's end waits on the attempt that sent it": (
        "_end", "END_SCRIPT", "if f.s == 'r' and same(f, n, k) and f.owner ~= ARGV[5] then return 0 end",
        "if f.s == 'r' and not (same(f, n, k) and f.owner == ARGV[5]) then return 0 end",
    ),
    # A retry that ran unmarked ends without an "ended" marker, though copies
    # of the marked attempt that published it may come back: they run again.
    "retry's end forgets the older attempt's copies": (
        "_end", "END_SCRIPT", "local copies = f and not older and f.s == 'q' and f.owner == 'c'",
        "local copies = false",
    ),
    # A take-over by a debounce's call that leaves its marker unreplaceable:
    # the next call of the debounce is refused instead of replacing it.
    "take-over forgets the debounce": (
        "_take_over", "TAKE_OVER_SCRIPT",
        "if ARGV[5] == '1' then mine = mine .. '|s' .. now .. '|' end", "",
    ),
    # A slot acquire that does not look for a slot its id holds first: a
    # chosen id enqueued again takes a second slot once an earlier one frees.
    "chosen id takes a second slot": (
        "_acquire_slot", "ACQUIRE_SLOT_SCRIPT",
        "if redis.call('GET', KEYS[(i - 1) * step + 1]) == ARGV[1] then", "if false then",
    ),
    # A slot take-over that does not look at the key's other slots: a
    # chosen id that another call put in one slot takes a second one over.
    "slot take-over ignores the other slots": (
        "_take_over", "TAKE_OVER_SCRIPT",
        "if redis.call('GET', KEYS[i]) == ARGV[2] then return ARGV[2] end", "",
    ),
    # An end that releases while another copy of the id runs.
    "end releases under a running copy": (
        "_end", "END_SCRIPT",
        "if f.s == 'r' and same(f, n, k) and f.owner ~= ARGV[5] then return 0 end", "",
    ),
    # A waiting call (queue_one) that takes the lock as it begins though
    # the holder still holds it: both run at once.
    "waiting call runs beside its holder": (
        "_begin", "BEGIN_SCRIPT", "if redis.call('GET', KEYS[1]) then return {'behind'} end", "",
    ),
    # A waiting call that gives way to a later one without being dropped:
    # both run, one after the other.
    "replaced waiting call still runs": (
        "_replace", "REPLACE_SCRIPT", "drop(KEYS[6], w, redis.call('PTTL', KEYS[5]))", "",
    ),
    # A waiting call that is revoked keeps its place: the place is held by
    # a call that will never run.
    "revoked waiting call keeps its place": (
        "_discard", "DISCARD_SCRIPT", "if KEYS[3] and redis.call('GET', KEYS[3]) == ARGV[1] then",
        "if false then",
    ),
    # A waiting call that begins once the lock is free, and runs without
    # taking it: a later call takes the free lock and runs beside it.
    "waiting call runs without the lock": (
        "_begin", "BEGIN_SCRIPT",
        "if dl > now then redis.call('SET', KEYS[1], ARGV[1], 'PX', dl - now) end", "",
    ),
}


class Pick:
    """Stands in for a rule's ``data``: each draw takes the copy with the next number."""

    def __init__(self, *numbers: int) -> None:
        self.numbers = list(numbers)

    def draw(self, strategy: Any) -> Any:
        number = self.numbers.pop(0)
        return next(each for each in strategy.elements if each.number == number)


class SlotPick:
    """Stands in for slot_take_over's ``data``: draws the finished slot with the given index."""

    def __init__(self, index: int) -> None:
        self.index = index

    def draw(self, strategy: Any) -> Any:
        return list(strategy.elements)[self.index]


Step = tuple[str, dict[str, Any]]

#: Scenarios, by defect: (rule, arguments) in order.
SCENARIOS: dict[str, Sequence[Step]] = {
    # A marked run succeeds; a copy of its message comes back later.
    "done marker shorter than its lock": (
        ("enqueue", {"chosen": None, "resend": False, "throttle": False}),
        ("redeliver", {"data": Pick(0)}),
        ("begin", {"data": Pick(0), "resend": False}),
        ("store_result", {"data": Pick(0), "state": "SUCCESS"}),
        ("end", {"data": Pick(0), "until": "success", "resend": False}),
        ("time_passes", {"seconds": 40}),
        ("begin", {"data": Pick(1), "resend": False}),
    ),
    # A marked run goes on while a copy of its message is purged.
    "purge releases while a copy runs": (
        ("enqueue", {"chosen": None, "resend": False, "throttle": False}),
        ("redeliver", {"data": Pick(0)}),
        ("begin", {"data": Pick(0), "resend": False}),
        ("revoke_or_purge", {"data": Pick(1), "purge": True}),
    ),
    # retry(throw=False) stores SUCCESS while the retry waits; a call comes.
    "take-over on a stale result": (
        ("enqueue", {"chosen": None, "resend": False, "throttle": False}),
        ("begin", {"data": Pick(0), "resend": False}),
        ("retry", {"data": Pick(0), "marked": False, "throw": False}),
        ("continued", {"data": Pick(0)}),
        ("holder_check", {"resend": False}),
    ),
    # A holder stored SUCCESS; a call takes its lock over, and the reply is lost.
    "resent take-over refuses itself": (
        ("enqueue", {"chosen": None, "resend": False, "throttle": False}),
        ("begin", {"data": Pick(0), "resend": False}),
        ("store_result", {"data": Pick(0), "state": "SUCCESS"}),
        ("holder_check", {"resend": True}),
    ),
    # A holder stored SUCCESS; a debounce's call takes its lock over, and
    # the next call of the debounce comes before that one begins.
    "take-over forgets the debounce": (
        ("enqueue", {"chosen": None, "resend": False, "throttle": False}),
        ("begin", {"data": Pick(0), "resend": False}),
        ("store_result", {"data": Pick(0), "state": "SUCCESS"}),
        ("holder_check", {"resend": False, "replaceable": True}),
        ("enqueue_replacing", {"resend": False, "throttle": False}),
    ),
    "resent acquire refuses itself": (
        ("enqueue", {"chosen": "chosen-1", "resend": True, "throttle": False}),
    ),
    # A redelivered message begins, and BEGIN's reply is lost.
    "resent begin holds itself back": (
        ("enqueue", {"chosen": None, "resend": False, "throttle": False}),
        ("redeliver", {"data": Pick(0)}),
        ("begin", {"data": Pick(0), "resend": True}),
    ),
    # A chosen id ends, is enqueued again, and a late copy of its first
    # incarnation begins.
    "reused chosen id forgets its former incarnation": (
        ("enqueue", {"chosen": "chosen-1", "resend": False, "throttle": False}),
        ("redeliver", {"data": Pick(1)}),
        ("begin", {"data": Pick(1), "resend": False}),
        ("store_result", {"data": Pick(1), "state": "SUCCESS"}),
        ("end", {"data": Pick(1), "until": "success", "resend": False}),
        ("enqueue", {"chosen": "chosen-1", "resend": False, "throttle": False}),
        ("begin", {"data": Pick(2), "resend": False}),
    ),
    # A marked run retries; its retry runs and succeeds before the parent says so.
    "retry's end waits on the attempt that sent it": (
        ("enqueue", {"chosen": None, "resend": False, "throttle": False}),
        ("redeliver", {"data": Pick(0)}),
        ("begin", {"data": Pick(0), "resend": False}),
        ("retry", {"data": Pick(0), "marked": False, "throw": False}),  # copy 2
        ("begin", {"data": Pick(2), "resend": False}),
        ("store_result", {"data": Pick(2), "state": "SUCCESS"}),
        ("end", {"data": Pick(2), "until": "success", "resend": False}),
        ("continued", {"data": Pick(0)}),
    ),
    # A marked attempt retries; a copy of it was held back meanwhile. The
    # retry runs unmarked and succeeds; the held-back copy comes back late.
    "retry's end forgets the older attempt's copies": (
        ("enqueue", {"chosen": None, "resend": False, "throttle": False}),
        ("redeliver", {"data": Pick(0)}),
        ("begin", {"data": Pick(0), "resend": False}),
        ("begin", {"data": Pick(1), "resend": False}),  # waits: held back as copy 2
        ("retry", {"data": Pick(0), "marked": False, "throw": True}),  # copy 3
        ("continued", {"data": Pick(0)}),
        ("begin", {"data": Pick(3), "resend": False}),
        ("store_result", {"data": Pick(3), "state": "SUCCESS"}),
        ("end", {"data": Pick(3), "until": "success", "resend": False}),
        ("begin", {"data": Pick(2), "resend": False}),
    ),
    # Under unique_limit=2, a generated call takes slot 1 and a chosen id
    # slot 2; the first ends, and the chosen id is enqueued again.
    "chosen id takes a second slot": (
        ("enqueue_limited", {"chosen": None, "resend": False, "throttle": False, "limit": 2}),
        ("enqueue_limited", {"chosen": "chosen-1", "resend": False, "throttle": False, "limit": 2}),
        ("begin", {"data": Pick(0), "resend": False}),
        ("store_result", {"data": Pick(0), "state": "SUCCESS"}),
        ("end", {"data": Pick(0), "until": "success", "resend": False}),
        ("enqueue_limited", {"chosen": "chosen-1", "resend": True, "throttle": False, "limit": 2}),
    ),
    # Under unique_limit=2, a generated call holds slot 1 and stores SUCCESS
    # before its end; a chosen id holds slot 2, and a call of the same id,
    # refused by both slots a moment before, takes slot 1 over.
    "slot take-over ignores the other slots": (
        ("enqueue_limited", {"chosen": None, "resend": False, "throttle": False, "limit": 2}),
        ("enqueue_limited", {"chosen": "chosen-1", "resend": False, "throttle": False, "limit": 2}),
        ("begin", {"data": Pick(0), "resend": False}),
        ("store_result", {"data": Pick(0), "state": "SUCCESS"}),
        ("slot_take_over", {"data": SlotPick(0), "chosen": "chosen-1", "limit": 2}),
    ),
    # A marked run's worker hangs until its marker expires; a copy runs; the
    # first copy's death is reported and its message comes back.
    "end releases under a running copy": (
        ("enqueue", {"chosen": None, "resend": False, "throttle": False}),
        ("redeliver", {"data": Pick(0)}),
        ("begin", {"data": Pick(0), "resend": False}),
        ("crash", {"data": Pick(0)}),
        ("time_passes", {"seconds": 40}),
        ("begin", {"data": Pick(1), "resend": False}),
        ("death_reported", {"data": Pick(0), "requeued": True}),  # copy 2
        ("begin", {"data": Pick(2), "resend": False}),
    ),
}

#: A debounce's holder (copy 1: its nonce took number 0) has begun when a
#: call comes under queue_one: it waits (copy 3).
_WAITING: Sequence[Step] = (
    ("enqueue_replacing", {"resend": False, "throttle": False, "queue_one": True}),
    ("begin", {"data": Pick(1), "resend": False}),
    ("enqueue_replacing", {"resend": False, "throttle": False, "queue_one": True}),
)
SCENARIOS.update({
    # The waiting call's copy begins while the holder runs.
    "waiting call runs beside its holder": (*_WAITING, ("begin", {"data": Pick(3), "resend": False})),
    # A second call (copy 5) waits in the first one's place; the first one's copy begins.
    "replaced waiting call still runs": (
        *_WAITING,
        ("enqueue_replacing", {"resend": True, "throttle": False, "queue_one": True}),
        ("begin", {"data": Pick(3), "resend": False}),
    ),
    "revoked waiting call keeps its place": (
        *_WAITING, ("revoke_or_purge", {"data": Pick(3), "purge": False}),
    ),
    # The holder ends; the waiting call's copy begins.
    "waiting call runs without the lock": (
        *_WAITING,
        ("store_result", {"data": Pick(1), "state": "SUCCESS"}),
        ("end", {"data": Pick(1), "until": "success", "resend": False}),
        ("begin", {"data": Pick(3), "resend": False}),
    ),
})

#: The throttle's window: a throttled call that succeeds.
THROTTLE: Sequence[Step] = (
    ("enqueue", {"chosen": None, "resend": False, "throttle": True}),
    ("begin", {"data": Pick(0), "resend": False}),
    ("store_result", {"data": Pick(0), "state": "SUCCESS"}),
    ("end", {"data": Pick(0), "until": "success", "resend": False}),
)


def play(client: redis.Redis, mutations: dict[str, str], steps: Sequence[Step]) -> None:
    """Run ``steps`` on the model, checking every invariant after each one."""
    machine = type("Machine", (ProtocolMachine,), {"client": client, "mutations": mutations})()
    checks = [getattr(machine, name) for name in ("no_release_while_a_copy_runs", "bounded_residue",
                                                  "throttle_window", "at_most_n_slots",
                                                  "one_call_runs_per_lock", "one_waiting_call_the_latest")]
    for rule, arguments in steps:
        getattr(machine, rule)(**copy.deepcopy(arguments))  # a Pick is used up as it draws
        for check in checks:
            check()


def test_every_defect_has_a_scenario() -> None:
    """Each defect is checked by a scenario of its own."""
    assert sorted(SCENARIOS) == sorted(DEFECTS)


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_model_finds_each_defect_put_back(model_client: redis.Redis, defect: str) -> None:
    """With one past defect put back into its script, the model finds an invariant broken."""
    attribute, script, old, new = DEFECTS[defect]
    mutated = {attribute: _mutated(script, old, new)}
    with pytest.raises(AssertionError):
        play(model_client, mutated, SCENARIOS[defect])


@pytest.mark.parametrize("scenario", [*sorted(SCENARIOS), "throttle"])
def test_each_scenario_holds_on_the_real_scripts(model_client: redis.Redis, scenario: str) -> None:
    """A defect's scenario breaks no invariant on the package's own scripts."""
    play(model_client, {}, THROTTLE if scenario == "throttle" else SCENARIOS[scenario])


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
        play(model_client, {}, THROTTLE)
