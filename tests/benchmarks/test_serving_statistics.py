"""The serving benchmark's statistics on a synthetic timeline with known answers:
the interference ratio, the ITL tail (p99.9, max, gaps over the ITL SLO), goodput
and SLO attainment, and medians with their range over trials, where a goal is met
only when every trial meets it. Every expected number is worked out by hand below
(percentiles: numpy's linear interpolation, sorted[k] + f * (sorted[k+1] - sorted[k])
at position (n - 1) * q)."""

from __future__ import annotations

import pytest

from benchmarks.serving.client import RequestRecord
from benchmarks.serving.interference import interference_stats, prefill_intervals
from benchmarks.serving.metrics import Slo, compute_metrics
from benchmarks.serving.result import RunResult, trial_metrics
from benchmarks.serving.trials import Goal, Spread, check_goal

LONG = frozenset({0, 3})


def timeline() -> list[RequestRecord]:
    """Two long prompts, two short requests decoding around them, one failure.

    Prefill intervals (send -> first token): long 0 [1.0, 3.0], long 3 [6.0, 7.0].
    Short 1's gaps (ms), each at its end time:
        250 @0.35 out, 250 @0.6 out, 1500 @2.1 in, 500 @2.6 in, 200 @2.8 in,
        250 @3.05 out (after long 0's first token at 3.0)
    Short 2's gaps:
        100 @5.2 out, 800 @6.0 in (the interval's start counts), 1000 @7.0 in (so
        does its end), 100 @7.1 out
    Request 4 failed: its gaps count nowhere. The long requests' own gaps (100 ms
    each) count in ITL but not in the interference.
    """
    return [
        RequestRecord(0, 1.0, [3.0, 3.1], 3.1, 1024),
        RequestRecord(1, 0.0, [0.1, 0.35, 0.6, 2.1, 2.6, 2.8, 3.05], 3.05, 64),
        RequestRecord(2, 5.0, [5.1, 5.2, 6.0, 7.0, 7.1], 7.1, 64),
        RequestRecord(3, 6.0, [7.0, 7.1], 7.1, 1024),
        RequestRecord(4, 6.4, [6.5, 6.9], 6.9, 64, error="UNAVAILABLE: no decode worker"),
    ]


def test_prefill_intervals_are_send_to_first_token_of_the_long_requests() -> None:
    assert prefill_intervals(timeline(), LONG) == [(1.0, 3.0), (6.0, 7.0)]


def test_interference_ratio() -> None:
    stats = interference_stats(timeline(), LONG)
    # During: 1500, 500, 200, 800, 1000 -> sorted 200, 500, 800, 1000, 1500; p99 at
    # position 3.96: 1000 + 0.96 * 500 = 1480.
    # Outside: 250, 250, 250, 100, 100 -> sorted 100, 100, 250, 250, 250; p99 = 250.
    assert (stats.num_long_requests, stats.num_gaps_during_prefill) == (2, 5)
    assert stats.num_gaps_outside_prefill == 5
    assert stats.during_prefill_p99_ms == pytest.approx(1480.0)
    assert stats.outside_prefill_p99_ms == pytest.approx(250.0)
    # 1480 / 250
    assert stats.ratio == pytest.approx(5.92)


def test_no_long_request_means_no_interference() -> None:
    stats = interference_stats(timeline(), frozenset())
    assert (stats.num_long_requests, stats.num_gaps_during_prefill) == (0, 0)
    assert (stats.during_prefill_p99_ms, stats.ratio) == (None, None)


def test_itl_tail_and_the_fraction_over_the_itl_slo() -> None:
    metrics = compute_metrics(timeline(), 8.0, Slo(itl_ms=300), LONG)
    # The 12 gaps of the 4 successful requests, sorted:
    # 100, 100, 100, 100, 200, 250, 250, 250, 500, 800, 1000, 1500.
    itl = metrics.itl_ms
    assert itl.num_samples == 12
    assert itl.max == pytest.approx(1500.0)
    # p99.9 at position 11 * 0.999 = 10.989: 1000 + 0.989 * 500 = 1494.5
    assert itl.p999 == pytest.approx(1494.5)
    # p99 at 10.89: 1000 + 0.89 * 500 = 1445
    assert itl.p99 == pytest.approx(1445.0)
    # Over 300 ms: 500, 800, 1000, 1500 -> 4 of 12.
    assert metrics.itl_over_slo_fraction == pytest.approx(1 / 3)
    assert compute_metrics(timeline(), 8.0, Slo(ttft_ms=1)).itl_over_slo_fraction is None


