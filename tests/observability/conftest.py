"""One traced, scraped cluster for the observability tests: a real router, prefill
and decode processes on Redis, exporting spans to a real Arize Phoenix, scraped by a
real Prometheus. Every process is stopped by its fixture's finalizer."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_server import PrometheusServer

from deploy.dashboard import DashboardConfig, PhoenixDashboard, start_dashboard
from tests.cluster.local_cluster import LocalCluster, byte_level_tokenizer, free_port
from tests.kvstore.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
DOCS_IMG = ROOT / "docs" / "img"


@pytest.fixture
def screenshot_dir(tmp_path: Path) -> Path:
    """Where the browser tests save their screenshots: `docs/img/` (which the
    README shows) when `KVRELAY_UPDATE_SCREENSHOTS=1`, else the test's own
    temporary directory, so a test run leaves the checkout as it found it."""
    if os.environ.get("KVRELAY_UPDATE_SCREENSHOTS") == "1":
        return DOCS_IMG
    return tmp_path


@pytest.fixture(scope="session")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PhoenixDashboard]:
    config = DashboardConfig(
        workdir=tmp_path_factory.mktemp("phoenix"), port=free_port(), grpc_port=free_port()
    )
    dashboard = start_dashboard(config)
    yield dashboard
    dashboard.stop()


@pytest.fixture(scope="session")
def observed_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("observed-redis"))
    yield server.url
    server.kill()


@pytest.fixture(scope="session")
def observed_cluster(
    hf_checkpoint,
    observed_redis: str,
    phoenix: PhoenixDashboard,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LocalCluster]:
    """Router, one prefill and one decode worker, exporting their spans to Phoenix.
    No local prefill on the decode worker, so every request crosses all three."""
    model = hf_checkpoint("llama_gqa", seed=11)
    byte_level_tokenizer(model)
    env = {**phoenix.otel_env(), "OTEL_BSP_SCHEDULE_DELAY": "200"}
    cluster = LocalCluster(
        str(model),
        observed_redis,
        tmp_path_factory.mktemp("observed-cluster-logs"),
        num_prefill=1,
        num_decode=1,
        env=env,
    )
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def prometheus(
    observed_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusServer]:
    """Scrapes every process of the cluster each second, one job per role."""
    targets: dict[str, list[str]] = {}
    for name, port in observed_cluster.metrics_ports.items():
        role = name.split("-")[0]
        targets.setdefault(f"kvrelay-{role}", []).append(f"127.0.0.1:{port}")
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus"), targets)
    yield server
    server.stop()
