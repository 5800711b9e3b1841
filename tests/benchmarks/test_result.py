"""The result document (JSON schema), comparisons, the table and the PNG."""

from __future__ import annotations

import json

import pytest

from benchmarks.serving.arrivals import ArrivalProcess
from benchmarks.serving.metrics import Slo, compute_metrics
from benchmarks.serving.plot import plot_latencies
from benchmarks.serving.report import format_table
from benchmarks.serving.result import (
    SCHEMA_VERSION,
    RunResult,
    compare,
    metric_value,
    result_document,
    write_json,
)
from benchmarks.serving.workload import random_workload
from tests.benchmarks.records import hand_made_records


def run(name: str, scale: float = 1.0) -> RunResult:
    """The hand-made records with every latency multiplied by `scale`."""
    records = hand_made_records()
    for r in records:
        r.token_times = [r.send_time + (t - r.send_time) * scale for t in r.token_times]
        r.end_time = r.send_time + (r.end_time - r.send_time) * scale
    return RunResult(name, {"cores": [0, 1]}, compute_metrics(records, 4.0, Slo()), records)


def test_compare_by_ratio_and_by_difference() -> None:
    baseline, candidate = run("colocated"), run("disaggregated", scale=0.5)
    assert metric_value(baseline.metrics, "ttft_ms.p50") == 100.0
    by_ratio = compare(baseline, candidate, "ttft_ms.p50", max_ratio=0.5)
    assert (by_ratio.ratio, by_ratio.difference) == (0.5, -50.0)
    assert (by_ratio.goal, by_ratio.is_met) == ("ratio <= 0.5", True)
    missed = compare(baseline, candidate, "ttft_ms.p50", max_ratio=0.2)
    assert (missed.goal, missed.is_met) == ("ratio <= 0.2", False)
    slower = compare(candidate, baseline, "ttft_ms.p50", max_difference=5)
    assert (slower.difference, slower.goal, slower.is_met) == (50.0, "difference <= 5", False)
    with pytest.raises(ValueError, match="exactly one"):
        compare(baseline, candidate, "ttft_ms.p50")


def test_result_document_schema(tmp_path) -> None:
    workload = random_workload(num_prompts=4, input_len=10, output_len=4)
    runs = [run("prefix-cache-off"), run("prefix-cache-on", scale=0.5)]
    comparison = compare(runs[0], runs[1], "ttft_ms.p50", max_ratio=0.2)
    document = result_document(
        workload, ArrivalProcess(rate=2.0), Slo(ttft_ms=200), runs, comparison, "kvrelay bench", 1
    )
    path = tmp_path / "out" / "result.json"
    write_json(document, path)
    loaded = json.loads(path.read_text())
    assert set(loaded) == {
        "schema_version",
        "created",
        "command",
        "machine",
        "workload",
        "arrivals",
        "max_concurrency",
        "slo",
        "runs",
        "comparison",
    }
    assert loaded["schema_version"] == SCHEMA_VERSION
    assert loaded["workload"]["num_requests"] == 4
    assert loaded["arrivals"] == {"rate": 2.0, "burstiness": 1.0, "seed": 0}
    assert loaded["slo"] == {"ttft_ms": 200, "tpot_ms": None, "e2e_ms": None, "itl_ms": None}
    assert [r["name"] for r in loaded["runs"]] == ["prefix-cache-off", "prefix-cache-on"]
    metrics = loaded["runs"][1]["metrics"]
    assert metrics["ttft_ms"]["p50"] == pytest.approx(50.0)
    assert metrics["prefix_cache_hit_rate"] == 0.4
    rows = loaded["runs"][0]["requests"]
    assert [r["output_tokens"] for r in rows] == [4, 3, 1, 0]
    assert rows[1]["cached_prompt_tokens"] == 16
    assert rows[3]["ttft_ms"] is None
    assert rows[3]["error"] == "UNAVAILABLE: no decode worker"
    assert loaded["comparison"]["ratio"] == pytest.approx(0.5)
    assert loaded["comparison"]["is_met"] is False


def test_table_has_a_column_per_run_and_the_verdict() -> None:
    runs = [run("colocated"), run("disaggregated", scale=0.5)]
    table = format_table(runs, compare(runs[0], runs[1], "itl_ms.p99", max_ratio=0.6))
    lines = table.splitlines()
    assert lines[0].split() == ["colocated", "disaggregated"]
    assert "TTFT (ms) p50" in table
    assert next(line for line in lines if line.startswith("ITL (ms) p99")).split()[-2:] == [
        "98.00",
        "49.00",
    ]
    assert lines[-1] == (
        "itl_ms.p99: disaggregated 49.00 vs colocated 98.00: ratio 0.500, "
        "difference -49.00 (goal ratio <= 0.6: met)"
    )


def test_plot_writes_a_png(tmp_path) -> None:
    path = tmp_path / "plots" / "latency.png"
    plot_latencies([run("a"), run("b", scale=2.0)], path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
