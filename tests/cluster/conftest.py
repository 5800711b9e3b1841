"""Fixtures of the cluster tests: a redis-server, an OTLP receiver, a model with a
byte-level tokenizer, and the cluster itself; each stopped by its finalizer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.local_cluster import LocalCluster, SpanCollector, byte_level_tokenizer
from tests.kvstore.redis_server import RedisServer


@pytest.fixture(scope="session")
def cluster_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of the cluster tests' own, on a free port."""
    server = RedisServer(tmp_path_factory.mktemp("cluster-redis"))
    yield server.url
    server.kill()


@pytest.fixture(scope="session")
def span_collector() -> Iterator[SpanCollector]:
    collector = SpanCollector()
    yield collector
    collector.stop()


@pytest.fixture(scope="session")
def cluster_model(hf_checkpoint) -> Path:
    """A random Llama (GQA) checkpoint with a byte-level tokenizer (its own seed, so
    the tokenizer file does not change the checkpoints other tests share)."""
    path = hf_checkpoint("llama_gqa", seed=11)
    byte_level_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def cluster(
    cluster_model: Path,
    cluster_redis: str,
    span_collector: SpanCollector,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LocalCluster]:
    """Router, one prefill worker and two decode workers on Redis, exporting spans."""
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": span_collector.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    local = LocalCluster(
        str(cluster_model),
        cluster_redis,
        tmp_path_factory.mktemp("cluster-logs"),
        max_inflight=8,
        max_local_prefill_len=8,
        env=env,
    )
    yield local
    local.stop()
