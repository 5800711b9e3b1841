"""The terminal report, in `vllm bench serve`'s vocabulary: a table with a column per
configuration and a row per metric, the load around every run, each goal's verdict
and, for a sweep, goodput and SLO attainment by rate.

With one trial a cell is the run's value; with several it is the median over the
trials and their range, `median [min–max]`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from benchmarks.serving.result import RunResult, run_names, trial_metrics
from benchmarks.serving.sweep import RateSweep
from benchmarks.serving.trials import GoalResult, Spread, metric_spreads

Formatter = Callable[[float], str]

LATENCIES = (
    ("ttft_ms", "TTFT (ms)"),
    ("tpot_ms", "TPOT (ms)"),
    ("itl_ms", "ITL (ms)"),
    ("e2e_ms", "E2E latency (ms)"),
)
LATENCY_STATS = (("mean", "mean"), ("p50", "p50"), ("p90", "p90"), ("p99", "p99"))
LATENCY_TAIL = (("p999", "p99.9"), ("max", "max"))


def _fixed(digits: int) -> Formatter:
    return lambda value: f"{value:.{digits}f}"


def _percent(value: float) -> str:
    return f"{value:.1%}"


ROWS: tuple[tuple[str, str, Formatter], ...] = (
    ("Requests completed", "num_completed", _fixed(0)),
    ("Requests failed", "num_failed", _fixed(0)),
    ("Duration (s)", "duration_s", _fixed(2)),
    ("Prompt tokens", "num_prompt_tokens", _fixed(0)),
    ("Output tokens", "num_output_tokens", _fixed(0)),
    ("Request throughput (req/s)", "request_throughput", _fixed(3)),
    ("Output throughput (tok/s)", "output_throughput", _fixed(2)),
    ("Total token throughput (tok/s)", "total_token_throughput", _fixed(2)),
    ("Goodput (req/s)", "goodput", _fixed(3)),
    ("SLO attainment", "slo_attainment", _percent),
    ("ITL gaps over the ITL SLO", "itl_over_slo_fraction", _percent),
    ("Prefix-cache hit rate", "prefix_cache_hit_rate", _percent),
    *(
        (f"{label} {stat_label}", f"{attr}.{stat}", _fixed(2))
        for attr, label in LATENCIES
        for stat, stat_label in LATENCY_STATS + (LATENCY_TAIL if attr == "itl_ms" else ())
    ),
    ("Short ITL p99, long prefill (ms)", "interference.during_prefill_p99_ms", _fixed(2)),
    ("Short ITL p99, no long prefill (ms)", "interference.outside_prefill_p99_ms", _fixed(2)),
    ("Interference ratio", "interference.ratio", _fixed(3)),
)


def format_spread(spread: Spread, formatter: Formatter) -> str:
    """ "-" without a value; the value for one trial; else "median [min–max]"."""
    if spread.median is None:
        return "-"
    if len(spread.values) == 1:
        return formatter(spread.median)
    assert spread.min is not None and spread.max is not None
    return f"{formatter(spread.median)} [{formatter(spread.min)}–{formatter(spread.max)}]"


def format_table(
    runs: Sequence[RunResult], goals: Sequence[GoalResult] = (), notes: Sequence[str] = ()
) -> str:
    """A fixed-width table with a row per metric and a column per configuration
    (over its trials), then `notes`, the load around each run and the goals."""
    names = run_names(runs)
    trials = trial_metrics(runs)
    spreads = [metric_spreads(trials, name) for name in names]
    columns = [
        [format_spread(column.get(path, Spread.of([])), fmt) for _, path, fmt in ROWS]
        for column in spreads
    ]
    label_width = max(len(label) for label, _, _ in ROWS)
    widths = [
        max(14, len(name), *(len(cell) for cell in cells))
        for name, cells in zip(names, columns, strict=True)
    ]
    header = " " * label_width + "".join(
        f"  {name:>{w}}" for name, w in zip(names, widths, strict=True)
    )
    lines = [header, "-" * len(header)]
    for i, (label, _, _) in enumerate(ROWS):
        cells = "".join(f"  {col[i]:>{w}}" for col, w in zip(columns, widths, strict=True))
        lines.append(f"{label:<{label_width}}{cells}")
    lines.append("-" * len(header))
    if len(trials) > 1:
        lines.append(f"{len(trials)} trials; cells are median [min–max] over the trials")
    lines += notes
    lines += _load_lines(runs)
    lines += [format_goal(goal) for goal in goals]
    return "\n".join(lines)


def _load(load: tuple[float, float, float] | None) -> str:
    return "?" if load is None else f"{load[0]:.2f}"


def _load_lines(runs: Sequence[RunResult]) -> list[str]:
    if all(run.load_avg_before is None for run in runs):
        return []
    lines = ["load average (1 min) before -> after each run:"]
    for trial in sorted({run.trial for run in runs}):
        entries = [
            f"{run.name} {_load(run.load_avg_before)} -> {_load(run.load_avg_after)}"
            for run in runs
            if run.trial == trial
        ]
        lines.append(f"  trial {trial + 1}: " + ", ".join(entries))
    return lines


def format_goal(result: GoalResult) -> str:
    """e.g. "itl_ms.p99 disaggregated / colocated: 0.500 [0.250–0.750] over 3 trials
    (goal <= 0.5: met in 2/3 trials: MISSED)"."""
    goal, spread = result.goal, result.spread
    value = format_spread(spread, _fixed(3))
    num_trials = len(spread.values)
    over = f" over {num_trials} trials" if num_trials > 1 else ""
    if result.is_met is None:
        return f"{goal.subject}: {value}{over} (reported)"
    verdict = "met" if result.is_met else "MISSED"
    if num_trials > 1:
        verdict = f"met in {result.num_trials_met}/{num_trials} trials: {verdict}"
    return f"{goal.subject}: {value}{over} (goal {goal.bound}: {verdict})"


def format_sweep(sweep: RateSweep) -> str:
    """Goodput | SLO attainment by rate, the highest rates and the sweep's goals."""
    names = list(sweep.highest_rates)
    cells: dict[tuple[str, float], str] = {
        (p.name, p.rate): f"{format_spread(p.goodput, _fixed(3))} | "
        f"{format_spread(p.slo_attainment, _percent)}"
        for p in sweep.points
    }
    rates = [rate for rate in sweep.rates if any(r == rate for _, r in cells)]
    widths = [
        max(len(name), *(len(cells.get((name, rate), "-")) for rate in rates)) for name in names
    ]
    header = f"{'rate (req/s)':<12}" + "".join(
        f"  {name:>{w}}" for name, w in zip(names, widths, strict=True)
    )
    lines = ["sweep: goodput (req/s) | SLO attainment at each rate", header, "-" * len(header)]
    for rate in rates:
        row = "".join(
            f"  {cells.get((name, rate), '-'):>{w}}" for name, w in zip(names, widths, strict=True)
        )
        lines.append(f"{rate:<12g}{row}")
    lines.append("-" * len(header))
    lines.append("highest rate at which >= 90% of requests meet the SLO (req/s):")
    for name in names:
        bound = (
            " (a lower bound: still met at the last rate run)" if sweep.is_lower_bound[name] else ""
        )
        lines.append(f"  {name}: {format_spread(sweep.highest_rates[name], _fixed(3))}{bound}")
    lines += [format_goal(goal) for goal in sweep.goals]
    return "\n".join(lines)
