"""`kvrelay bench`: the serving benchmark (code in `benchmarks/serving/`).

Flags map onto the benchmark's dataclasses here, in one place: the workload, the
arrival process, the SLOs, and for `--compare` the model, cores and layouts of the
clusters it starts itself, its trials and its rate sweep.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
from pathlib import Path

from deploy.cli_errors import UsageError

# The colocated baseline's chunked-prefill budget (benchmarks.serving.compare's
# COLOCATED_TOKEN_BUDGET, measured; not imported, so --help loads no benchmark code).
COLOCATED_TOKEN_BUDGET = 256

EPILOG = """\
examples:
  # against a running cluster (kvrelay serve ... / kvrelay up)
  kvrelay bench --target localhost:50051 --workload random --num-prompts 64 \\
      --input-len 256 --output-len 64 --request-rate 4 --slo ttft_ms=500,tpot_ms=100
  kvrelay bench --workload jsonl --dataset prompts.jsonl --output-len 128

  # configurations started here on the same cores, in interleaved trials
  # (A, B, A, B, ...; --num-trials, 3 by default), each run on a fresh cluster
  kvrelay bench --compare prefix-cache --model dummy:135m --cores 0,1 \\
      --workload shared-prefix --num-groups 8 --prompts-per-group 8 \\
      --prefix-len 1024 --question-len 64 --output-len 64
  kvrelay bench --compare kv-cache-dtype --model dummy:135m --cores 0,1 \\
      --workload shared-prefix --num-groups 8 --prompts-per-group 4 --prefix-len 1024
  kvrelay bench --compare disagg-vs-colocated --model dummy:135m --cores 0,1 \\
      --workload mixed --num-prompts 32 --long-len 1024 --request-rate 1
  kvrelay bench --compare overhead --model dummy:135m --cores 0,1 --num-trials 30

  # colocated, disaggregated and conditional side by side: tails, interference, goodput
  kvrelay bench --compare colocated-disagg-conditional --model dummy:135m --cores 0,1 \\
      --workload mixed --num-prompts 32 --short-len 64 --long-len 1024 --long-every 4 \\
      --output-len 64 --request-rate 0.2 --slo ttft_ms=10000,itl_ms=300
  # ... and the highest rate each meets the SLO at: rates 0.05, 0.075, 0.1125, ...
  kvrelay bench --compare colocated-disagg-conditional ... --sweep-rate 0.05x1.5
  # decode capacity held equal: colocated on core 1 only
  kvrelay bench --compare colocated-disagg-conditional ... --colocated-cores 1
  # the colocated chunked-prefill budget: 512 (the default), 1024, 256, 128, 64
  kvrelay bench --compare colocated-token-budget --model dummy:135m --cores 0,1 \\
      --workload mixed --num-prompts 8 --long-len 1024 --output-len 32 --request-rate 0.5 \\
      --slo ttft_ms=10000,itl_ms=300

Prompts are random token ids of exact lengths (JSONL: "prompt" text or
"prompt_token_ids", optional "output_len" per line); EOS is ignored, so every
request generates exactly --output-len tokens. Writes a table to stdout (with
several trials each cell is the median [min–max] over them, and a goal is met only
when every trial meets it), the result as JSON (--result-json) and a PNG (--plot):
latency CDFs, the ITL tail down to its maximum, the short requests' gaps against
the long prompts' prefill intervals, and goodput against the rate of a sweep.

