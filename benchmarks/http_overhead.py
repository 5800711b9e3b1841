"""`python -m benchmarks.http_overhead`: what the router's OpenAI-compatible HTTP API
adds to time-to-first-token over its gRPC API, on one cluster.

One router and one colocated decode worker (it prefills the prompts itself, so
the prefill path adds no variance). Each trial sends the same short request both
ways, in a random order, one after the other: a `Generate` stream over gRPC and a
streamed `/v1/completions` (server-sent events) through the official `openai`
SDK, both as token ids, greedy, each trial with its own prompt so neither finds
it cached. TTFT is the time from the call to the first message that carries text
(the moment an SSE chunk can exist). Both clients keep their connection open, as
real clients do. Reported: both medians, the median and interquartile range of
the paired differences (HTTP minus gRPC), and the load average; goal: HTTP at
most 2 ms more at the median.

    python -m benchmarks.http_overhead
    python -m benchmarks.http_overhead --model dummy:135m --trials 200 --json http.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import grpc

from benchmarks.serving.launcher import BenchCluster, colocated_layout
from benchmarks.serving.workload import TOKEN_ID_LIMIT
from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc

GOAL_MS = 2.0
NUM_WARMUP_TRIALS = 10
OUTPUT_LEN = 4


def grpc_ttft_ms(stub: pb_grpc.GeneratorStub, prompt: list[int]) -> float:
    sampling = pb.SamplingParams(max_tokens=OUTPUT_LEN, temperature=0, ignore_eos=True)
    request = pb.GenerateRequest(prompt_token_ids=prompt, sampling=sampling)
    start = time.perf_counter()
    first = None
    for response in stub.Generate(request, timeout=60):
        if first is None and (response.text or response.finish_reason):
            first = time.perf_counter()
    assert first is not None, "the stream ended without a message"
    return (first - start) * 1000


def http_ttft_ms(client, model: str, prompt: list[int]) -> float:
    start = time.perf_counter()
    first = None
    stream = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=OUTPUT_LEN,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if first is None and chunk.choices:
            first = time.perf_counter()
    assert first is not None, "the stream ended without a chunk"
    return (first - start) * 1000


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def run(model: str, core: int, num_trials: int, prompt_len: int, seed: int) -> dict:
    import openai

    rng = random.Random(seed)
    layout = colocated_layout(model, (core,), name="http-overhead")
    load_at_start = os.getloadavg()
    with BenchCluster(layout, http_port=0) as cluster:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{cluster.http_port}/v1", api_key="unused", max_retries=0
        )
        with grpc.insecure_channel(cluster.target) as channel:
            stub = pb_grpc.GeneratorStub(channel)
            grpc_ms: list[float] = []
            http_ms: list[float] = []
            for trial in range(NUM_WARMUP_TRIALS + num_trials):
                prompt = [rng.randrange(TOKEN_ID_LIMIT) for _ in range(prompt_len)]
                # Each side gets its own prompt of the same length (no cache hits).
                other = [rng.randrange(TOKEN_ID_LIMIT) for _ in range(prompt_len)]
                if rng.random() < 0.5:
                    g, h = grpc_ttft_ms(stub, prompt), http_ttft_ms(client, model, other)
                else:
                    h, g = http_ttft_ms(client, model, other), grpc_ttft_ms(stub, prompt)
                if trial >= NUM_WARMUP_TRIALS:
                    grpc_ms.append(g)
                    http_ms.append(h)
        client.close()
    differences = [h - g for h, g in zip(http_ms, grpc_ms, strict=True)]
    return {
        "model": model,
        "num_trials": num_trials,
        "prompt_len": prompt_len,
        "output_len": OUTPUT_LEN,
        "grpc_ttft_p50_ms": statistics.median(grpc_ms),
        "http_ttft_p50_ms": statistics.median(http_ms),
        "p50_difference_ms": statistics.median(http_ms) - statistics.median(grpc_ms),
        "paired_difference_p50_ms": statistics.median(differences),
        "paired_difference_p25_ms": quantile(differences, 0.25),
        "paired_difference_p75_ms": quantile(differences, 0.75),
        "grpc_ttft_p90_ms": quantile(grpc_ms, 0.9),
        "http_ttft_p90_ms": quantile(http_ms, 0.9),
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
            f"http_overhead: {result['model']}, {result['num_trials']} interleaved trials, "
            f"prompt {result['prompt_len']} tokens, {result['output_len']} generated",
            f"  gRPC  TTFT p50 {result['grpc_ttft_p50_ms']:7.2f} ms   p90 "
            f"{result['grpc_ttft_p90_ms']:7.2f} ms",
            f"  HTTP  TTFT p50 {result['http_ttft_p50_ms']:7.2f} ms   p90 "
            f"{result['http_ttft_p90_ms']:7.2f} ms   (openai SDK, SSE)",
            f"  HTTP - gRPC: {difference:+.2f} ms at p50; paired differences p50 "
            f"{result['paired_difference_p50_ms']:+.2f} ms, IQR "
            f"[{result['paired_difference_p25_ms']:+.2f}, {result['paired_difference_p75_ms']:+.2f}] ms",
            f"  goal: at most +{GOAL_MS:g} ms: {verdict}",
            f"  load average (1, 5, 15 min): {load} at start, {load_end} at end; "
            f"{result['num_cpus']} CPUs",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.http_overhead", description=__doc__)
    parser.add_argument("--model", default="dummy:tiny", help="default: %(default)s")
    parser.add_argument("--trials", type=int, default=100, help="default: %(default)s")
    parser.add_argument("--prompt-len", type=int, default=16, help="default: %(default)s")
    parser.add_argument(
        "--core", type=int, help="core of the decode worker (default: the last allowed)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    args = parser.parse_args(argv)
    core = args.core if args.core is not None else max(os.sched_getaffinity(0))
    result = run(args.model, core, args.trials, args.prompt_len, args.seed)
    print(report(result))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
