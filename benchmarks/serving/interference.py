"""Interference: how much long prompts' prefills slow the short requests' decoding.

Computed from the request records' timestamps alone (client-side `perf_counter`
seconds), so it measures the same thing on every configuration:

- **Long and short requests.** The long requests are the ones the caller names
  (the mixed workload's group "long"); every other successful request is short.
  Without a long request there is nothing to measure and every field is empty.
- **Prefill interval.** A long request's prefill interval is the closed interval
  [send time, first-token time]: from the moment the client sent it until its
  first token arrived, wherever the prompt was computed and including any wait
  in a queue before it. A long request that got no token has none.
- **A short request's gaps.** Gap i of a short request is `t[i] - t[i-1]`, for its
  tokens' arrival times t, i >= 1. The gap is *during a prefill* when its end, the
  arrival time t[i], lies inside any long request's prefill interval (bounds
  included), and *outside* otherwise. The start of the gap plays no part.
- **Interference ratio.** p99 of the gaps during a prefill over p99 of the gaps
  outside (numpy's linear percentile). 1 means a long prefill costs the short
  requests nothing at the tail; None when either set is empty or the outside p99
  is 0.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from benchmarks.serving.client import RequestRecord

Interval = tuple[float, float]
"""[start, end] in perf_counter seconds, bounds included."""


@dataclass(frozen=True)
class InterferenceStats:
    """The short requests' inter-token gaps split by whether a long prompt was
    being prefilled when each ended."""

    num_long_requests: int
    """Long requests with a prefill interval (they got a first token)."""
    num_gaps_during_prefill: int
    num_gaps_outside_prefill: int
    during_prefill_p99_ms: float | None
    outside_prefill_p99_ms: float | None
    ratio: float | None
    """during_prefill_p99_ms / outside_prefill_p99_ms."""


def prefill_intervals(
    records: list[RequestRecord], long_indices: Collection[int]
) -> list[Interval]:
    """[send time, first-token time] of every long request that got a token."""
    return [
        (r.send_time, r.token_times[0])
        for r in records
        if r.index in long_indices and r.token_times
    ]


def is_during(time: float, intervals: list[Interval]) -> bool:
    return any(start <= time <= end for start, end in intervals)


def split_short_gaps(
    records: list[RequestRecord], long_indices: Collection[int], intervals: list[Interval]
) -> tuple[list[float], list[float]]:
    """(gaps during a prefill, gaps outside) of the successful short requests, in ms."""
    during, outside = [], []
    for record in records:
        if record.index in long_indices or not record.is_success:
            continue
        for start, end in itertools.pairwise(record.token_times):
            (during if is_during(end, intervals) else outside).append((end - start) * 1e3)
    return during, outside


def _p99(samples_ms: list[float]) -> float | None:
    return float(np.percentile(samples_ms, 99)) if samples_ms else None


def interference_stats(
    records: list[RequestRecord], long_indices: Collection[int]
) -> InterferenceStats:
    """The interference of one run (see the module docstring)."""
    intervals = prefill_intervals(records, long_indices)
    during, outside = split_short_gaps(records, long_indices, intervals) if intervals else ([], [])
    during_p99, outside_p99 = _p99(during), _p99(outside)
    ratio = during_p99 / outside_p99 if during_p99 is not None and outside_p99 else None
    return InterferenceStats(
        num_long_requests=len(intervals),
        num_gaps_during_prefill=len(during),
        num_gaps_outside_prefill=len(outside),
        during_prefill_p99_ms=during_p99,
        outside_prefill_p99_ms=outside_p99,
        ratio=ratio,
    )
