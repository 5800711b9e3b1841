"""`kvrelay status` without a cluster (its table and JSON from given stats, an
unreachable router), `LaunchConfig`, and `kvrelay up` refusing a busy port."""

from __future__ import annotations

import socket

import pytest

from deploy.cli import main
from deploy.cluster_status import (
    ClusterStatus,
    WorkerStatus,
    format_status_table,
    status_to_json,
)
from deploy.launch_config import LaunchConfig
from protos import workers_pb2 as wpb

DECODE_STATS = wpb.WorkerStats(
    worker_id="decode-0",
    role="decode",
    num_waiting=1,
    num_running=3,
    num_blocks=64,
    num_used_blocks=16,
    kv_cache_dtype="int8",
    kv_pool_tokens=1024,
    kv_pool_bytes=3 * 2**29,
    num_computed_tokens_total=40,
    num_cached_tokens_total=32,
    num_generated_tokens_total=41,
    num_finished_requests_total=2,
    store=wpb.StoreStats(hits=5, misses=2, corrupt_blocks=1, bytes_out=999),
)
STATUS = ClusterStatus(
    target="head:50051",
    model="dummy:tiny",
    kv_cache_dtype="int8",
    workers=(
        WorkerStatus("decode-0", "decode", "10.0.0.2:4000", 1, 3, 0.25, DECODE_STATS),
        WorkerStatus("prefill-0", "prefill", "10.0.0.3:4001", 0, 0, 0.0, None, "UNAVAILABLE: gone"),
    ),
)


def test_status_table_has_one_row_per_worker() -> None:
    assert format_status_table(STATUS).splitlines() == [
        "router head:50051 serving dummy:tiny, KV cache int8: 2 workers",
        "WORKER     ROLE     ADDRESS        WAIT/RUN  KV POOL                                  "
        "STORE HIT/MISS/BAD  TOKENS C/R/G",
        "decode-0   decode   10.0.0.2:4000  1/3       16/64 (25%) of 1,024 tokens in 1.50 GiB  "
        "5/2/1               40/32/41",
        "prefill-0  prefill  10.0.0.3:4001  -         -                                        "
        "-                   unreachable: UNAVAILABLE: gone",
    ]


def test_status_json_keeps_counters_and_errors() -> None:
    document = status_to_json(STATUS)
    decode, prefill = document["workers"]
    assert (document["target"], document["model"]) == ("head:50051", "dummy:tiny")
    assert document["kv_cache_dtype"] == decode["kv_cache_dtype"] == "int8"
    assert (decode["kv_pool_tokens"], decode["kv_pool_bytes"]) == (1024, 3 * 2**29)
    assert decode["store"] == {
        "hits": 5,
        "misses": 2,
        "corrupt_blocks": 1,
        "errors": 0,
        "bytes_in": 0,
        "bytes_out": 999,
    }
    assert (decode["num_used_blocks"], decode["num_blocks"], decode["kv_usage"]) == (16, 64, 0.25)
    assert prefill == {
        "worker_id": "prefill-0",
        "role": "prefill",
        "address": "10.0.0.3:4001",
        "num_waiting": 0,
        "num_running": 0,
        "kv_usage": 0.0,
        "error": "UNAVAILABLE: gone",
    }


def test_status_of_an_unreachable_router_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as sock:  # a port nobody serves on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["status", "--router", f"127.0.0.1:{port}", "--timeout", "0.5"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"kvrelay status: error: no kvrelay router Registry answers at 127.0.0.1:{port} "
        "(UNAVAILABLE); start one with `kvrelay up` (or `kvrelay serve router`), or pass "
        "--router HOST:PORT (its internal port) and, on a cluster with TLS, --tls-dir\n"
    )


def test_up_refuses_a_busy_port_before_starting_ray(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert main(["up", "--port", str(port)]) == 2
    assert capsys.readouterr().err == (
        f"kvrelay up: error: port {port} is in use (another kvrelay up?); stop it or pass --port\n"
    )


def test_ray_store_url_gets_the_launch_namespace_unless_it_names_one() -> None:
    assert LaunchConfig().store_url_in_namespace("kvrelay-1") == "ray://?namespace=kvrelay-1"
    named = LaunchConfig(store_url="ray://?namespace=mine&budget_bytes=100")
    assert named.store_url_in_namespace("kvrelay-1") == "ray://?namespace=mine&budget_bytes=100"
    redis = LaunchConfig(store_url="redis://cache:6379")
    assert redis.store_url_in_namespace("kvrelay-1") == "redis://cache:6379"


def test_launch_config_resources_are_read_only() -> None:
    config = LaunchConfig(decode_resources={"decode_node": 1})
    assert dict(config.decode_resources) == {"decode_node": 1}
    assert config.num_workers == 2
    with pytest.raises(TypeError):
        config.decode_resources["x"] = 1  # type: ignore[index]


def test_kuberay_manifest_starts_kvrelay_up_with_valid_flags() -> None:
    import shlex
    from pathlib import Path

    import yaml

    from deploy.cli import build_parser

    manifest = yaml.safe_load(
        (Path(__file__).parents[2] / "deploy/configs/kuberay-raycluster.yaml").read_text()
    )
    assert manifest["kind"] == "RayCluster"
    head = manifest["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    script = head["lifecycle"]["postStart"]["exec"]["command"][-1]
    start = script.index("kvrelay up")
    words = shlex.split(script[start : script.index(">", start)])
    args = build_parser().parse_args(words[1:])
    assert (args.address, args.prefill_workers, args.decode_workers) == ("auto", 1, 2)
    workers = manifest["spec"]["workerGroupSpecs"][0]
    assert workers["rayStartParams"]["num-gpus"] == "1"
