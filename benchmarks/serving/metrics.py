"""Serving metrics from request records, in `vllm bench serve`'s definitions.

Per successful request (times in ms):
- TTFT: first token's arrival minus the send time.
- E2E: last message's arrival minus the send time.
- TPOT: (E2E - TTFT) / (output tokens - 1); undefined for one-token outputs.
- ITL: every gap between successive tokens of a request (all requests pooled).
Percentiles interpolate linearly between order statistics (numpy's default); each
latency also has its p99.9 and its maximum, where interference shows first.

SLOs (`Slo`) and goodput, DistServe's definitions: a request meets the SLO when it
succeeded and meets every objective given: TTFT, TPOT, E2E, and for `itl_ms` the
99th percentile of its own inter-token gaps. A one-token request has no TPOT or
gap and meets those objectives. Goodput is the number of requests meeting the SLO
per second of the run; SLO attainment is their fraction of all requests sent
(failures count as misses). The fraction of gaps over the ITL SLO pools every
request's gaps, like ITL. Interference (`interference.py`) splits the short
requests' gaps by whether a long prompt was being prefilled. The prefix-cache hit
rate is sum(cached prompt tokens) / sum(prompt tokens) over successful requests.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from dataclasses import asdict, dataclass

import numpy as np

from benchmarks.serving.client import RequestRecord
from benchmarks.serving.interference import InterferenceStats, interference_stats

PERCENTILES = (50, 90, 99, 99.9)


@dataclass(frozen=True)
class LatencyStats:
    """Summary of one latency's samples, in milliseconds (None when no samples)."""

    num_samples: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    p999: float | None = None
    """The 99.9th percentile."""
    max: float | None = None

    @classmethod
    def of(cls, samples_ms: list[float]) -> LatencyStats:
        if not samples_ms:
            return cls(0, None, None, None, None, None, None)
        values = np.asarray(samples_ms, dtype=np.float64)
        p50, p90, p99, p999 = (float(np.percentile(values, q)) for q in PERCENTILES)
        return cls(len(values), float(values.mean()), p50, p90, p99, p999, float(values.max()))


@dataclass(frozen=True)
class Slo:
    """Service-level objectives for goodput; None means no objective."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None
    itl_ms: float | None = None
    """Bound on the 99th percentile of each request's own inter-token gaps."""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and not value > 0:
                raise ValueError(f"SLO {name} must be > 0, got {value}")

    @classmethod
    def parse(cls, text: str) -> Slo:
        """`"ttft_ms=500,tpot_ms=50"` -> Slo(ttft_ms=500, tpot_ms=50)."""
        fields: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, sep, value = item.partition("=")
            if not sep or name not in cls.__dataclass_fields__:
                known = ", ".join(cls.__dataclass_fields__)
                raise ValueError(f"bad SLO {item!r}: expected NAME=MS with NAME one of {known}")
            try:
                fields[name] = float(value)
            except ValueError:
                raise ValueError(f"bad SLO {item!r}: {value!r} is not a number") from None
        return cls(**fields)

    @property
    def is_empty(self) -> bool:
        return all(value is None for value in asdict(self).values())


@dataclass(frozen=True)
class RequestLatencies:
    """One successful request's latencies, in ms."""

    ttft_ms: float
    e2e_ms: float
    tpot_ms: float | None
    itls_ms: list[float]

    @property
    def itl_p99_ms(self) -> float | None:
        """The 99th percentile of this request's gaps (None with one token)."""
        return float(np.percentile(self.itls_ms, 99)) if self.itls_ms else None

    @classmethod
    def of(cls, record: RequestRecord) -> RequestLatencies:
        assert record.is_success and record.end_time is not None
        times = record.token_times
        ttft = (times[0] - record.send_time) * 1e3
        e2e = (record.end_time - record.send_time) * 1e3
        tpot = (e2e - ttft) / (len(times) - 1) if len(times) > 1 else None
        itls = [(b - a) * 1e3 for a, b in itertools.pairwise(times)]
        return cls(ttft, e2e, tpot, itls)

    def meets(self, slo: Slo) -> bool:
        return (
            (slo.ttft_ms is None or self.ttft_ms <= slo.ttft_ms)
            and (slo.tpot_ms is None or self.tpot_ms is None or self.tpot_ms <= slo.tpot_ms)
            and (slo.e2e_ms is None or self.e2e_ms <= slo.e2e_ms)
            and (slo.itl_ms is None or not self.itls_ms or self.itl_p99_ms <= slo.itl_ms)
        )


@dataclass(frozen=True)
class BenchMetrics:
    """Everything a run reports."""

    num_requests: int
    num_completed: int
    num_failed: int
    duration_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_prompt_tokens: int
    request_throughput: float
    """Completed requests per second."""
    output_throughput: float
    """Generated tokens per second."""
    total_token_throughput: float
    """Prompt plus generated tokens per second."""
    prefix_cache_hit_rate: float | None
    num_good: int | None
    """Requests that met every SLO (None without SLOs)."""
    goodput: float | None
    """num_good per second."""
    slo_attainment: float | None
    """num_good / num_requests (None without SLOs)."""
    itl_over_slo_fraction: float | None
    """Gaps longer than the ITL SLO over all gaps (None without `itl_ms` or gaps)."""
    ttft_ms: LatencyStats
    tpot_ms: LatencyStats
    itl_ms: LatencyStats
    e2e_ms: LatencyStats
    interference: InterferenceStats

    def to_dict(self) -> dict:
        return asdict(self)


def compute_metrics(
    records: list[RequestRecord],
    duration_s: float,
    slo: Slo,
    long_indices: Collection[int] = (),
) -> BenchMetrics:
    """The metrics of one run; `duration_s` is the run's wall time, `long_indices`
    the workload positions of the long requests (for the interference)."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    done = [r for r in records if r.is_success]
    latencies = [RequestLatencies.of(r) for r in done]
    num_prompt = sum(r.num_prompt_tokens for r in done)
    num_output = sum(r.num_output_tokens for r in done)
    num_cached = sum(r.num_cached_prompt_tokens for r in done)
    num_good = None if slo.is_empty else sum(lat.meets(slo) for lat in latencies)
    itls = [itl for lat in latencies for itl in lat.itls_ms]
    itl_over_slo_fraction = (
        sum(itl > slo.itl_ms for itl in itls) / len(itls)
        if slo.itl_ms is not None and itls
        else None
    )
    return BenchMetrics(
        num_requests=len(records),
        num_completed=len(done),
        num_failed=len(records) - len(done),
        duration_s=duration_s,
        num_prompt_tokens=num_prompt,
        num_output_tokens=num_output,
        num_cached_prompt_tokens=num_cached,
        request_throughput=len(done) / duration_s,
        output_throughput=num_output / duration_s,
        total_token_throughput=(num_prompt + num_output) / duration_s,
        prefix_cache_hit_rate=num_cached / num_prompt if num_prompt else None,
        num_good=num_good,
        goodput=None if num_good is None else num_good / duration_s,
        slo_attainment=None if num_good is None or not records else num_good / len(records),
        itl_over_slo_fraction=itl_over_slo_fraction,
        ttft_ms=LatencyStats.of([lat.ttft_ms for lat in latencies]),
        tpot_ms=LatencyStats.of([lat.tpot_ms for lat in latencies if lat.tpot_ms is not None]),
        itl_ms=LatencyStats.of(itls),
        e2e_ms=LatencyStats.of([lat.e2e_ms for lat in latencies]),
        interference=interference_stats(records, long_indices),
    )
