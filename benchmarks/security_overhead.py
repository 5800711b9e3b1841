"""`python -m benchmarks.security_overhead`: what cluster mTLS and authenticated KV
blocks add to time-to-first-token, against the same cluster without them.

Two disaggregated clusters run side by side on the same cores (a router, a prefill
and a decode worker each, Redis of their own): one plaintext with xxh3-checked
blocks, one with every internal call over mTLS (`kvrelay certs`) and every block
carrying a MAC (`--kv-secret-file`). Each trial sends the same-length prompt (16
tokens by default, token ids, greedy, a prompt of its own per call so nothing is
cached) to both, in a random order, one after the other; TTFT is the time from the
call to the first message carrying text. The router → prefill → store → decode
path is the one secured, so every hop that pays for it is in the measurement.
Reported: both medians, the median and interquartile range of the paired
differences (secure minus plain), and the load average; goal: at most 1 ms more
at the median.

    python -m benchmarks.security_overhead
    python -m benchmarks.security_overhead --model dummy:135m --trials 200 --json sec.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import statistics
import sys
import tempfile
from pathlib import Path

import grpc

from benchmarks.http_overhead import grpc_ttft_ms, quantile
from benchmarks.serving.launcher import BenchCluster, ClusterLayout
from benchmarks.serving.workload import TOKEN_ID_LIMIT
from protos import generator_pb2_grpc as pb_grpc
from rpc.tls import make_cluster_certificates

GOAL_MS = 1.0
NUM_WARMUP_TRIALS = 10


def layouts(model: str, cores: tuple[int, int], secret_file: Path) -> tuple[ClusterLayout, ...]:
    plain = ClusterLayout("plain", model, prefill_cores=cores[:1], decode_cores=cores[1:])
    secure = ClusterLayout(
        "secure",
        model,
        prefill_cores=cores[:1],
        decode_cores=cores[1:],
        extra_worker_args=("--kv-secret-file", str(secret_file)),
    )
    return plain, secure


def run(model: str, cores: tuple[int, int], num_trials: int, prompt_len: int, seed: int) -> dict:
    rng = random.Random(seed)
    workdir = Path(tempfile.mkdtemp(prefix="kvrelay-bench-security-"))
    make_cluster_certificates().write(workdir / "tls")
    secret = workdir / "kv.secret"
    secret.write_bytes(secrets.token_bytes(32))
    plain_layout, secure_layout = layouts(model, cores, secret)
    load_at_start = os.getloadavg()
    with (
        BenchCluster(plain_layout) as plain,
        BenchCluster(secure_layout, tls_dir=workdir / "tls") as secure,
        grpc.insecure_channel(plain.target) as plain_channel,
        grpc.insecure_channel(secure.target) as secure_channel,
    ):
        stubs = {
            "plain": pb_grpc.GeneratorStub(plain_channel),
            "secure": pb_grpc.GeneratorStub(secure_channel),
        }
        times: dict[str, list[float]] = {"plain": [], "secure": []}
        for trial in range(NUM_WARMUP_TRIALS + num_trials):
            order = ["plain", "secure"]
            rng.shuffle(order)
            for name in order:
                prompt = [rng.randrange(TOKEN_ID_LIMIT) for _ in range(prompt_len)]
                ms = grpc_ttft_ms(stubs[name], prompt)
                if trial >= NUM_WARMUP_TRIALS:
                    times[name].append(ms)
    differences = [s - p for s, p in zip(times["secure"], times["plain"], strict=True)]
    return {
        "model": model,
        "num_trials": num_trials,
        "prompt_len": prompt_len,
        "plain_ttft_p50_ms": statistics.median(times["plain"]),
        "secure_ttft_p50_ms": statistics.median(times["secure"]),
        "p50_difference_ms": statistics.median(times["secure"]) - statistics.median(times["plain"]),
        "paired_difference_p50_ms": statistics.median(differences),
        "paired_difference_p25_ms": quantile(differences, 0.25),
        "paired_difference_p75_ms": quantile(differences, 0.75),
        "plain_ttft_p90_ms": quantile(times["plain"], 0.9),
        "secure_ttft_p90_ms": quantile(times["secure"], 0.9),
        "load_avg_at_start": list(load_at_start),
        "load_avg_at_end": list(os.getloadavg()),
        "num_cpus": os.cpu_count(),
    }


def report(result: dict) -> str:
    difference = result["p50_difference_ms"]
    verdict = "within" if difference <= GOAL_MS else "OVER"
    load = ", ".join(f"{x:.2f}" for x in result["load_avg_at_start"])
    load_end = ", ".join(f"{x:.2f}" for x in result["load_avg_at_end"])
    return "\n".join(
        [
            f"security_overhead: {result['model']}, {result['num_trials']} interleaved trials, "
            f"prompt {result['prompt_len']} tokens, disaggregated (router, prefill, decode)",
            f"  plain   TTFT p50 {result['plain_ttft_p50_ms']:7.2f} ms   p90 "
            f"{result['plain_ttft_p90_ms']:7.2f} ms",
            f"  secure  TTFT p50 {result['secure_ttft_p50_ms']:7.2f} ms   p90 "
            f"{result['secure_ttft_p90_ms']:7.2f} ms   (mTLS inside, KV MAC)",
            f"  secure - plain: {difference:+.2f} ms at p50; paired differences p50 "
            f"{result['paired_difference_p50_ms']:+.2f} ms, IQR "
            f"[{result['paired_difference_p25_ms']:+.2f}, {result['paired_difference_p75_ms']:+.2f}] ms",
            f"  goal: at most +{GOAL_MS:g} ms: {verdict}",
            f"  load average (1, 5, 15 min): {load} at start, {load_end} at end; "
            f"{result['num_cpus']} CPUs",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.security_overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="dummy:tiny", help="default: %(default)s")
    parser.add_argument("--trials", type=int, default=100, help="default: %(default)s")
    parser.add_argument("--prompt-len", type=int, default=16, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    args = parser.parse_args(argv)
    allowed = sorted(os.sched_getaffinity(0))
    cores = (allowed[0], allowed[-1])
    result = run(args.model, cores, args.trials, args.prompt_len, args.seed)
    print(report(result))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
