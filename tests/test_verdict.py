"""scripts/verdict.py: how every benchmark says whether it met its targets.

A benchmark's exit status is what CI reads, so a missed target must both
say MISSED with the figure measured and make exit_status non-zero.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from verdict import Target, exit_status  # noqa: E402


def test_a_missed_target_says_missed_with_its_figure_and_fails() -> None:
    slow = Target("time ratio", 1.37, "<=", 1.25, "x")
    assert not slow.met
    assert slow.line() == "time ratio 1.37x (target <= 1.25x): MISSED"
    assert slow.as_json()["met"] is False and slow.as_json()["measured"] == 1.37
    assert exit_status([slow]) == 1


def test_a_met_target_says_met_and_passes() -> None:
    fast = Target("time ratio", 1.12, "<=", 1.25, "x")
    assert fast.line() == "time ratio 1.12x (target <= 1.25x): met"
    assert exit_status([fast]) == 0


def test_one_miss_among_many_fails_the_benchmark() -> None:
    targets = [Target("accuracy", 0.91, ">=", 0.9), Target("rounds/s", 2.0, ">", 2.0)]
    assert [t.met for t in targets] == [True, False]   # ">" is strict at the limit
    assert exit_status(targets) == 1
    assert exit_status(targets[:1]) == 0


def test_an_unknown_comparison_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown comparison '=='"):
        Target("x", 1.0, "==", 1.0)
