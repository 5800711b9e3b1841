"""What `kvrelay bench` runs once its flags are parsed: the inputs (workload,
arrivals, SLOs), the runs (against a target, or a comparison of clusters started
here), and the report (table, JSON, plot).

`deploy.bench_command` declares the flags and imports this module only when a
benchmark runs, so the CLI does not load benchmark code for anything else.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.serving import workload as w
from benchmarks.serving.arrivals import ArrivalProcess
from benchmarks.serving.metrics import Slo
from benchmarks.serving.result import Comparison, RunResult
from benchmarks.serving.workload import Workload


@dataclass(frozen=True)
class BenchInputs:
    """The benchmark's inputs, read from the flags."""

    workload: Workload
    arrivals: ArrivalProcess
    slo: Slo

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchInputs:
        """Raises ValueError (naming the flag) for values no benchmark accepts."""
        return cls(
            workload=_workload(args),
            arrivals=ArrivalProcess(args.request_rate, args.burstiness, args.seed),
            slo=Slo.parse(args.slo),
        )


def run_bench(args: argparse.Namespace, inputs: BenchInputs, cores: tuple[int, ...]) -> int:
    """Runs the benchmark the flags describe and reports it; returns the exit status."""
    runs, comparison, workload = _run_benchmark(
        args, inputs.workload, inputs.arrivals, inputs.slo, cores
    )
    return _report(args, workload, inputs.arrivals, inputs.slo, runs, comparison)


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
    args: argparse.Namespace,
    workload: Workload,
    arrivals: ArrivalProcess,
    slo: Slo,
    cores: tuple[int, ...],
) -> tuple[list[RunResult], Comparison | None, Workload]:
    """(runs, comparison or None, workload), the overhead comparison making its own."""
    show_progress = not args.no_progress
    comparison = None
    if args.compare == "overhead":
        from benchmarks.serving.overhead import run_overhead

        workload, runs, comparison = run_overhead(
            args.model,
            cores,
            args.num_trials,
            args.input_len or 16,
            show_progress=show_progress,
        )
    elif args.compare is not None:
        from benchmarks.serving.compare import run_comparison

        runs, comparison = run_comparison(
            args.compare,
            args.model,
            cores,
            workload,
            arrivals,
            slo,
            max_concurrency=args.max_concurrency,
            show_progress=show_progress,
        )
    else:
        from benchmarks.serving.driver import measure

        config = {"target": args.target}
        runs = [
            measure(
                args.target,
                "target",
                config,
                workload,
                arrivals,
                slo,
                max_concurrency=args.max_concurrency,
                show_progress=show_progress,
            )
        ]
    return runs, comparison, workload


def _report(
    args: argparse.Namespace,
    workload: Workload,
    arrivals: ArrivalProcess,
    slo: Slo,
    runs: list[RunResult],
    comparison: Comparison | None,
) -> int:
    from benchmarks.serving.plot import plot_latencies
    from benchmarks.serving.report import format_table
    from benchmarks.serving.result import result_document, write_json

    name = args.compare or workload.name
    result_path = args.result_json or Path(f"kvrelay-bench-{name}.json")
    plot_path = args.plot or result_path.with_suffix(".png")
    # argv is the bench's own when run as `kvrelay bench` or `python -m deploy.cli bench`.
    command = shlex.join(["kvrelay", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else ""
    document = result_document(
        workload, arrivals, slo, runs, comparison, command, args.max_concurrency
    )
    write_json(document, result_path)
    title = f"kvrelay bench --compare {args.compare}" if args.compare else "kvrelay bench"
    plot_latencies(runs, plot_path, f"{title}: {workload.name} workload")
    print(format_table(runs, comparison), flush=True)
    print(f"result: {result_path}  plot: {plot_path}", file=sys.stderr)
    return 0
