"""Two configurations in one invocation, on the same cores with the same number of
processes, one after the other, each on a fresh cluster and KV store:

- `disagg-vs-colocated`: colocated (a decode worker per core, prefilling its own
  prompts) is the baseline; goal: p99 ITL disaggregated <= 0.5x colocated.
- `prefix-cache`: a disaggregated cluster with every worker's prefix cache off is
  the baseline; goal: p50 TTFT with the cache <= 0.2x without (5x lower).
- `kv-cache-dtype`: a disaggregated cluster storing K/V in the model's dtype is the
  baseline, the same cluster with `--kv-cache-dtype int8` the candidate; goal: p50
  TTFT no higher (int8 blocks are 0.26x the bytes of float32 ones to publish and
  fetch, and cost a quantization in prefill).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.serving.arrivals import ArrivalProcess
from benchmarks.serving.driver import measure
from benchmarks.serving.launcher import (
    BenchCluster,
    ClusterLayout,
    colocated_layout,
    disaggregated_layout,
)
from benchmarks.serving.metrics import Slo
from benchmarks.serving.result import Comparison, RunResult, compare
from benchmarks.serving.workload import Workload


@dataclass(frozen=True)
class ComparisonSpec:
    """What a comparison runs and what it checks."""

    baseline: Callable[[str, tuple[int, ...]], ClusterLayout]
    """(model, cores) -> the baseline's layout."""
    candidate: Callable[[str, tuple[int, ...]], ClusterLayout]
    metric: str
    max_ratio: float


COMPARISONS: dict[str, ComparisonSpec] = {
    "disagg-vs-colocated": ComparisonSpec(
        baseline=colocated_layout,
        candidate=disaggregated_layout,
        metric="itl_ms.p99",
        max_ratio=0.5,
    ),
    "prefix-cache": ComparisonSpec(
        baseline=lambda model, cores: disaggregated_layout(
            model, cores, is_prefix_cache_enabled=False, name="prefix-cache-off"
        ),
        candidate=lambda model, cores: disaggregated_layout(model, cores, name="prefix-cache-on"),
        metric="ttft_ms.p50",
        max_ratio=0.2,
    ),
    "kv-cache-dtype": ComparisonSpec(
        baseline=lambda model, cores: disaggregated_layout(model, cores, name="kv-cache-auto"),
        candidate=lambda model, cores: dataclasses.replace(
            disaggregated_layout(model, cores, name="kv-cache-int8"),
            extra_worker_args=("--kv-cache-dtype", "int8"),
        ),
        metric="ttft_ms.p50",
        max_ratio=1.0,
    ),
}


def run_comparison(
    kind: str,
    model: str,
    cores: tuple[int, ...],
    workload: Workload,
    arrivals: ArrivalProcess,
    slo: Slo,
    *,
    max_concurrency: int | None = None,
    show_progress: bool = True,
) -> tuple[list[RunResult], Comparison]:
    """Runs the baseline, then the candidate, and compares them."""
    spec = COMPARISONS[kind]
    results = []
    for layout in (spec.baseline(model, cores), spec.candidate(model, cores)):
        with BenchCluster(layout) as cluster:
            results.append(
                measure(
                    cluster.target,
                    layout.name,
                    layout.describe(),
                    workload,
                    arrivals,
                    slo,
                    max_concurrency=max_concurrency,
                    show_progress=show_progress,
                )
            )
    baseline, candidate = results
    return results, compare(baseline, candidate, spec.metric, max_ratio=spec.max_ratio)
