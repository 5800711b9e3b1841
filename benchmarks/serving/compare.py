"""Configurations compared in one invocation, on the same cores, in interleaved
trials: each trial runs every configuration once, in order, each on a fresh
cluster and KV store (colocated, disaggregated, conditional, colocated, ...), and
every goal is checked in every trial (`trials.py`).

- `disagg-vs-colocated`: colocated (a decode worker per core, prefilling its own
  prompts) is the baseline; goal: p99 ITL disaggregated <= 0.5x colocated.
- `colocated-disagg-conditional`: colocated, disaggregated, and conditional (the
  decode worker prefills prompts up to `--max-local-prefill-len` itself, a prefill
  worker the longer ones), side by side; goal: the disaggregated interference ratio
  (`interference.py`) <= 1.2, every configuration's reported beside it, with p99
  ITL and goodput of the other two over colocated's. In a sweep: the highest rate
  meeting the SLO, disaggregated's and conditional's each >= 1.5x colocated's.
- `colocated-token-budget`: the colocated configuration at chunked-prefill budgets
  of 512 (the decode worker's default, the baseline), 1024, 256, 128 and 64 tokens, to
  pick the budget the colocated baseline runs with (`--colocated-token-budget`);
  reported: each one's p99 ITL, interference ratio and goodput, the first two
  over the default's.
- `prefix-cache`: a disaggregated cluster with every worker's prefix cache off is
  the baseline; goal: p50 TTFT with the cache <= 0.2x without (5x lower).
- `kv-cache-dtype`: a disaggregated cluster storing K/V in the model's dtype is the
  baseline, the same cluster with `--kv-cache-dtype int8` the candidate; goal: p50
  TTFT no higher (int8 blocks are 0.26x the bytes of float32 ones to publish and
  fetch, and cost a quantization in prefill).

The colocated baseline's chunked-prefill budget (`--colocated-token-budget`) and
cores (`--colocated-cores`, e.g. one core to hold decode capacity equal to one
disaggregated decode worker's) come from `LayoutOptions`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.serving.arrivals import ArrivalProcess
from benchmarks.serving.driver import measure
from benchmarks.serving.launcher import (
    DEFAULT_DECODE_TOKEN_BUDGET,
    BenchCluster,
    ClusterLayout,
    colocated_layout,
    conditional_layout,
    disaggregated_layout,
)
from benchmarks.serving.metrics import Slo
from benchmarks.serving.result import RunResult
from benchmarks.serving.trials import Goal
from benchmarks.serving.workload import Workload

DEFAULT_MAX_LOCAL_PREFILL_LEN = 256
COLOCATED_TOKEN_BUDGETS = (DEFAULT_DECODE_TOKEN_BUDGET, 1024, 256, 128, 64)
"""The budgets `colocated-token-budget` compares, the default first."""
COLOCATED_TOKEN_BUDGET = 256
"""The colocated baseline's budget: the best goodput and SLO attainment of
`colocated-token-budget` on dummy:135m's mixed load (docs/benchmarks.md), where 64
was clearly worst and 128-1024 within a short run's noise of each other."""


@dataclass(frozen=True)
class LayoutOptions:
    """What the flags say about the clusters a comparison starts."""

    model: str
    cores: tuple[int, ...]
    """Every configuration's workers are pinned to these."""
    colocated_cores: tuple[int, ...] = ()
    """The colocated configuration's decode workers, one per core (empty: `cores`)."""
    colocated_token_budget: int = COLOCATED_TOKEN_BUDGET
    """The colocated decode workers' tokens per engine step (their prefill chunk)."""
    max_local_prefill_len: int = DEFAULT_MAX_LOCAL_PREFILL_LEN
    """Conditional: the decode worker prefills prompts up to this long itself."""

    def __post_init__(self) -> None:
        if self.colocated_token_budget < 1:
            raise ValueError(
                f"--colocated-token-budget must be >= 1, got {self.colocated_token_budget}"
            )
        if self.max_local_prefill_len < 1:
            raise ValueError(
                f"--max-local-prefill-len must be >= 1, got {self.max_local_prefill_len}"
            )

    def colocated(self) -> ClusterLayout:
        return colocated_layout(
            self.model,
            self.colocated_cores or self.cores,
            decode_token_budget=self.colocated_token_budget,
        )

    def disaggregated(self) -> ClusterLayout:
        return disaggregated_layout(self.model, self.cores)

    def conditional(self) -> ClusterLayout:
        return conditional_layout(self.model, self.cores, self.max_local_prefill_len)


@dataclass(frozen=True)
class ComparisonSpec:
    """What a comparison runs and what it checks."""

    layouts: Callable[[LayoutOptions], tuple[ClusterLayout, ...]]
    """The configurations, baseline first; their names are the goals' names."""
    goals: tuple[Goal, ...]
    sweep_min_ratio: float | None = None
    """In a sweep: every other configuration's highest rate meeting the SLO over the
    baseline's, at least this (None: reported only)."""


