"""Fixtures of the cluster tests: a redis-server, an OTLP receiver, a model with a
byte-level tokenizer, and the cluster itself; each stopped by its finalizer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
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


# A token-id prompt whose greedy continuation on the cluster model contains its EOS.
EOS_PROBE_PROMPT = list(range(40, 60))


@pytest.fixture(scope="session")
def cluster_model(hf_checkpoint) -> Path:
    """A random Llama (GQA) checkpoint with a byte-level tokenizer, whose EOS is the
    4th greedy token after EOS_PROBE_PROMPT, so stopping at EOS (and ignore_eos) is
    observable. Its own seed and config, so the files it adds change no checkpoint
    other tests share."""
    from model.generation import generate
    from model.loader import load_model
    from model.sampling_params import SamplingParams

    probe = load_model(str(hf_checkpoint("llama_gqa", seed=11)))
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    eos_token_id = generate(probe, [EOS_PROBE_PROMPT], params)[0].token_ids[3]
    path = hf_checkpoint("llama_gqa", seed=11, eos_token_id=eos_token_id)
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


@pytest.fixture
def make_cluster(
    cluster_model: Path, cluster_redis: str, tmp_path: Path
) -> Iterator[Callable[..., LocalCluster]]:
    """Factory of clusters of the cluster model for one test (on the session's Redis
    unless `store_url` says otherwise); every one is stopped afterwards."""
    started: list[LocalCluster] = []

    def make(store_url: str = cluster_redis, **kwargs) -> LocalCluster:
        local = LocalCluster(str(cluster_model), store_url, tmp_path, **kwargs)
        started.append(local)
        return local

    yield make
    for local in started:
        local.stop()
