"""What a person sees: headless Chromium opens Phoenix's view of one request's trace
and Prometheus's graph of a kvrelay metric. The screenshots are checked
to exist; `KVRELAY_UPDATE_SCREENSHOTS=1` saves them to docs/img/, which the README shows."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request

import pytest
from headless_chromium import render
from phoenix_client import wait_for_trace

from protos import generator_pb2 as pb

pytestmark = pytest.mark.slow


def test_phoenix_shows_the_trace_of_one_request(
    observed_cluster, phoenix, tmp_path, screenshot_dir
):
    observed_cluster.generate(
        request_id="browser-trace",
        prompt_token_ids=list(range(3, 40)),
        sampling=pb.SamplingParams(max_tokens=8, ignore_eos=True),
    )
    trace = wait_for_trace(phoenix.url, "browser-trace", {"generate", "decode.generation"})
    trace_id = trace[0]["context"]["trace_id"]
    with urllib.request.urlopen(f"{phoenix.url}/v1/projects", timeout=10) as response:
        project_id = json.load(response)["data"][0]["id"]
    url = f"{phoenix.url}/projects/{project_id}/traces/{trace_id}"
    screenshot = screenshot_dir / "phoenix-trace.png"
    dom = render(url, tmp_path / "profile", screenshot=screenshot)
    assert screenshot.stat().st_size > 10_000
    # The span tree of the request, with spans of all three services.
    for span_name in ("generate", "router.prefill", "prefill.forward", "decode.generation"):
        assert span_name in dom, span_name
    assert trace_id in dom or "Trace" in dom


def test_prometheus_graphs_time_to_first_token(
    observed_cluster, prometheus, tmp_path, screenshot_dir
):
    # A rate needs a scrape from before the requests: wait for every target's first.
    deadline = time.monotonic() + 30
    while sum(float(r["value"][1]) for r in prometheus.query("up")) < 3:
        assert time.monotonic() < deadline, "Prometheus did not scrape every process"
        time.sleep(0.5)
    time.sleep(1.5)
    for i in range(3):
        observed_cluster.generate(
            prompt_token_ids=list(range(5 + i, 30 + i)),
            sampling=pb.SamplingParams(max_tokens=6, ignore_eos=True),
        )
    expr = (
        "histogram_quantile(0.9, sum by (le, role) "
        "(rate(kvrelay:time_to_first_token_seconds_bucket[1m])))"
    )
    # The graph needs the rate over scrapes taken before and after the requests.
    deadline = time.monotonic() + 30
    while not any(
        r["metric"].get("role") == "router" and r["value"][1] != "NaN"
        for r in prometheus.query(expr)
    ):
        assert time.monotonic() < deadline, "Prometheus has no TTFT rate for the router"
        time.sleep(0.5)
    query = urllib.parse.urlencode(
        {"g0.expr": expr, "g0.tab": "0", "g0.range_input": "5m", "g0.stacked": "0"}
    )
    screenshot = screenshot_dir / "prometheus-ttft.png"
    dom = render(
        f"{prometheus.url}/graph?{query}",
        tmp_path / "profile",
        screenshot=screenshot,
        window_size=(1400, 900),
    )
    assert screenshot.stat().st_size > 10_000
    assert "kvrelay:time_to_first_token_seconds_bucket" in dom
    assert "No datapoints found" not in dom
    # The graph's legend names a series per role that observed a first token.
    assert 'role="router"' in dom
