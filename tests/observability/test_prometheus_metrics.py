"""A real Prometheus scrapes every process of a real cluster under load; its HTTP API
answers TTFT histograms and KV pool usage per role, equal to what the services say."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from exposition import dashboard_queries, exported_names, queried_names, sample_value

from protos import generator_pb2 as pb
from tests.observability.conftest import ROOT

pytestmark = pytest.mark.slow

DASHBOARD = ROOT / "deploy/observability/grafana/dashboards/kvrelay.json"
NUM_REQUESTS = 6


def wait_until(predicate, timeout_s: float = 30.0, what: str = ""):
    """Polls `predicate` until it returns `(True, value)`; returns the value."""
    deadline = time.monotonic() + timeout_s
    while True:
        is_done, value = predicate()
        if is_done:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}; last: {value}")
        time.sleep(0.5)


def ttft_count(cluster, name: str) -> float:
    return sample_value(cluster.metrics(name), "kvrelay:time_to_first_token_seconds_count")


def test_prometheus_reads_ttft_and_kv_pool_usage_from_each_role(observed_cluster, prometheus):
    def targets_up() -> tuple[bool, list[dict]]:
        targets = prometheus.get("/api/v1/targets")["activeTargets"]
        is_up = len(targets) == 3 and all(t["health"] == "up" for t in targets)
        return is_up, targets

    targets = wait_until(targets_up, what="every target up")
    assert sorted(t["labels"]["job"] for t in targets) == [
        "kvrelay-decode",
        "kvrelay-prefill",
        "kvrelay-router",
    ]
    before = {name: ttft_count(observed_cluster, name) for name in ("router", "decode-0")}
    prompts = [list(range(3 + i, 3 + i + 20 + 7 * i)) for i in range(NUM_REQUESTS)]
    sampling = pb.SamplingParams(max_tokens=12, ignore_eos=True)
    with ThreadPoolExecutor(3) as pool:
        list(
            pool.map(
                lambda p: observed_cluster.generate(prompt_token_ids=p, sampling=sampling), prompts
            )
        )
    after = {name: ttft_count(observed_cluster, name) for name in ("router", "decode-0")}
    # Every request got its first token through the router and through the decode worker.
    assert {n: after[n] - before[n] for n in after} == {"router": 6, "decode-0": 6}

    def counts_by_role() -> tuple[bool, dict[str, float]]:
        result = prometheus.query("sum by (role) (kvrelay:time_to_first_token_seconds_count)")
        counts = {r["metric"]["role"]: float(r["value"][1]) for r in result}
        # The prefill worker has the histogram too, empty: its first token is not
        # the client's (the router's) nor the stream's (the decode worker's).
        expected = {"router": after["router"], "decode": after["decode-0"], "prefill": 0.0}
        return counts == expected, counts

    wait_until(counts_by_role, what="Prometheus to scrape the final TTFT counts")

    p50 = prometheus.query(
        "histogram_quantile(0.5, sum by (le, role) (kvrelay:time_to_first_token_seconds_bucket))"
    )
    quantiles = {r["metric"]["role"]: float(r["value"][1]) for r in p50}
    assert set(quantiles) == {"router", "decode", "prefill"}
    assert math.isnan(quantiles.pop("prefill"))
    assert all(0 < q < 80 for q in quantiles.values()), quantiles
    ranged = prometheus.query(
        "histogram_quantile(0.95, sum by (le, role) "
        "(increase(kvrelay:time_to_first_token_seconds_bucket[2m])))"
    )
    ranged_roles = {r["metric"]["role"] for r in ranged if not math.isnan(float(r["value"][1]))}
    assert ranged_roles == {"router", "decode"}

    usage = prometheus.query("kvrelay:kv_cache_usage_perc")
    # Only decode workers own a paged pool; the labels name the model and the role.
    assert [(r["metric"]["role"], r["metric"]["model_name"]) for r in usage] == [
        ("decode", observed_cluster.model)
    ]
    direct = sample_value(observed_cluster.metrics("decode-0"), "kvrelay:kv_cache_usage_perc")
    assert float(usage[0]["value"][1]) == direct == 0.0  # all requests finished

    waiting = prometheus.query("kvrelay:num_requests_waiting")
    assert sorted(r["metric"]["role"] for r in waiting) == ["decode", "prefill"]
    hits = prometheus.query("sum by (role) (kvrelay:kv_store_hits_total)")
    assert {r["metric"]["role"] for r in hits} == {"decode", "prefill"}


def test_every_metric_the_grafana_dashboard_queries_is_exported(observed_cluster, prometheus):
    exported = set().union(
        *(exported_names(observed_cluster.metrics(name)) for name in observed_cluster.processes)
    )
    queried = queried_names(dashboard_queries(DASHBOARD))
    assert queried, "the dashboard queries no kvrelay metric"
    assert queried - exported == set()
    # And Prometheus knows each one from its scrapes.
    known = set(prometheus.get("/api/v1/label/__name__/values"))
    assert queried - known == set()
