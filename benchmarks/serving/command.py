"""What `kvrelay bench` runs once its flags are parsed: the inputs (workload,
arrivals, SLOs), the runs (against a target, or a comparison of clusters started
here), and the report (table, JSON, plot).

`deploy.bench_command` declares the flags and imports this module only when a
benchmark runs, so the CLI does not load benchmark code for anything else.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.serving import workload as w
from benchmarks.serving.arrivals import ArrivalProcess
from benchmarks.serving.metrics import Slo
from benchmarks.serving.result import RunResult
from benchmarks.serving.trials import GoalResult
from benchmarks.serving.workload import Workload

if TYPE_CHECKING:
    from benchmarks.serving.compare import LayoutOptions, TrialSettings
    from benchmarks.serving.sweep import RateLadder, RateSweep

NUM_OVERHEAD_TRIALS = 30
"""--num-trials of `--compare overhead` (its trials are prompts, not clusters)."""
NUM_COMPARISON_TRIALS = 3


@dataclass(frozen=True)
class BenchInputs:
    """The benchmark's inputs, read from the flags."""

    workload: Workload
    arrivals: ArrivalProcess
    slo: Slo
    layouts: LayoutOptions | None = None
    """--compare: what the clusters it starts look like."""
    trials: TrialSettings | None = None
    """--compare: how many trials, and how each run is driven."""
    ladder: RateLadder | None = None
    """--sweep-rate: the rates to climb."""

    @classmethod
    def from_args(cls, args: argparse.Namespace, cores: tuple[int, ...] = ()) -> BenchInputs:
        """Raises ValueError (naming the flag) for values no benchmark accepts;
        `cores` are the comparison's (empty without --compare)."""
        inputs = cls(
            workload=_workload(args),
            arrivals=ArrivalProcess(args.request_rate, args.burstiness, args.seed),
            slo=Slo.parse(args.slo),
        )
        if args.compare is None or args.compare == "overhead":
            return inputs
        from benchmarks.serving.compare import LayoutOptions, TrialSettings
        from benchmarks.serving.sweep import RateLadder

        layouts = LayoutOptions(
            args.model,
            cores,
            args.colocated_cores,
            args.colocated_token_budget,
            args.max_local_prefill_len,
        )
        trials = TrialSettings(
            NUM_COMPARISON_TRIALS if args.num_trials is None else args.num_trials,
            args.max_concurrency,
            not args.no_progress,
        )
        ladder = None
        if args.sweep_rate is not None:
            ladder = RateLadder.parse(args.sweep_rate, args.sweep_max_steps)
        return dataclasses.replace(inputs, layouts=layouts, trials=trials, ladder=ladder)


