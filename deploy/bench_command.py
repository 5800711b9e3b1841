"""`kvrelay bench`: the serving benchmark (code in `benchmarks/serving/`).

Flags map onto the benchmark's dataclasses here, in one place: the workload, the
arrival process, the SLOs, and for `--compare` the model and cores of the clusters
it starts itself.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from deploy.cli_errors import UsageError

if TYPE_CHECKING:  # the benchmark's modules load in `run`, so `--help` stays fast
    from benchmarks.serving.arrivals import ArrivalProcess
    from benchmarks.serving.metrics import Slo
    from benchmarks.serving.result import Comparison, RunResult
    from benchmarks.serving.workload import Workload

EPILOG = """\
examples:
  # against a running cluster (kvrelay serve ... / kvrelay up)
  kvrelay bench --target localhost:50051 --workload random --num-prompts 64 \\
      --input-len 256 --output-len 64 --request-rate 4 --slo ttft_ms=500,tpot_ms=100
  kvrelay bench --workload jsonl --dataset prompts.jsonl --output-len 128

  # two configurations started here, one after the other, on the same cores
  kvrelay bench --compare prefix-cache --model dummy:135m --cores 0,1 \\
      --workload shared-prefix --num-groups 8 --prompts-per-group 8 \\
      --prefix-len 1024 --question-len 64 --output-len 64
  kvrelay bench --compare disagg-vs-colocated --model dummy:135m --cores 0,1 \\
      --workload mixed --num-prompts 32 --long-len 1024 --request-rate 1
  kvrelay bench --compare overhead --model dummy:135m --cores 0,1 --num-trials 30

Prompts are random token ids of exact lengths (JSONL: "prompt" text or
"prompt_token_ids", optional "output_len" per line); EOS is ignored, so every
request generates exactly --output-len tokens. Writes a table to stdout, the
result as JSON (--result-json) and a PNG of the latency CDFs (--plot).
"""

WORKLOADS = ("random", "shared-prefix", "mixed", "jsonl")
COMPARE_KINDS = ("disagg-vs-colocated", "prefix-cache", "overhead")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark serving: latency, throughput, goodput, prefix-cache hits",
        description="Drive a kvrelay cluster through Generate and report serving metrics.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_argument_group("what to benchmark")
    where.add_argument(
        "--target", default="localhost:50051", help="router HOST:PORT (default: %(default)s)"
    )
    where.add_argument(
        "--compare",
        choices=COMPARE_KINDS,
        help="start two configurations here on the same cores and compare them",
    )
    where.add_argument("--model", default="dummy:tiny", help="--compare: model of the clusters")
    where.add_argument(
        "--cores", help="--compare: cores to pin workers to, e.g. 0,1 (default: the first two)"
    )
    load = parser.add_argument_group("workload")
    load.add_argument("--workload", choices=WORKLOADS, default="random")
    load.add_argument("--num-prompts", type=int, default=16, help="random, mixed, jsonl")
    load.add_argument("--input-len", type=int, help="random: prompt tokens (default 128)")
    load.add_argument("--output-len", type=int, default=32, help="generated tokens per request")
    load.add_argument("--num-groups", type=int, default=8, help="shared-prefix: groups")
    load.add_argument("--prompts-per-group", type=int, default=8, help="shared-prefix")
    load.add_argument("--prefix-len", type=int, default=1024, help="shared-prefix: tokens")
    load.add_argument("--question-len", type=int, default=64, help="shared-prefix: tokens")
    load.add_argument("--short-len", type=int, default=64, help="mixed: short prompt tokens")
    load.add_argument("--long-len", type=int, default=1024, help="mixed: long prompt tokens")
    load.add_argument("--long-every", type=int, default=4, help="mixed: every n-th is long")
    load.add_argument("--dataset", type=Path, help="jsonl: the file")
    load.add_argument("--seed", type=int, default=0, help="workload and arrival seed")
    load.add_argument("--num-trials", type=int, default=30, help="overhead: sequential trials")
    arrive = parser.add_argument_group("arrivals and SLOs")
    arrive.add_argument(
        "--request-rate", type=float, default=math.inf, help="requests/s (default: all at once)"
    )
    arrive.add_argument(
        "--max-concurrency", type=int, help="requests in flight at most (1: sequential)"
    )
    arrive.add_argument("--burstiness", type=float, default=1.0, help="1: Poisson; <1: burstier")
    arrive.add_argument(
        "--slo", default="", metavar="ttft_ms=X,tpot_ms=Y", help="goodput objectives (ms)"
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--result-json", type=Path, help="result file (default: kvrelay-bench-NAME.json)"
    )
    out.add_argument("--plot", type=Path, help="latency PNG (default: the result's name, .png)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.set_defaults(run=run)


def _cores(text: str | None) -> tuple[int, ...]:
    """The cores the compared clusters' workers are pinned to (at least 2)."""
    allowed = sorted(os.sched_getaffinity(0))
    if text is None:
        cores = tuple(allowed[:2])
    else:
        try:
            cores = tuple(int(part) for part in text.split(","))
        except ValueError:
            raise UsageError(f"--cores {text!r}: expected comma-separated core numbers") from None
    if len(cores) < 2:
        raise UsageError(f"--compare needs at least 2 cores, got {list(cores)} (see --cores)")
    missing = sorted(set(cores) - set(allowed))
    if missing:
        raise UsageError(f"--cores: cores {missing} are not available here (allowed: {allowed})")
    return cores


def _workload(args: argparse.Namespace) -> Workload:
    from benchmarks.serving import workload as w

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
        raise UsageError("--workload jsonl needs --dataset FILE")
    return w.jsonl_workload(args.dataset, args.output_len, args.num_prompts)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through the clusters' cleanup, as Ctrl-C does


def run(args: argparse.Namespace) -> int:
    from benchmarks.serving.arrivals import ArrivalProcess
    from benchmarks.serving.metrics import Slo

    try:
        slo = Slo.parse(args.slo)
        arrivals = ArrivalProcess(args.request_rate, args.burstiness, args.seed)
        workload = _workload(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise UsageError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        runs, comparison, workload = _run_benchmark(args, workload, arrivals, slo)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    return _report(args, workload, arrivals, slo, runs, comparison)


def _run_benchmark(
    args: argparse.Namespace, workload: Workload, arrivals: ArrivalProcess, slo: Slo
) -> tuple[list[RunResult], Comparison | None, Workload]:
    """(runs, comparison or None, workload), the overhead comparison making its own."""
    show_progress = not args.no_progress
    comparison = None
    if args.compare == "overhead":
        from benchmarks.serving.overhead import run_overhead

        workload, runs, comparison = run_overhead(
            args.model,
            _cores(args.cores),
            args.num_trials,
            args.input_len or 16,
            show_progress=show_progress,
        )
    elif args.compare is not None:
        from benchmarks.serving.compare import run_comparison

        runs, comparison = run_comparison(
            args.compare,
            args.model,
            _cores(args.cores),
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
