"""The result document (JSON schema), goals over one trial, the table and the PNG."""

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
    metric_value,
    result_document,
    trial_metrics,
    write_json,
)
from benchmarks.serving.trials import Goal, check_goal
from benchmarks.serving.workload import random_workload
from tests.benchmarks.records import hand_made_records


def run(name: str, scale: float = 1.0) -> RunResult:
    """The hand-made records with every latency multiplied by `scale`."""
    records = hand_made_records()
    for r in records:
        r.token_times = [r.send_time + (t - r.send_time) * scale for t in r.token_times]
        r.end_time = r.send_time + (r.end_time - r.send_time) * scale
    metrics = compute_metrics(records, 4.0, Slo())
    return RunResult(name, {"cores": [0, 1]}, metrics, records, 0, (1.0, 2.0, 3.0), (1.5, 2, 3))


def test_goals_by_ratio_and_by_difference() -> None:
    baseline, candidate = run("colocated"), run("disaggregated", scale=0.5)
    assert metric_value(baseline.metrics, "ttft_ms.p50") == 100.0
    trials = trial_metrics([baseline, candidate])
    by_ratio = check_goal(Goal("ttft_ms.p50", "disaggregated", "colocated", at_most=0.5), trials)
    assert (by_ratio.spread.median, by_ratio.goal.bound, by_ratio.is_met) == (0.5, "<= 0.5", True)
    missed = check_goal(Goal("ttft_ms.p50", "disaggregated", "colocated", at_most=0.2), trials)
    assert (missed.goal.describe(), missed.is_met) == (
        "ttft_ms.p50 disaggregated / colocated <= 0.2",
        False,
    )
    slower = check_goal(
        Goal("ttft_ms.p50", "colocated", "disaggregated", by="difference", at_most=5), trials
    )
    assert (slower.spread.median, slower.goal.describe(), slower.is_met) == (
        50.0,
        "ttft_ms.p50 colocated - disaggregated <= 5",
        False,
    )
    with pytest.raises(ValueError, match="at most one bound"):
        Goal("ttft_ms.p50", "colocated", at_most=1, at_least=0)


def test_result_document_schema(tmp_path) -> None:
    workload = random_workload(num_prompts=4, input_len=10, output_len=4)
    runs = [run("prefix-cache-off"), run("prefix-cache-on", scale=0.5)]
    goal = check_goal(
        Goal("ttft_ms.p50", "prefix-cache-on", "prefix-cache-off", at_most=0.2),
        trial_metrics(runs),
    )
    document = result_document(
        workload, ArrivalProcess(rate=2.0), Slo(ttft_ms=200), runs, [goal], "kvrelay bench", 1
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
        "num_trials",
        "runs",
        "summary",
        "goals",
        "sweep",
    }
    assert loaded["schema_version"] == SCHEMA_VERSION
    assert loaded["workload"]["num_requests"] == 4
    assert loaded["arrivals"] == {"rate": 2.0, "burstiness": 1.0, "seed": 0}
    assert loaded["slo"] == {"ttft_ms": 200, "tpot_ms": None, "e2e_ms": None, "itl_ms": None}
    assert loaded["num_trials"] == 1
    assert [r["name"] for r in loaded["runs"]] == ["prefix-cache-off", "prefix-cache-on"]
    assert loaded["runs"][0]["trial"] == 0
    assert loaded["runs"][0]["load_avg_before"] == [1.0, 2.0, 3.0]
    assert loaded["runs"][0]["load_avg_after"] == [1.5, 2, 3]
    metrics = loaded["runs"][1]["metrics"]
    assert metrics["ttft_ms"]["p50"] == pytest.approx(50.0)
    assert metrics["prefix_cache_hit_rate"] == 0.4
    rows = loaded["runs"][0]["requests"]
    assert [r["output_tokens"] for r in rows] == [4, 3, 1, 0]
    assert rows[1]["cached_prompt_tokens"] == 16
    assert rows[3]["ttft_ms"] is None
    assert rows[3]["error"] == "UNAVAILABLE: no decode worker"
    # Seconds after the run's first send (request 0 at 0.0): request 1 was sent at 1.0.
    assert (rows[1]["send_s"], rows[1]["token_times_s"]) == (1.0, [1.3, 1.3, 1.4])
    assert loaded["summary"]["prefix-cache-on"]["ttft_ms.p50"] == {
        "values": [pytest.approx(50.0)],
        "median": pytest.approx(50.0),
        "min": pytest.approx(50.0),
        "max": pytest.approx(50.0),
    }
    (goal_entry,) = loaded["goals"]
    assert goal_entry["spread"]["median"] == pytest.approx(0.5)
    assert goal_entry["description"] == "ttft_ms.p50 prefix-cache-on / prefix-cache-off <= 0.2"
    assert goal_entry["is_met"] is False


def test_table_has_a_column_per_run_and_the_verdict() -> None:
    runs = [run("colocated"), run("disaggregated", scale=0.5)]
    goal = Goal("itl_ms.p99", "disaggregated", "colocated", at_most=0.6)
    table = format_table(runs, [check_goal(goal, trial_metrics(runs))])
    lines = table.splitlines()
    assert lines[0].split() == ["colocated", "disaggregated"]
    assert "TTFT (ms) p50" in table
    assert next(line for line in lines if line.startswith("ITL (ms) p99")).split()[-2:] == [
        "98.00",
        "49.00",
    ]
    assert "load average (1 min) before -> after each run:" in lines
    assert "  trial 1: colocated 1.00 -> 1.50, disaggregated 1.00 -> 1.50" in lines
    assert lines[-1] == "itl_ms.p99 disaggregated / colocated: 0.500 (goal <= 0.6: met)"


def test_plot_writes_a_png(tmp_path) -> None:
    path = tmp_path / "plots" / "latency.png"
    plot_latencies([run("a"), run("b", scale=2.0)], path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
