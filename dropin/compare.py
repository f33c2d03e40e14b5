"""The two runs' outcomes side by side: the tests whose outcome differs, and the counts of each run."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: What a test that one run did not report at all is shown as.
NOT_RUN = "not run"
#: At most this many lines of a failure's traceback are printed (its last ones).
TRACEBACK_LINES = 40


@dataclass(frozen=True)
class RunRecord:
    """One run's outcomes, as ``dropin.plugin`` wrote them, with its wall time."""

    label: str
    #: nodeid -> outcomes; a test's, then a teardown error if it had one
    outcomes: dict[str, list[str]]
    #: nodeid and description of each subtest that did not pass -> outcomes
    subtests: dict[str, list[str]]
    failures: dict[str, str]
    tests_on_task_cls: int
    seconds: float

    @classmethod
    def load(cls, label: str, path: Path, seconds: float) -> RunRecord:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            label, data["outcomes"], data["subtests"], data["failures"], data["tests_on_task_cls"], seconds
        )

    def outcome(self, key: str) -> str:
        """A test's or a subtest's outcomes, as the table shows them."""
        if key in self.outcomes:
            return ", ".join(self.outcomes[key])
        if key in self.subtests:
            return ", ".join(self.subtests[key])
        # A subtest that did not fail passed, if its test ran.
        return "passed" if any(key.startswith(f"{test} ") for test in self.outcomes) else NOT_RUN

    def counts(self) -> Counter[str]:
        """Tests by outcome (an error in teardown apart), and the subtests that did not pass."""
        counts: Counter[str] = Counter()
        for outcomes in self.outcomes.values():
            counts.update(outcomes)
        for outcomes in self.subtests.values():
            counts.update(f"subtests {outcome}" for outcome in outcomes)
        return counts


def differing(plain: RunRecord, unique: RunRecord) -> list[str]:
    """The tests and subtests whose outcomes differ between the runs, in the plain run's order."""
    keys = dict.fromkeys([*plain.outcomes, *plain.subtests, *unique.outcomes, *unique.subtests])
    return [key for key in keys if plain.outcome(key) != unique.outcome(key)]


def report(plain: RunRecord, unique: RunRecord) -> str:
    """The text ``make dropin`` prints: the table of differing tests, their tracebacks, the counts."""
    keys = differing(plain, unique)
    lines = [_table(keys, plain, unique) if keys else "No test's outcome differs.", ""]
    for key in keys:
        for run in (plain, unique):
            failure = run.failures.get(key)
            if failure:
                lines += [f"--- {key} under {run.label}: {run.outcome(key)}", *_tail(failure), ""]
    lines.append(_counts(plain, unique))
    lines.append(
        f"Tests whose app built its Task from {unique.label}: "
        f"{unique.tests_on_task_cls:,} under {unique.label}, {plain.tests_on_task_cls:,} under {plain.label}."
    )
    lines.append("1 test differs." if len(keys) == 1 else f"{len(keys)} tests differ.")
    return "\n".join(lines)


def _table(keys: list[str], plain: RunRecord, unique: RunRecord) -> str:
    rows = [("test", plain.label, unique.label)] + [(k, plain.outcome(k), unique.outcome(k)) for k in keys]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    rows.insert(1, ("-" * widths[0], "-" * widths[1], "-" * widths[2]))
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _counts(plain: RunRecord, unique: RunRecord) -> str:
    plain_counts, unique_counts = plain.counts(), unique.counts()
    names = sorted(set(plain_counts) | set(unique_counts), key=_count_order)
    rows = [("", plain.label, unique.label)]
    rows += [(name, f"{plain_counts[name]:,}", f"{unique_counts[name]:,}") for name in names]
    rows.append(("tests", f"{len(plain.outcomes):,}", f"{len(unique.outcomes):,}"))
    rows.append(("time", f"{plain.seconds:.0f} s", f"{unique.seconds:.0f} s"))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    return "\n".join(
        "  ".join([row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2].rjust(widths[2])]) for row in rows
    )


def _count_order(name: str) -> tuple[bool, int, str]:
    usual = ["passed", "failed", "error", "skipped", "xfailed", "xpassed"]
    base = name.removeprefix("subtests ")
    return (name.startswith("subtests "), usual.index(base) if base in usual else len(usual), name)


def _tail(failure: str) -> list[str]:
    lines = failure.splitlines()
    if len(lines) <= TRACEBACK_LINES:
        return lines
    return [f"[... {len(lines) - TRACEBACK_LINES} lines above]", *lines[-TRACEBACK_LINES:]]
