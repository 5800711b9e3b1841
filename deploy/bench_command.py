"""`kvrelay bench`: the serving benchmark (code in `benchmarks/serving/`).

Flags map onto the benchmark's dataclasses here, in one place: the workload, the
arrival process, the SLOs, and for `--compare` the model and cores of the clusters
it starts itself.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
from pathlib import Path

from deploy.cli_errors import UsageError

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
  kvrelay bench --compare kv-cache-dtype --model dummy:135m --cores 0,1 \\
      --workload shared-prefix --num-groups 8 --prompts-per-group 4 --prefix-len 1024
  kvrelay bench --compare disagg-vs-colocated --model dummy:135m --cores 0,1 \\
      --workload mixed --num-prompts 32 --long-len 1024 --request-rate 1
  kvrelay bench --compare overhead --model dummy:135m --cores 0,1 --num-trials 30

Prompts are random token ids of exact lengths (JSONL: "prompt" text or
"prompt_token_ids", optional "output_len" per line); EOS is ignored, so every
request generates exactly --output-len tokens. Writes a table to stdout, the
result as JSON (--result-json) and a PNG of the latency CDFs (--plot).
"""

WORKLOADS = ("random", "shared-prefix", "mixed", "jsonl")
COMPARE_KINDS = ("disagg-vs-colocated", "prefix-cache", "kv-cache-dtype", "overhead")


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


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through the clusters' cleanup, as Ctrl-C does


def run(args: argparse.Namespace) -> int:
    # The benchmark's modules load here, so `--help` stays fast and the CLI does not
    # depend on benchmark code until a benchmark runs.
    from benchmarks.serving.command import BenchInputs, run_bench

    try:
        inputs = BenchInputs.from_args(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise UsageError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    cores = _cores(args.cores) if args.compare is not None else ()
    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return run_bench(args, inputs, cores)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
