"""KV-store fixtures: real `redis-server`s on free ports and a local Ray instance.

Every server a test starts is stopped by its fixture's finalizer; nothing touches a
Redis the machine may already run on 6379.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        pytest.skip("redis-server is not installed")
    return path


@pytest.fixture(scope="session")
def shared_redis(
    redis_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisServer]:
    """One server for the contract tests (each test flushes it first)."""
    server = RedisServer(tmp_path_factory.mktemp("redis-shared"))
    yield server
    server.kill()


@pytest.fixture
def own_redis(redis_binary: str, tmp_path: Path) -> Iterator[RedisServer]:
    """A private server a fault test may kill, freeze and restart."""
    server = RedisServer(tmp_path)
    yield server
    server.kill()  # SIGKILL ends a frozen (SIGSTOPped) server too


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A one-CPU local Ray instance for a test module, shut down after it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # address="local": always a fresh instance, never another engineer's or CI job's
    # Ray that `ray.init()` would find through /tmp/ray/ray_current_cluster.
    ray.init(
        address="local",
        num_cpus=1,
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
    )
    yield
    ray.shutdown()