@dataclass(frozen=True)
class BenchOutcome:
    """What a benchmark produced, for the report."""

    workload: Workload
    runs: list[RunResult]
    goals: list[GoalResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Lines for the report: the configurations, e.g. the colocated token budget."""
    sweep: RateSweep | None = None
    """What a --sweep-rate run found."""


def run_bench(args: argparse.Namespace, inputs: BenchInputs, cores: tuple[int, ...]) -> int:
    """Runs the benchmark the flags describe and reports it; returns the exit status."""
    outcome = _run_benchmark(args, inputs, cores)
    return _report(args, inputs, outcome)


def _workload(args: argparse.Namespace) -> Workload:

    if args.workload == "random":
        input_len = args.input_len or 128
        return w.random_workload(args.num_prompts, input_len, args.output_len, args.seed)
    if args.workload == "shared-prefix":
        return w.shared_prefix_workload(
            args.num_groups,
            args.prompts_per_group,
            args.prefix_len,
            args.question_len,
            args.output_len,
            args.seed,
        )
    if args.workload == "mixed":
        return w.mixed_workload(
            args.num_prompts,
            args.short_len,
            args.long_len,
            args.long_every,
            args.output_len,
            args.seed,
        )
    if args.dataset is None:
        raise ValueError("--workload jsonl needs --dataset FILE")
    return w.jsonl_workload(args.dataset, args.output_len, args.num_prompts)


def _run_benchmark(
    args: argparse.Namespace, inputs: BenchInputs, cores: tuple[int, ...]
) -> BenchOutcome:
    """The runs, the overhead comparison making its own workload."""
    show_progress = not args.no_progress
    if args.compare == "overhead":
        from benchmarks.serving.overhead import run_overhead

        workload, runs, goals = run_overhead(
            args.model,
            cores,
            NUM_OVERHEAD_TRIALS if args.num_trials is None else args.num_trials,
            args.input_len or 16,
            show_progress=show_progress,
        )
        return BenchOutcome(workload, runs, goals)
    if args.compare is not None:
        return _run_comparison(args, inputs)
    from benchmarks.serving.driver import measure

    config = {"target": args.target}
    run = measure(
        args.target,
        "target",
        config,
        inputs.workload,
        inputs.arrivals,
        inputs.slo,
        max_concurrency=args.max_concurrency,
        show_progress=show_progress,
    )
    return BenchOutcome(inputs.workload, [run])


def _run_comparison(args: argparse.Namespace, inputs: BenchInputs) -> BenchOutcome:
    from benchmarks.serving.compare import COMPARISONS, run_trials
    from benchmarks.serving.result import trial_metrics
    from benchmarks.serving.sweep import run_sweep
    from benchmarks.serving.trials import check_goal

    assert inputs.layouts is not None and inputs.trials is not None
    spec = COMPARISONS[args.compare]
    layouts = spec.layouts(inputs.layouts)
    notes = ["configurations:", *(f"  {layout.summary()}" for layout in layouts)]
    workload, arrivals, slo, settings = inputs.workload, inputs.arrivals, inputs.slo, inputs.trials
    if inputs.ladder is not None:
        runs, sweep = run_sweep(spec, layouts, inputs.ladder, workload, arrivals, slo, settings)
        return BenchOutcome(workload, runs, notes=notes, sweep=sweep)
    runs = run_trials(layouts, workload, arrivals, slo, settings)
    trials = trial_metrics(runs)
    goals = [check_goal(goal, trials) for goal in spec.goals]
    return BenchOutcome(workload, runs, goals, notes)


def _report(args: argparse.Namespace, inputs: BenchInputs, outcome: BenchOutcome) -> int:
    from benchmarks.serving.plot import plot_latencies
    from benchmarks.serving.report import format_sweep, format_table
    from benchmarks.serving.result import result_document, write_json

    workload, slo = outcome.workload, inputs.slo
    name = args.compare or workload.name
    if args.sweep_rate is not None:
        name += "-sweep"
    result_path = args.result_json or Path(f"kvrelay-bench-{name}.json")
    plot_path = args.plot or result_path.with_suffix(".png")
    # argv is the bench's own when run as `kvrelay bench` or `python -m deploy.cli bench`.
    command = shlex.join(["kvrelay", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else ""
    sweep = outcome.sweep
    document = result_document(
        workload,
        inputs.arrivals,
        slo,
        outcome.runs,
        outcome.goals,
        command,
        args.max_concurrency,
        sweep.to_dict() if sweep is not None else None,
    )
    write_json(document, result_path)
    title = f"kvrelay bench --compare {args.compare}" if args.compare else "kvrelay bench"
    plot_latencies(
        outcome.runs,
        plot_path,
        f"{title}: {workload.name} workload",
        long_indices=workload.long_indices,
        sweep=sweep,
        itl_slo_ms=slo.itl_ms,
    )
    if sweep is None:
        print(format_table(outcome.runs, outcome.goals, outcome.notes), flush=True)
    else:  # a column per configuration and rate would not fit: the JSON has each run
        print("\n".join([*outcome.notes, format_sweep(sweep)]), flush=True)
    print(f"result: {result_path}  plot: {plot_path}", file=sys.stderr)
    return 0