--sweep-rate RATES climbs a ladder of arrival rates, "0.1,0.2,0.4" or STARTxFACTOR
("0.05x1.5": 0.05, 0.075, 0.1125, ..., --sweep-max-steps rates). At each rate every
configuration still climbing runs its trials; one stops after the first rate at
which its median goodput is no higher than at a lower rate. Reported: goodput and
SLO attainment per rate, and per configuration the highest rate at which >= 90%
of the requests meet the SLO (at that rate and every lower one).
"""

WORKLOADS = ("random", "shared-prefix", "mixed", "jsonl")
COMPARE_KINDS = (
    "disagg-vs-colocated",
    "colocated-disagg-conditional",
    "colocated-token-budget",
    "prefix-cache",
    "kv-cache-dtype",
    "overhead",
)


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
        help="start configurations here on the same cores and compare them",
    )
    where.add_argument("--model", default="dummy:tiny", help="--compare: model of the clusters")
    where.add_argument(
        "--cores", help="--compare: cores to pin workers to, e.g. 0,1 (default: the first two)"
    )
    where.add_argument(
        "--num-trials",
        type=int,
        help="--compare: interleaved trials of every configuration (default 3); "
        "overhead: sequential prompts (default 30)",
    )
    where.add_argument(
        "--colocated-cores",
        metavar="CORES",
        help="--compare: the colocated configuration's cores, among --cores (default: all "
        "of them); e.g. 1 holds decode capacity equal to a disaggregated decode worker's",
    )
    where.add_argument(
        "--colocated-token-budget",
        type=int,
        default=COLOCATED_TOKEN_BUDGET,
        metavar="TOKENS",
        help="--compare: the colocated decode workers' tokens per step, the chunk they "
        "prefill a prompt in (their --max-num-batched-tokens; default: %(default)s, the "
        "best of --compare colocated-token-budget here; the workers' own default is 512)",
    )
    where.add_argument(
        "--max-local-prefill-len",
        type=int,
        default=256,
        metavar="TOKENS",
        help="--compare colocated-disagg-conditional: the conditional decode worker "
        "prefills prompts up to this long itself, a prefill worker longer ones "
        "(default: %(default)s)",
    )
    where.add_argument(
        "--sweep-rate",
        metavar="RATES",
        help="--compare: climb these arrival rates until goodput stops growing "
        '("0.1,0.2,0.4" or STARTxFACTOR, e.g. "0.05x1.5"; see below)',
    )
    where.add_argument(
        "--sweep-max-steps",
        type=int,
        default=8,
        help="rates in a STARTxFACTOR ladder (default: %(default)s)",
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
    arrive = parser.add_argument_group("arrivals and SLOs")
    arrive.add_argument(
        "--request-rate", type=float, default=math.inf, help="requests/s (default: all at once)"
    )
    arrive.add_argument(
        "--max-concurrency", type=int, help="requests in flight at most (1: sequential)"
    )
    arrive.add_argument("--burstiness", type=float, default=1.0, help="1: Poisson; <1: burstier")
    arrive.add_argument(
        "--slo",
        default="",
        metavar="ttft_ms=X,tpot_ms=Y,itl_ms=Z",
        help="goodput objectives (ms; also e2e_ms); itl_ms bounds each request's p99 gap",
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


def _colocated_cores(text: str | None, cores: tuple[int, ...]) -> tuple[int, ...]:
    """The colocated configuration's cores (empty: all of `cores`)."""
    if text is None:
        return ()
    try:
        chosen = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--colocated-cores {text!r}: expected core numbers") from None
    outside = sorted(set(chosen) - set(cores))
    if outside:
        raise UsageError(f"--colocated-cores: cores {outside} are not in --cores {list(cores)}")
    return chosen


def _check_comparison_flags(args: argparse.Namespace) -> None:
    if args.sweep_rate is not None and args.compare in (None, "overhead"):
        raise UsageError("--sweep-rate needs --compare with clusters (not overhead)")
    if args.sweep_rate is not None and not args.slo:
        raise UsageError("--sweep-rate needs --slo (e.g. ttft_ms=10000,itl_ms=300)")


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through the clusters' cleanup, as Ctrl-C does


def run(args: argparse.Namespace) -> int:
    # The benchmark's modules load here, so `--help` stays fast and the CLI does not
    # depend on benchmark code until a benchmark runs.
    from benchmarks.serving.command import BenchInputs, run_bench

    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise UsageError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    _check_comparison_flags(args)
    cores = _cores(args.cores) if args.compare is not None else ()
    args.colocated_cores = _colocated_cores(args.colocated_cores, cores)
    try:
        inputs = BenchInputs.from_args(args, cores)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return run_bench(args, inputs, cores)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
