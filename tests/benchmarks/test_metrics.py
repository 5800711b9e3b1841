"""Metrics on hand-made timings: exact latencies, percentiles, throughput, goodput."""

from __future__ import annotations

import pytest

from benchmarks.serving.metrics import LatencyStats, Slo, compute_metrics
from tests.benchmarks.records import hand_made_records


def stats(latency: LatencyStats) -> tuple:
    return (latency.num_samples, latency.mean, latency.p50, latency.p90, latency.p99)


def approx_stats(num: int, mean: float, p50: float, p90: float, p99: float):
    return pytest.approx((num, mean, p50, p90, p99), abs=1e-6)


def test_latencies_and_percentiles_of_hand_made_records() -> None:
    metrics = compute_metrics(hand_made_records(), duration_s=4.0, slo=Slo())
    # TTFTs 50, 100, 300: p90 interpolates 80 % of the way from 100 to 300.
    assert stats(metrics.ttft_ms) == approx_stats(3, 150.0, 100.0, 260.0, 296.0)
    # TPOTs 100/3 and 50 (the one-token request has none).
    assert stats(metrics.tpot_ms) == approx_stats(2, 125 / 3, 125 / 3, 145 / 3, 299 / 6)
    # ITLs 0, 20, 30, 50, 100: the multi-token message's second token adds a 0.
    assert stats(metrics.itl_ms) == approx_stats(5, 40.0, 30.0, 80.0, 98.0)
    assert stats(metrics.e2e_ms) == approx_stats(3, 650 / 3, 200.0, 360.0, 396.0)


def test_counts_throughput_and_prefix_cache_hit_rate() -> None:
    metrics = compute_metrics(hand_made_records(), duration_s=4.0, slo=Slo())
    assert (metrics.num_requests, metrics.num_completed, metrics.num_failed) == (4, 3, 1)
    assert metrics.num_prompt_tokens == 40
    assert metrics.num_output_tokens == 8
    assert metrics.num_cached_prompt_tokens == 16
    assert metrics.prefix_cache_hit_rate == 0.4
    assert metrics.request_throughput == 0.75
    assert metrics.output_throughput == 2.0
    assert metrics.total_token_throughput == 12.0
    assert metrics.num_good is None and metrics.goodput is None


@pytest.mark.parametrize(
    ("slo", "num_good"),
    [
        # Request 0 meets both; 1 misses TTFT; 2 has no TPOT, so only TTFT counts.
        (Slo(ttft_ms=200, tpot_ms=40), 2),
        (Slo(tpot_ms=40), 2),
        (Slo(tpot_ms=30), 1),
        (Slo(ttft_ms=400, tpot_ms=60), 3),
        (Slo(e2e_ms=100), 1),
    ],
)
def test_goodput_counts_requests_meeting_every_slo(slo: Slo, num_good: int) -> None:
    metrics = compute_metrics(hand_made_records(), duration_s=4.0, slo=slo)
    assert metrics.num_good == num_good
    assert metrics.goodput == num_good / 4.0


def test_no_successful_request_gives_empty_stats() -> None:
    metrics = compute_metrics(hand_made_records()[3:], duration_s=1.0, slo=Slo(ttft_ms=1))
    assert metrics.ttft_ms == LatencyStats(0, None, None, None, None)
    assert metrics.prefix_cache_hit_rate is None
    assert metrics.num_good == 0


def test_slo_parse() -> None:
    assert Slo.parse("ttft_ms=500, tpot_ms=50") == Slo(ttft_ms=500.0, tpot_ms=50.0)
    assert Slo.parse("") == Slo()
    assert Slo.parse("").is_empty and not Slo(e2e_ms=1).is_empty


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ttfb_ms=5", "NAME one of ttft_ms, tpot_ms, e2e_ms, itl_ms"),
        ("ttft_ms", "expected NAME=MS"),
        ("ttft_ms=fast", "'fast' is not a number"),
        ("tpot_ms=0", "must be > 0"),
    ],
)
def test_slo_parse_refuses_bad_text(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Slo.parse(text)
