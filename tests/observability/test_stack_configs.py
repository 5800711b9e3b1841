"""The checked-in observability stack (no Docker here): every file parses, the
Collector routes OTLP to Jaeger, Prometheus scrapes the documented ports, Grafana's
datasources and dashboard fit together, and every metric a panel queries is one the
services export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from exposition import dashboard_queries, exported_names, queried_names
from prometheus_client import generate_latest

from telemetry.metrics import ServiceMetrics, Snapshot

STACK = Path(__file__).resolve().parents[2] / "deploy" / "observability"
DASHBOARD = STACK / "grafana" / "dashboards" / "kvrelay.json"


def load(relative: str) -> dict:
    return yaml.safe_load((STACK / relative).read_text())


def test_compose_mounts_existing_files_and_publishes_the_ui_ports():
    compose = load("docker-compose.yml")
    assert set(compose["services"]) == {"otel-collector", "jaeger", "prometheus", "grafana"}
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (STACK / source).exists(), f"{name} mounts missing {source}"
    published = {
        name: sorted(int(p.split(":")[0]) for p in service.get("ports", []))
        for name, service in compose["services"].items()
    }
    assert published == {
        "otel-collector": [4317, 4318],
        "jaeger": [16686],
        "prometheus": [9090],
        "grafana": [3000],
    }
    assert compose["services"]["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"


def test_collector_routes_otlp_traces_to_jaeger():
    collector = load("otel-collector.yaml")
    traces = collector["service"]["pipelines"]["traces"]
    assert traces["receivers"] == ["otlp"]
    assert set(collector["receivers"]["otlp"]["protocols"]) == {"grpc", "http"}
    assert collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert traces["exporters"] == ["otlp/jaeger"]
    assert collector["exporters"]["otlp/jaeger"]["endpoint"] == "jaeger:4317"
    assert all(p in collector["processors"] for p in traces["processors"])


def test_prometheus_scrapes_each_role_on_the_documented_ports():
    config = load("prometheus.yml")
    targets = {
        job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
        for job in config["scrape_configs"]
    }
    assert targets == {
        "kvrelay-router": ["host.docker.internal:9400"],
        "kvrelay-prefill": ["host.docker.internal:9401", "host.docker.internal:9411"],
        "kvrelay-decode": ["host.docker.internal:9402", "host.docker.internal:9412"],
    }
    readme = (STACK / "README.md").read_text()
    for port in (9400, 9401, 9402):
        assert f"--metrics-port {port}" in readme


def test_grafana_provisions_the_dashboard_with_its_datasources():
    datasources = {
        d["uid"]: d
        for d in load("grafana/provisioning/datasources/datasources.yaml")["datasources"]
    }
    assert datasources["prometheus"]["url"] == "http://prometheus:9090"
    assert datasources["jaeger"]["url"] == "http://jaeger:16686"
    provider = load("grafana/provisioning/dashboards/dashboards.yaml")["providers"][0]
    compose = load("docker-compose.yml")
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    dashboard = json.loads(DASHBOARD.read_text())
    titles = [p["title"] for p in dashboard["panels"]]
    for wanted in (
        "Time to first token",
        "Inter-token latency",
        "Throughput",
        "Queue depth",
        "KV pool usage",
        "KV store hit rate",
        "Per-worker load",
    ):
        assert any(t.startswith(wanted) for t in titles), wanted
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] in datasources
        assert panel["targets"], panel["title"]


def test_every_metric_a_panel_queries_is_defined_by_the_services():
    # Every field set: the union of what router, prefill and decode export.
    metrics = ServiceMetrics("m", "decode")
    metrics.report(lambda: Snapshot(**dict.fromkeys(Snapshot.__dataclass_fields__, 0)))
    exported = exported_names(generate_latest(metrics.registry).decode())
    queries = dashboard_queries(DASHBOARD)
    queried = queried_names(queries)
    assert len(queried) >= 15
    assert queried - exported == set()
    # Histogram quantiles go over buckets; every query filters by the model variable.
    for query in queries:
        for name in re.findall(r"histogram_quantile\([^,]+, .*?(kvrelay:\w+)", query):
            assert name.endswith("_bucket"), query
    assert all('model_name=~"$model_name"' in q for q in queries if "label_values" not in q)
