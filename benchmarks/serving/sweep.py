"""`--sweep-rate`: goodput against the arrival rate, and the highest rate at which
a configuration meets the SLO (DistServe's measure of serving capacity).

- **The ladder** (`RateLadder.parse`): `0.1,0.2,0.4` runs those rates, in
  increasing order; `0.05x1.5` is a geometric ladder, 0.05, 0.075, 0.1125, ...,
  at most `max_steps` rates.
- **Climbing.** At each rate, every configuration still climbing runs its trials
  (interleaved, as a comparison's, each on a fresh cluster). A configuration stops
  after the first rate at which its median goodput over the trials is no higher
  than the highest it reached at a lower rate: goodput stopped growing. The sweep
  ends when every configuration stopped or the ladder ran out.
- **Highest rate meeting the SLO**, per trial of a configuration: the highest
  rate r it ran such that at r and at every lower rate at least 90% of the
  requests sent met the SLO (`slo_attainment` >= 0.9, `metrics.py`); None when the
  lowest rate already misses. A configuration that still met the SLO at the last
  rate it ran has only a lower bound (`is_lower_bound`): start the ladder lower
  or let it run higher.
- **Goals**: each configuration's highest rate over the baseline's, per trial (the
  i-th trials of both), at least the comparison's ratio in every trial. A trial in
  which the baseline has no such rate has no ratio, and does not meet the goal.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.serving.arrivals import ArrivalProcess
from benchmarks.serving.compare import ComparisonSpec, TrialSettings, run_trials
from benchmarks.serving.launcher import ClusterLayout
from benchmarks.serving.metrics import Slo
from benchmarks.serving.result import RunResult
from benchmarks.serving.trials import Goal, GoalResult, Spread, check_goal
from benchmarks.serving.workload import Workload

MIN_SLO_ATTAINMENT = 0.9
DEFAULT_MAX_STEPS = 8
HIGHEST_RATE = "highest_rate_meeting_slo"
"""The metric name of the sweep's goals."""


@dataclass(frozen=True)
class RateLadder:
    """The arrival rates a sweep climbs, increasing."""

    rates: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.rates:
            raise ValueError("a rate ladder needs at least one rate")
        if any(not (0 < r < math.inf) for r in self.rates):
            raise ValueError(f"sweep rates must be finite and > 0, got {list(self.rates)}")
        if any(b <= a for a, b in zip(self.rates, self.rates[1:], strict=False)):
            raise ValueError(f"sweep rates must increase, got {list(self.rates)}")

    @classmethod
    def parse(cls, text: str, max_steps: int = DEFAULT_MAX_STEPS) -> RateLadder:
        """`"0.1,0.2,0.4"` (a list) or `"0.05x1.5"` (start x factor, `max_steps` rates)."""
        start, is_geometric, factor = text.partition("x")
        try:
            numbers = [float(start), float(factor)] if is_geometric else _floats(text)
        except ValueError:
            raise ValueError(
                f"--sweep-rate {text!r}: expected RATE,RATE,... or STARTxFACTOR"
            ) from None
        if not is_geometric:
            return cls(tuple(numbers))
        if not numbers[1] > 1:
            raise ValueError(f"--sweep-rate {text!r}: the factor must be > 1")
        if max_steps < 1:
            raise ValueError(f"--sweep-max-steps must be >= 1, got {max_steps}")
        # Six significant digits, so a rate prints as it was meant (0.1125, not 0.11250000001).
        return cls(tuple(float(f"{numbers[0] * numbers[1] ** i:.6g}") for i in range(max_steps)))


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",")]


def has_stopped_growing(goodputs: Sequence[float | None]) -> bool:
    """Whether the last goodput is no higher than the highest before it (a missing
    goodput counts as 0)."""
    values = [g or 0.0 for g in goodputs]
    return len(values) >= 2 and values[-1] <= max(values[:-1])


def highest_rate_meeting(
    rates: Sequence[float],
    attainments: Sequence[float | None],
    min_attainment: float = MIN_SLO_ATTAINMENT,
) -> float | None:
    """The last rate of the longest prefix of `rates` whose attainment is at least
    `min_attainment` (a missing attainment misses); None when the first misses."""
    highest = None
    for rate, attainment in zip(rates, attainments, strict=True):
        if attainment is None or attainment < min_attainment:
            break
        highest = rate
    return highest


