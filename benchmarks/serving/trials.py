"""Statistics over trials: medians with their range, and goals every trial must meet.

A comparison runs its configurations in turn, N times (colocated, disaggregated,
conditional, colocated, ...), so load that drifts on a shared machine falls on all
of them alike. Every metric, and every ratio of one configuration's metric to
another's, is computed within each trial, then reported as the median over the
trials (numpy's: the mean of the two middle values for an even count) with its
range, min–max. A goal counts as met only when every trial meets it: one lucky
trial cannot carry a result, and an unlucky one shows in the range.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

TrialMetrics = Mapping[str, Mapping[str, float | None]]
"""One trial: configuration name -> dotted metric path ("itl_ms.p99") -> value."""


@dataclass(frozen=True)
class Spread:
    """One value over trials: the median and the range of the trials that have it."""

    values: tuple[float | None, ...]
    """Per trial, in trial order; None where that trial has no value."""
    median: float | None
    min: float | None
    max: float | None

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Spread:
        present = [v for v in values if v is not None]
        if not present:
            return cls(tuple(values), None, None, None)
        return cls(tuple(values), float(np.median(present)), min(present), max(present))


@dataclass(frozen=True)
class Goal:
    """What a comparison checks in every trial: `metric` of `candidate`, or its
    ratio to (difference from) the `baseline`'s, against a bound. Without a bound
    the value is only reported."""

    metric: str
    """A dotted path into the metrics, e.g. "itl_ms.p99"."""
    candidate: str
    """The configuration's name, e.g. "disaggregated"."""
    baseline: str | None = None
    """None: the candidate's value itself is checked."""
    by: Literal["ratio", "difference"] = "ratio"
    """How the candidate's value is set against the baseline's."""
    at_most: float | None = None
    at_least: float | None = None

    def __post_init__(self) -> None:
        if self.at_most is not None and self.at_least is not None:
            raise ValueError("a goal has at most one bound")
        if self.by not in ("ratio", "difference"):
            raise ValueError(f"by must be ratio or difference, got {self.by!r}")

    @property
    def has_bound(self) -> bool:
        return self.at_most is not None or self.at_least is not None

    def value(self, trial: TrialMetrics) -> float | None:
        """The checked value in one trial; None when a run or its metric is missing,
        or a ratio's baseline is 0."""
        candidate = trial.get(self.candidate, {}).get(self.metric)
        if self.baseline is None or candidate is None:
            return candidate
        baseline = trial.get(self.baseline, {}).get(self.metric)
        if baseline is None:
            return None
        if self.by == "difference":
            return candidate - baseline
        return candidate / baseline if baseline else None

    def is_met_by(self, value: float | None) -> bool | None:
        """None without a bound; a missing value never meets one."""
        if not self.has_bound:
            return None
        if value is None:
            return False
        if self.at_most is not None:
            return value <= self.at_most
        assert self.at_least is not None
        return value >= self.at_least

    @property
    def subject(self) -> str:
        """What is checked, e.g. "itl_ms.p99 disaggregated / colocated"."""
        if self.baseline is None:
            return f"{self.metric} {self.candidate}"
        sign = "/" if self.by == "ratio" else "-"
        return f"{self.metric} {self.candidate} {sign} {self.baseline}"

    @property
    def bound(self) -> str:
        """e.g. "<= 0.5"; empty without a bound."""
        if self.at_most is not None:
            return f"<= {self.at_most:g}"
        if self.at_least is not None:
            return f">= {self.at_least:g}"
        return ""

    def describe(self) -> str:
        """e.g. "itl_ms.p99 disaggregated / colocated <= 0.5"."""
        return f"{self.subject} {self.bound}".rstrip()


@dataclass(frozen=True)
class GoalResult:
    """A goal's value over the trials and its verdict."""

    goal: Goal
    spread: Spread
    num_trials_met: int
    is_met: bool | None
    """True only when every trial meets the bound (and there was a trial); None
    for a value that is only reported."""

    def to_dict(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "description": self.goal.describe()}


def check_goal(goal: Goal, trials: Sequence[TrialMetrics]) -> GoalResult:
    """`goal` in each trial; met only when met in all of them."""
    values = [goal.value(trial) for trial in trials]
    verdicts = [goal.is_met_by(value) for value in values]
    num_met = sum(verdict is True for verdict in verdicts)
    is_met = (bool(trials) and num_met == len(trials)) if goal.has_bound else None
    return GoalResult(goal, Spread.of(values), num_met, is_met)


def metric_spreads(trials: Sequence[TrialMetrics], name: str) -> dict[str, Spread]:
    """Every metric of configuration `name` over the trials, by dotted path (the
    paths of the first trial that ran it)."""
    paths = next((list(trial[name]) for trial in trials if name in trial), [])
    return {
        path: Spread.of([trial[name].get(path) if name in trial else None for trial in trials])
        for path in paths
    }


def flat_metrics(metrics: object, prefix: str = "") -> dict[str, float | None]:
    """A dataclass of numbers (and of such dataclasses) as dotted path -> number."""
    flat: dict[str, float | None] = {}
    for field in dataclasses.fields(metrics):  # type: ignore[arg-type]
        value = getattr(metrics, field.name)
        path = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            flat.update(flat_metrics(value, f"{path}."))
        elif value is None or isinstance(value, int | float):
            flat[path] = value
    return flat
