"""End to end: `kvrelay bench --target` against a real cluster of processes
(router, prefill and decode workers on their own redis-server), checking the JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.serving.launcher import BenchCluster, disaggregated_layout

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny_cluster(tmp_path: Path) -> Iterator[BenchCluster]:
    allowed = sorted(os.sched_getaffinity(0))
    cores = (allowed[0], allowed[-1])  # the same core twice on a one-core machine
    logdir = tmp_path / "logs"
    logdir.mkdir()
    cluster = BenchCluster(disaggregated_layout("dummy:tiny", cores), logdir)
    with cluster:
        processes = list(cluster.processes.values())
        assert len(processes) == 4  # redis, router, prefill, decode
        yield cluster
    assert [p.poll() is None for p in processes] == [False] * 4


@pytest.mark.slow
@pytest.mark.redis
def test_bench_against_a_cluster_writes_the_result(tiny_cluster: BenchCluster, tmp_path) -> None:
    result_path = tmp_path / "result.json"
    # Sequential requests (--max-concurrency 1), so each group's later prompts find
    # the prefix the first one published: its 2 full blocks of 16 tokens.
    command = [
        sys.executable,
        "-m",
        "deploy.cli",
        "bench",
        "--target",
        tiny_cluster.target,
        "--workload",
        "shared-prefix",
        "--num-groups",
        "2",
        "--prompts-per-group",
        "2",
        "--prefix-len",
        "32",
        "--question-len",
        "8",
        "--output-len",
        "4",
        "--max-concurrency",
        "1",
        "--slo",
        "ttft_ms=60000",
        "--result-json",
        str(result_path),
        "--no-progress",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "TTFT (ms) p50" in done.stdout
    result = json.loads(result_path.read_text())
    assert result_path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    (run,) = result["runs"]
    metrics = run["metrics"]
    assert (metrics["num_completed"], metrics["num_failed"]) == (4, 0)
    assert metrics["num_prompt_tokens"] == 4 * 40
    assert metrics["num_output_tokens"] == 4 * 4
    assert [r["cached_prompt_tokens"] for r in run["requests"]] == [0, 32, 0, 32]
    assert metrics["prefix_cache_hit_rate"] == 64 / 160
    assert metrics["num_good"] == 4
    assert metrics["ttft_ms"]["num_samples"] == 4
    assert metrics["itl_ms"]["num_samples"] == 4 * 3
    assert result["workload"]["name"] == "shared-prefix"
    assert result["max_concurrency"] == 1
    assert result["command"].startswith(f"kvrelay bench --target {tiny_cluster.target} ")
    assert run["config"]["target"] == tiny_cluster.target
    assert len(run["load_avg_before"]) == len(run["load_avg_after"]) == 3
