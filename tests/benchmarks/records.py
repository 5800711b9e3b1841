"""Hand-made request records with round timings, shared by the metric and result tests."""

from __future__ import annotations

from benchmarks.serving.client import RequestRecord


def hand_made_records() -> list[RequestRecord]:
    """Three successes and one failure; the expected metrics are worked out in
    test_metrics.py."""
    return [
        # TTFT 100, E2E 200, TPOT 100/3, ITLs 20, 30, 50.
        RequestRecord(0, 0.0, [0.1, 0.12, 0.15, 0.2], 0.2, 10, 0),
        # Two tokens in one message: TTFT 300, E2E 400, TPOT 50, ITLs 0, 100.
        RequestRecord(1, 1.0, [1.3, 1.3, 1.4], 1.4, 20, 16),
        # One token: TTFT 50, E2E 50, no TPOT, no ITL.
        RequestRecord(2, 2.0, [2.05], 2.05, 10, 0),
        RequestRecord(3, 3.0, [], 3.1, 0, 0, error="UNAVAILABLE: no decode worker"),
    ]