@dataclass(frozen=True)
class SweepPoint:
    """One configuration at one rate, over its trials."""

    name: str
    rate: float
    goodput: Spread
    slo_attainment: Spread


@dataclass(frozen=True)
class RateSweep:
    """What a sweep found."""

    rates: tuple[float, ...]
    """The ladder (a configuration may have stopped before its end)."""
    points: tuple[SweepPoint, ...]
    highest_rates: dict[str, Spread]
    """Per configuration, its highest rate meeting the SLO in each trial."""
    is_lower_bound: dict[str, bool]
    """True where the configuration still met the SLO at the last rate it ran."""
    goals: tuple[GoalResult, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            **dataclasses.asdict(self),
            "goals": [goal.to_dict() for goal in self.goals],
            "min_slo_attainment": MIN_SLO_ATTAINMENT,
        }


def summarize_sweep(
    rates: Sequence[float],
    runs_by_rate: dict[float, list[RunResult]],
    names: Sequence[str],
    num_trials: int,
    min_ratio: float | None,
) -> RateSweep:
    """The sweep's points, highest rates and goals from its runs (run names are the
    configurations'; `names[0]` is the baseline)."""
    points, highest, lower_bound = [], {}, {}
    for name in names:
        ran = [rate for rate in rates if any(r.name == name for r in runs_by_rate.get(rate, []))]
        per_trial = [[None] * len(ran) for _ in range(num_trials)]
        for i, rate in enumerate(ran):
            runs = [r for r in runs_by_rate[rate] if r.name == name]
            for run in runs:
                per_trial[run.trial][i] = run.metrics.slo_attainment
            goodputs = [r.metrics.goodput for r in runs]
            attainments = [r.metrics.slo_attainment for r in runs]
            points.append(SweepPoint(name, rate, Spread.of(goodputs), Spread.of(attainments)))
        trial_highest = [highest_rate_meeting(ran, attained) for attained in per_trial]
        highest[name] = Spread.of(trial_highest)
        lower_bound[name] = bool(ran) and any(h == ran[-1] for h in trial_highest)
    trials = [
        {name: {HIGHEST_RATE: highest[name].values[trial]} for name in names}
        for trial in range(num_trials)
    ]
    goals = tuple(
        check_goal(Goal(HIGHEST_RATE, name, names[0], at_least=min_ratio), trials)
        for name in names[1:]
    )
    return RateSweep(tuple(rates), tuple(points), highest, lower_bound, goals)


def run_sweep(
    spec: ComparisonSpec,
    layouts: tuple[ClusterLayout, ...],
    ladder: RateLadder,
    workload: Workload,
    arrivals: ArrivalProcess,
    slo: Slo,
    settings: TrialSettings,
) -> tuple[list[RunResult], RateSweep]:
    """Climbs `ladder` (see the module docstring); in the returned list runs are
    named "<configuration>@<rate>" and their config holds the `request_rate`."""
    if slo.is_empty:
        raise ValueError("--sweep-rate needs an SLO (--slo ttft_ms=...,itl_ms=...)")
    climbing = [layout.name for layout in layouts]
    goodputs: dict[str, list[float | None]] = {name: [] for name in climbing}
    runs_by_rate: dict[float, list[RunResult]] = {}
    all_runs = []
    for rate in ladder.rates:
        active = tuple(layout for layout in layouts if layout.name in climbing)
        if not active:
            break
        at_rate = dataclasses.replace(arrivals, rate=rate)
        runs = run_trials(active, workload, at_rate, slo, settings)
        runs_by_rate[rate] = runs
        all_runs += [
            dataclasses.replace(
                run, name=f"{run.name}@{rate:g}", config={**run.config, "request_rate": rate}
            )
            for run in runs
        ]
        for layout in active:
            goodput = Spread.of([r.metrics.goodput for r in runs if r.name == layout.name])
            goodputs[layout.name].append(goodput.median)
            if has_stopped_growing(goodputs[layout.name]):
                climbing.remove(layout.name)
    names = [layout.name for layout in layouts]
    sweep = summarize_sweep(
        ladder.rates, runs_by_rate, names, settings.num_trials, spec.sweep_min_ratio
    )
    return all_runs, sweep
