"""`--sweep-rate`: the ladder, when a configuration stops climbing, the highest rate
meeting the SLO per trial, and the goal on its ratio to the baseline's."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.serving.metrics import Slo, compute_metrics
from benchmarks.serving.report import format_sweep
from benchmarks.serving.result import RunResult
from benchmarks.serving.sweep import (
    RateLadder,
    has_stopped_growing,
    highest_rate_meeting,
    summarize_sweep,
)
from benchmarks.serving.trials import Spread
from tests.benchmarks.records import hand_made_records


def test_ladders() -> None:
    assert RateLadder.parse("0.1,0.2,0.4").rates == (0.1, 0.2, 0.4)
    assert RateLadder.parse("0.05x1.5", max_steps=4).rates == (0.05, 0.075, 0.1125, 0.16875)
    assert len(RateLadder.parse("1x2").rates) == 8


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0.2,0.1", "sweep rates must increase"),
        ("0,0.1", "must be finite and > 0"),
        ("fast", "expected RATE,RATE,... or STARTxFACTOR"),
        ("0.1x1", "the factor must be > 1"),
    ],
)
def test_bad_ladders_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RateLadder.parse(text)


def test_goodput_stops_growing_when_it_is_no_higher_than_before() -> None:
    assert not has_stopped_growing([0.1])
    assert not has_stopped_growing([0.1, 0.2])
    assert has_stopped_growing([0.1, 0.2, 0.2])  # equal is not growth
    assert has_stopped_growing([0.1, 0.3, 0.2])
    assert not has_stopped_growing([None, 0.1])  # a missing goodput counts as 0
    assert has_stopped_growing([0.1, None])


def test_the_highest_rate_is_the_end_of_the_prefix_meeting_90_percent() -> None:
    rates = (0.1, 0.2, 0.4, 0.8)
    # 0.4 misses; 0.8 meeting again after a miss does not count.
    assert highest_rate_meeting(rates, [1.0, 0.95, 0.85, 0.92]) == 0.2
    assert highest_rate_meeting(rates, [1.0, 0.9, 0.9, 0.9]) == 0.8  # 90% itself meets
    assert highest_rate_meeting(rates, [0.5, 1.0, 1.0, 1.0]) is None
    assert highest_rate_meeting(rates[:2], [1.0, None]) == 0.1


def run(name: str, trial: int, goodput: float, slo_attainment: float) -> RunResult:
    metrics = compute_metrics(hand_made_records(), 4.0, Slo(ttft_ms=1))
    metrics = dataclasses.replace(metrics, goodput=goodput, slo_attainment=slo_attainment)
    return RunResult(name, {}, metrics, [], trial)


def test_summary_highest_rates_and_the_goal_per_trial() -> None:
    # Colocated stopped after 0.2 (goodput no longer growing), disaggregated ran
    # on to 0.4. (goodput, attainment) in trial 0 / trial 1:
    #   colocated      0.1: (0.1, 1.0) / (0.08, 0.95)   0.2: (0.16, 0.8) / (0.18, 0.9)
    #   disaggregated  0.1: (0.1, 1.0) / (0.1, 1.0)     0.2: (0.2, 1.0) / (0.19, 0.95)
    #                  0.4: (0.37, 0.92) / (0.34, 0.85)
    runs_by_rate = {
        0.1: [
            run("colocated", 0, 0.1, 1.0),
            run("disaggregated", 0, 0.1, 1.0),
            run("colocated", 1, 0.08, 0.95),
            run("disaggregated", 1, 0.1, 1.0),
        ],
        0.2: [
            run("colocated", 0, 0.16, 0.8),
            run("disaggregated", 0, 0.2, 1.0),
            run("colocated", 1, 0.18, 0.9),
            run("disaggregated", 1, 0.19, 0.95),
        ],
        0.4: [run("disaggregated", 0, 0.37, 0.92), run("disaggregated", 1, 0.34, 0.85)],
    }
    names = ["colocated", "disaggregated"]
    sweep = summarize_sweep((0.1, 0.2, 0.4, 0.8), runs_by_rate, names, 2, 1.5)
    # Colocated: trial 0 misses at 0.2 -> 0.1; trial 1 meets (0.9) at 0.2 -> 0.2.
    assert sweep.highest_rates["colocated"] == Spread((0.1, 0.2), pytest.approx(0.15), 0.1, 0.2)
    # Disaggregated: trial 0 meets up to 0.4; trial 1 misses at 0.4 -> 0.2.
    assert sweep.highest_rates["disaggregated"] == Spread((0.4, 0.2), pytest.approx(0.3), 0.2, 0.4)
    # Each still met the SLO at the last rate it ran, in one trial.
    assert sweep.is_lower_bound == {"colocated": True, "disaggregated": True}
    (goal,) = sweep.goals
    # Per trial: 0.4 / 0.1 = 4 meets 1.5, 0.2 / 0.2 = 1 does not.
    assert goal.goal.describe() == "highest_rate_meeting_slo disaggregated / colocated >= 1.5"
    assert goal.spread.values == (4.0, 1.0)
    assert (goal.spread.median, goal.num_trials_met, goal.is_met) == (2.5, 1, False)
    assert [p.rate for p in sweep.points if p.name == "colocated"] == [0.1, 0.2]
    colocated_01 = next(p for p in sweep.points if (p.name, p.rate) == ("colocated", 0.1))
    assert colocated_01.goodput == Spread((0.1, 0.08), pytest.approx(0.09), 0.08, 0.1)
    lines = format_sweep(sweep).splitlines()
    assert lines[0] == "sweep: goodput (req/s) | SLO attainment at each rate"
    assert lines[3].startswith("0.1 ")
    assert "0.090 [0.080–0.100] | 97.5% [95.0%–100.0%]" in lines[3]
    assert lines[5].split()[:2] == ["0.4", "-"]  # colocated did not run 0.4
    assert "  colocated: 0.150 [0.100–0.200] (a lower bound: still met at the last rate run)" in (
        lines
    )
    assert lines[-1] == (
        "highest_rate_meeting_slo disaggregated / colocated: 2.500 [1.000–4.000] over 2 "
        "trials (goal >= 1.5: met in 1/2 trials: MISSED)"
    )