@pytest.mark.parametrize(
    ("slo", "num_good"),
    [
        # Per request: long 0 TTFT 2000, p99 gap 100; short 1 TTFT 100, gaps sorted
        # 200, 250, 250, 250, 500, 1500, p99 at 4.95: 500 + 0.95 * 1000 = 1450; short 2
        # TTFT 100, gaps 100, 100, 800, 1000, p99 at 2.97: 800 + 0.97 * 200 = 994;
        # long 3 TTFT 1000, p99 gap 100; request 4 failed and never meets.
        # Long 0 misses TTFT, short 1 misses ITL; short 2 meets though its largest
        # gap (1000) is over 995: the SLO bounds each request's p99 gap, not its max.
        (Slo(ttft_ms=1500, itl_ms=995), 2),
        # Short 2's p99 994 > 990: only long 3 is left.
        (Slo(ttft_ms=1500, itl_ms=990), 1),
        # Without a TTFT bound long 0 meets too.
        (Slo(itl_ms=995), 3),
    ],
)
def test_goodput_and_slo_attainment(slo: Slo, num_good: int) -> None:
    metrics = compute_metrics(timeline(), 8.0, slo, LONG)
    assert metrics.num_good == num_good
    assert metrics.goodput == pytest.approx(num_good / 8.0)
    assert metrics.slo_attainment == pytest.approx(num_good / 5)  # failures count as misses


def test_median_and_range_over_trials() -> None:
    assert Spread.of([3.0, 1.0, 2.0]) == Spread((3.0, 1.0, 2.0), 2.0, 1.0, 3.0)
    # An even count: the mean of the two middle values.
    assert Spread.of([1.0, 4.0]) == Spread((1.0, 4.0), 2.5, 1.0, 4.0)
    # A trial without the value keeps its place but is not in the statistics.
    assert Spread.of([None, 2.0, 4.0]) == Spread((None, 2.0, 4.0), 3.0, 2.0, 4.0)
    assert Spread.of([None]) == Spread((None,), None, None, None)


TRIALS = [
    {
        "colocated": {"itl_ms.p99": 100.0, "interference.ratio": 3.0},
        "disaggregated": {"itl_ms.p99": 80.0, "interference.ratio": 1.1},
    },
    {
        "colocated": {"itl_ms.p99": 200.0, "interference.ratio": 2.5},
        "disaggregated": {"itl_ms.p99": 60.0, "interference.ratio": 1.3},
    },
    {
        "colocated": {"itl_ms.p99": 400.0, "interference.ratio": 4.0},
        "disaggregated": {"itl_ms.p99": 100.0, "interference.ratio": 1.0},
    },
]


def test_a_ratio_is_taken_within_each_trial_then_summarized() -> None:
    result = check_goal(Goal("itl_ms.p99", "disaggregated", "colocated", at_most=0.8), TRIALS)
    # 80/100 = 0.8, 60/200 = 0.3, 100/400 = 0.25: median 0.3 (the ratio of the
    # medians, 80/200 = 0.4, is not what is reported).
    assert result.spread == Spread((0.8, 0.3, 0.25), 0.3, 0.25, 0.8)
    assert (result.num_trials_met, result.is_met) == (3, True)


def test_a_goal_is_met_only_when_every_trial_meets_it() -> None:
    tighter = check_goal(Goal("itl_ms.p99", "disaggregated", "colocated", at_most=0.5), TRIALS)
    # The median (0.3) meets 0.5, but trial 1 (0.8) does not.
    assert (tighter.num_trials_met, tighter.is_met) == (2, False)
    interference = check_goal(Goal("interference.ratio", "disaggregated", at_most=1.2), TRIALS)
    # 1.1, 1.3, 1.0: the median 1.1 meets 1.2, trial 2 does not.
    assert interference.spread.median == 1.1
    assert (interference.num_trials_met, interference.is_met) == (2, False)
    at_least = check_goal(Goal("interference.ratio", "colocated", at_least=2.5), TRIALS)
    assert (at_least.num_trials_met, at_least.is_met) == (3, True)  # 2.5 itself meets
    reported = check_goal(Goal("interference.ratio", "colocated"), TRIALS)
    assert (reported.spread.median, reported.is_met) == (3.0, None)
    # A trial without the candidate's run has no value, and misses.
    missing = check_goal(Goal("itl_ms.p99", "conditional", "colocated", at_most=10), TRIALS)
    assert (missing.spread.values, missing.num_trials_met, missing.is_met) == (
        (None, None, None),
        0,
        False,
    )
    assert check_goal(Goal("itl_ms.p99", "colocated", at_most=1), []).is_met is False


def test_trials_of_real_metrics_feed_the_goals() -> None:
    slo = Slo(ttft_ms=1500, itl_ms=995)
    runs = [
        RunResult(name, {}, compute_metrics(timeline(), duration, slo, LONG), timeline(), trial)
        for trial, duration in enumerate((8.0, 4.0))
        for name in ("colocated", "disaggregated")
    ]
    trials = trial_metrics(runs)
    assert [sorted(t) for t in trials] == [["colocated", "disaggregated"]] * 2
    ratio = check_goal(Goal("interference.ratio", "disaggregated", at_most=1.2), trials)
    assert ratio.spread.median == pytest.approx(5.92)
    assert ratio.is_met is False
    # Goodput 2/8 and 2/4 req/s in the two trials, alike for both configurations:
    # a ratio of 1 in each.
    goodput = check_goal(Goal("goodput", "disaggregated", "colocated", at_least=1.0), trials)
    assert goodput.spread == Spread((1.0, 1.0), 1.0, 1.0, 1.0)
    assert goodput.is_met is True
    assert trials[1]["colocated"]["goodput"] == 0.5
