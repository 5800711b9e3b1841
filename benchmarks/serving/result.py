"""The result document: runs, their metrics, the trials' summary and the goals, as JSON.

Schema (`schema_version` 2), all latencies in ms, times in s:

    {"schema_version": 2, "created": ISO-8601 UTC, "command": str,
     "machine": {"num_cpus": int, "load_avg": [1, 5, 15 min]},
     "workload": {"name": str, "num_requests": int, "params": {...}},
     "arrivals": {"rate": float | "inf", "burstiness": float, "seed": int},
     "max_concurrency": int | null,
     "slo": {"ttft_ms": float | null, "tpot_ms": ..., "e2e_ms": ..., "itl_ms": ...},
     "num_trials": int,
     "runs": [{"name": str, "trial": int, "config": {...},
               "load_avg_before": [1, 5, 15 min] | null, "load_avg_after": ...,
               "metrics": BenchMetrics,
               "requests": [{"index", "group", "prompt_tokens", "output_tokens",
                             "cached_prompt_tokens", "ttft_ms", "e2e_ms", "error",
                             "send_s", "token_times_s"}]}],
     "summary": {run name: {metric path: Spread}},
     "goals": [{"goal": Goal, "description": str, "spread": Spread,
                "num_trials_met": int, "is_met": bool | null}],
     "sweep": null | RateSweep (sweep.py)}

A Spread is {"values": [per trial], "median", "min", "max"} (trials.py). Request
times are seconds after the run's first send: `send_s` and every token's arrival,
so the interference can be recomputed from the file.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.serving.arrivals import ArrivalProcess
from benchmarks.serving.client import RequestRecord
from benchmarks.serving.metrics import BenchMetrics, RequestLatencies, Slo
from benchmarks.serving.trials import GoalResult, TrialMetrics, flat_metrics, metric_spreads
from benchmarks.serving.workload import Workload

SCHEMA_VERSION = 2

LoadAverage = tuple[float, float, float]
"""os.getloadavg(): the 1, 5 and 15 minute load averages."""


@dataclass(frozen=True)
class RunResult:
    """One configuration's run."""

    name: str
    """e.g. "target", "disaggregated", "colocated", "prefix-cache-on"."""
    config: dict[str, object]
    """How the cluster was laid out (cores, processes, flags), for the record."""
    metrics: BenchMetrics
    records: list[RequestRecord] = field(repr=False)
    trial: int = 0
    """Which trial of its comparison (0-based)."""
    load_avg_before: LoadAverage | None = None
    """The machine's load before the run's cluster started."""
    load_avg_after: LoadAverage | None = None
    """The machine's load when the timed run ended (its own processes included)."""


def metric_value(metrics: BenchMetrics, path: str) -> float | None:
    """`metric_value(m, "ttft_ms.p50")` -> m.ttft_ms.p50."""
    value: object = metrics
    for name in path.split("."):
        value = getattr(value, name)
    assert value is None or isinstance(value, int | float), path
    return value


def trial_metrics(runs: Sequence[RunResult]) -> list[TrialMetrics]:
    """Per trial, in trial order: run name -> its flattened metrics."""
    trials: dict[int, dict[str, dict[str, float | None]]] = {}
    for run in runs:
        trials.setdefault(run.trial, {})[run.name] = flat_metrics(run.metrics)
    return [trials[trial] for trial in sorted(trials)]


def run_names(runs: Sequence[RunResult]) -> list[str]:
    """The configurations' names, in the order they first ran."""
    return list(dict.fromkeys(run.name for run in runs))


def _request_row(workload: Workload, record: RequestRecord, start: float) -> dict[str, object]:
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
        "send_s": round(record.send_time - start, 6),
        "token_times_s": [round(t - start, 6) for t in record.token_times],
    }


def _run_entry(workload: Workload, run: RunResult) -> dict[str, object]:
    start = min((r.send_time for r in run.records), default=0.0)
    return {
        "name": run.name,
        "trial": run.trial,
        "config": run.config,
        "load_avg_before": run.load_avg_before,
        "load_avg_after": run.load_avg_after,
        "metrics": run.metrics.to_dict(),
        "requests": [_request_row(workload, r, start) for r in run.records],
    }


def result_document(
    workload: Workload,
    arrivals: ArrivalProcess,
    slo: Slo,
    runs: list[RunResult],
    goals: Sequence[GoalResult] = (),
    command: str = "",
    max_concurrency: int | None = None,
    sweep: dict[str, object] | None = None,
) -> dict[str, object]:
    """The JSON-ready result of a benchmark invocation."""
    trials = trial_metrics(runs)
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
        "num_trials": len(trials),
        "runs": [_run_entry(workload, run) for run in runs],
        "summary": {
            name: {path: asdict(spread) for path, spread in metric_spreads(trials, name).items()}
            for name in run_names(runs)
        },
        "goals": [goal.to_dict() for goal in goals],
        "sweep": sweep,
    }


def write_json(document: dict[str, object], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