def _interference_goals(names: tuple[str, ...]) -> tuple[Goal, ...]:
    """The disaggregated ratio against its goal; the others reported beside it."""
    return tuple(
        Goal("interference.ratio", name, at_most=1.2 if name == "disaggregated" else None)
        for name in names
    )


def _budget_goals() -> tuple[Goal, ...]:
    """Reported: every budget's p99 ITL over the default's, interference, goodput."""
    default = f"colocated-{DEFAULT_DECODE_TOKEN_BUDGET}"
    goals = []
    for budget in COLOCATED_TOKEN_BUDGETS:
        name = f"colocated-{budget}"
        if name != default:
            goals.append(Goal("itl_ms.p99", name, default))
        goals += [Goal("interference.ratio", name), Goal("goodput", name)]
    return tuple(goals)


COMPARISONS: dict[str, ComparisonSpec] = {
    "disagg-vs-colocated": ComparisonSpec(
        layouts=lambda o: (o.colocated(), o.disaggregated()),
        goals=(
            Goal("itl_ms.p99", "disaggregated", "colocated", at_most=0.5),
            *_interference_goals(("colocated", "disaggregated")),
        ),
    ),
    "colocated-disagg-conditional": ComparisonSpec(
        layouts=lambda o: (o.colocated(), o.disaggregated(), o.conditional()),
        goals=(
            *_interference_goals(("disaggregated", "colocated", "conditional")),
            Goal("itl_ms.p99", "disaggregated", "colocated"),
            Goal("itl_ms.p99", "conditional", "colocated"),
            Goal("goodput", "disaggregated", "colocated"),
            Goal("goodput", "conditional", "colocated"),
        ),
        sweep_min_ratio=1.5,
    ),
    "colocated-token-budget": ComparisonSpec(
        layouts=lambda o: tuple(
            colocated_layout(
                o.model,
                o.colocated_cores or o.cores,
                f"colocated-{budget}",
                decode_token_budget=budget,
            )
            for budget in COLOCATED_TOKEN_BUDGETS
        ),
        goals=_budget_goals(),
    ),
    "prefix-cache": ComparisonSpec(
        layouts=lambda o: (
            disaggregated_layout(
                o.model, o.cores, is_prefix_cache_enabled=False, name="prefix-cache-off"
            ),
            disaggregated_layout(o.model, o.cores, name="prefix-cache-on"),
        ),
        goals=(Goal("ttft_ms.p50", "prefix-cache-on", "prefix-cache-off", at_most=0.2),),
    ),
    "kv-cache-dtype": ComparisonSpec(
        layouts=lambda o: (
            disaggregated_layout(o.model, o.cores, name="kv-cache-auto"),
            dataclasses.replace(
                disaggregated_layout(o.model, o.cores, name="kv-cache-int8"),
                extra_worker_args=("--kv-cache-dtype", "int8"),
            ),
        ),
        goals=(Goal("ttft_ms.p50", "kv-cache-int8", "kv-cache-auto", at_most=1.0),),
    ),
}


@dataclass(frozen=True)
class TrialSettings:
    """How each run of a comparison is driven."""

    num_trials: int = 3
    max_concurrency: int | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.num_trials < 1:
            raise ValueError(f"--num-trials must be >= 1, got {self.num_trials}")


def run_layout(
    layout: ClusterLayout,
    workload: Workload,
    arrivals: ArrivalProcess,
    slo: Slo,
    settings: TrialSettings,
    *,
    trial: int = 0,
    name: str = "",
) -> RunResult:
    """One run of `layout` on a cluster of its own; the load is read before the
    cluster starts, so the run's own start-up is not in it."""
    load_avg_before = os.getloadavg()
    with BenchCluster(layout) as cluster:
        return measure(
            cluster.target,
            name or layout.name,
            layout.describe(),
            workload,
            arrivals,
            slo,
            max_concurrency=settings.max_concurrency,
            show_progress=settings.show_progress,
            trial=trial,
            load_avg_before=load_avg_before,
        )


def run_trials(
    layouts: tuple[ClusterLayout, ...],
    workload: Workload,
    arrivals: ArrivalProcess,
    slo: Slo,
    settings: TrialSettings,
    *,
    name_suffix: str = "",
) -> list[RunResult]:
    """`settings.num_trials` rounds, each running every layout once, in order."""
    return [
        run_layout(
            layout,
            workload,
            arrivals,
            slo,
            settings,
            trial=trial,
            name=layout.name + name_suffix,
        )
        for trial in range(settings.num_trials)
        for layout in layouts
    ]
