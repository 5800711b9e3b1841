"""The result document: runs, their metrics and the comparison, as JSON.

Schema (`schema_version` 1), all latencies in ms:

    {"schema_version": 1, "created": ISO-8601 UTC, "command": str,
     "machine": {"num_cpus": int, "load_avg": [1, 5, 15 min]},
     "workload": {"name": str, "num_requests": int, "params": {...}},
     "arrivals": {"rate": float | "inf", "burstiness": float, "seed": int},
     "max_concurrency": int | null,
     "slo": {"ttft_ms": float | null, "tpot_ms": ..., "e2e_ms": ...},
     "runs": [{"name": str, "config": {...}, "metrics": BenchMetrics,
               "requests": [{"index", "group", "prompt_tokens", "output_tokens",
                             "cached_prompt_tokens", "ttft_ms", "e2e_ms", "error"}]}],
     "comparison": null | {"metric": "itl_ms.p99", "baseline": str, "candidate": str,
                           "baseline_value", "candidate_value", "ratio": cand / base,
                           "difference": cand - base, "goal": str, "is_met": bool}}
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.serving.arrivals import ArrivalProcess
from benchmarks.serving.client import RequestRecord
from benchmarks.serving.metrics import BenchMetrics, RequestLatencies, Slo
from benchmarks.serving.workload import Workload

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class RunResult:
    """One configuration's run."""

    name: str
    """e.g. "target", "disaggregated", "colocated", "prefix-cache-on"."""
    config: dict[str, object]
    """How the cluster was laid out (cores, processes, flags), for the record."""
    metrics: BenchMetrics
    records: list[RequestRecord] = field(repr=False)


@dataclass(frozen=True)
class Comparison:
    """One metric of two runs from the same invocation, against a goal on either
    their ratio (candidate / baseline) or their difference (candidate - baseline)."""

    metric: str
    """A dotted path into BenchMetrics, e.g. "ttft_ms.p50"."""
    baseline: str
    candidate: str
    baseline_value: float | None
    candidate_value: float | None
    ratio: float | None
    """candidate / baseline (None when either is missing or the baseline is 0)."""
    difference: float | None
    """candidate - baseline (None when either is missing)."""
    goal: str
    """e.g. "ratio <= 0.5" or "difference <= 5"."""
    is_met: bool


def metric_value(metrics: BenchMetrics, path: str) -> float | None:
    """`metric_value(m, "ttft_ms.p50")` -> m.ttft_ms.p50."""
    value: object = metrics
    for name in path.split("."):
        value = getattr(value, name)
    assert value is None or isinstance(value, int | float), path
    return value


def compare(
    baseline: RunResult,
    candidate: RunResult,
    metric: str,
    *,
    max_ratio: float | None = None,
    max_difference: float | None = None,
) -> Comparison:
    """Compares `metric` of two runs; the goal is exactly one of
    `candidate / baseline <= max_ratio` and `candidate - baseline <= max_difference`."""
    if (max_ratio is None) == (max_difference is None):
        raise ValueError("give exactly one of max_ratio and max_difference")
    base = metric_value(baseline.metrics, metric)
    cand = metric_value(candidate.metrics, metric)
    ratio = cand / base if base and cand is not None else None
    difference = cand - base if base is not None and cand is not None else None
    if max_ratio is not None:
        goal, is_met = f"ratio <= {max_ratio:g}", ratio is not None and ratio <= max_ratio
    else:
        assert max_difference is not None
        goal = f"difference <= {max_difference:g}"
        is_met = difference is not None and difference <= max_difference
    return Comparison(
        metric, baseline.name, candidate.name, base, cand, ratio, difference, goal, is_met
    )


def _request_row(workload: Workload, record: RequestRecord) -> dict[str, object]:
    latencies = RequestLatencies.of(record) if record.is_success else None
    return {
        "index": record.index,
        "group": workload.requests[record.index].group,
        "prompt_tokens": record.num_prompt_tokens,
        "output_tokens": record.num_output_tokens,
        "cached_prompt_tokens": record.num_cached_prompt_tokens,
        "ttft_ms": latencies.ttft_ms if latencies else None,
        "e2e_ms": latencies.e2e_ms if latencies else None,
        "error": record.error,
    }


def result_document(
    workload: Workload,
    arrivals: ArrivalProcess,
    slo: Slo,
    runs: list[RunResult],
    comparison: Comparison | None = None,
    command: str = "",
    max_concurrency: int | None = None,
) -> dict[str, object]:
    """The JSON-ready result of a benchmark invocation."""
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": {"num_cpus": os.cpu_count(), "load_avg": list(os.getloadavg())},
        "workload": {
            "name": workload.name,
            "num_requests": len(workload.requests),
            "params": workload.params,
        },
        "arrivals": arrivals.describe(),
        "max_concurrency": max_concurrency,
        "slo": asdict(slo),
        "runs": [
            {
                "name": run.name,
                "config": run.config,
                "metrics": run.metrics.to_dict(),
                "requests": [_request_row(workload, r) for r in run.records],
            }
            for run in runs
        ],
        "comparison": asdict(comparison) if comparison else None,
    }


def write_json(document: dict[str, object], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
