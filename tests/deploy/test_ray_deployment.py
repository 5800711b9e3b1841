"""`RayDeployment` on a real three-node Ray cluster (one machine, `ray.cluster_utils`):
router, prefill and decode workers on different nodes, the KV crossing nodes through
the Ray object store, greedy parity with `transformers`, `kvrelay status`, and a
killed worker restarted by Ray that registers again and serves. Every internal call
runs over cluster mTLS, as `kvrelay up` runs it."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from deploy.cli import main
from deploy.launch_config import LaunchConfig
from deploy.ray_launcher import RayDeployment
from deploy.worker_flags import WorkerOptions
from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc
from protos import workers_pb2 as wpb
from protos import workers_pb2_grpc as wgrpc
from rpc.channel import open_blocking_channel
from rpc.tls import ClusterTLS, make_cluster_certificates

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MAX_TOKENS = 12
# 37 tokens: two full 16-token blocks and a 5-token tail travel prefill -> decode.
PROMPT = [(i * 37 + 11) % 300 + 3 for i in range(37)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    directory = tmp_path_factory.mktemp("tls")
    make_cluster_certificates().write(directory)
    return str(directory)


@pytest.fixture(scope="module")
def deployment(hf_checkpoint, tls_dir: str) -> Iterator[RayDeployment]:
    """Head (router), node 2 (prefill), node 3 (decode), one CPU each; pinned with
    custom resources so each role lands on its own node."""
    import ray
    from ray.cluster_utils import Cluster

    model = hf_checkpoint("llama_gqa", seed=5)
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {"router_node": 1},
            "include_dashboard": False,
            "object_store_memory": 100 * 1024**2,
        },
    )
    deployment = None
    try:
        for role in ("prefill_node", "decode_node"):
            cluster.add_node(num_cpus=1, resources={role: 1}, object_store_memory=100 * 1024**2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        config = LaunchConfig(
            workers=WorkerOptions(model=str(model), kv_cache_gb=0.01),
            port=free_port(),
            router_resources={"router_node": 1},
            prefill_resources={"prefill_node": 1},
            decode_resources={"decode_node": 1},
            ready_timeout_s=120,
            tls=ClusterTLS.from_dir(tls_dir),
        )
        deployment = RayDeployment(config)
        deployment.start()
        yield deployment
    finally:
        if deployment is not None:
            deployment.shutdown()
        ray.shutdown()
        cluster.shutdown()


def expected_greedy(model_dir: str, prompt: list[int]) -> list[int]:
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        output = reference.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=MAX_TOKENS,
            min_new_tokens=MAX_TOKENS,
            do_sample=False,
        )
    return output[0, len(prompt) :].tolist()


def generate(endpoint: str, prompt: list[int], timeout: float = 30) -> list[int]:
    request = pb.GenerateRequest(
        prompt_token_ids=prompt,
        sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True),
    )
    with grpc.insecure_channel(endpoint) as channel:
        responses = list(pb_grpc.GeneratorStub(channel).Generate(request, timeout=timeout))
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    return [t for r in responses for t in r.token_ids]


def registered(deployment: RayDeployment) -> dict[str, wpb.WorkerInfo]:
    with open_blocking_channel(deployment.internal_endpoint, deployment.config.tls) as channel:
        response = wgrpc.RegistryStub(channel).ListWorkers(wpb.ListWorkersRequest(), timeout=5)
    return {w.worker_id: w for w in response.workers}


def actor_info(deployment: RayDeployment, worker_id: str):
    import ray

    worker = next(w for w in deployment.workers if w.worker_id == worker_id)
    return ray.get(worker.actor.info.remote(), timeout=60)


def test_roles_run_on_three_nodes_and_match_transformers_greedy(
    deployment: RayDeployment, tls_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    router = ray.get(deployment.router.info.remote())
    prefill, decode = actor_info(deployment, "prefill-0"), actor_info(deployment, "decode-0")
    assert len({router.node_id, prefill.node_id, decode.node_id}) == 3
    assert set(registered(deployment)) == {"prefill-0", "decode-0"}

    assert generate(deployment.endpoint, PROMPT) == expected_greedy(deployment.config.model, PROMPT)

    # The decode worker (node 3) read both full blocks and the tail that the
    # prefill worker (node 2) put in its node's object store.
    status_args = ["status", "--router", deployment.internal_endpoint, "--tls-dir", tls_dir]
    assert main([*status_args, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    workers = {w["worker_id"]: w for w in status["workers"]}
    assert (workers["prefill-0"]["role"], workers["decode-0"]["role"]) == ("prefill", "decode")
    assert workers["prefill-0"]["address"] == prefill.address
    assert workers["prefill-0"]["num_computed_tokens_total"] == len(PROMPT)
    assert workers["prefill-0"]["num_live_tails"] == 0
    # It also put the full blocks it generated (bytes_in), for resumes and next turns.
    assert workers["decode-0"]["store"]["bytes_in"] > 0
    assert workers["decode-0"]["store"] | {"bytes_out": 0, "bytes_in": 0} == {
        "hits": 3,
        "misses": 0,
        "corrupt_blocks": 0,
        "errors": 0,
        "bytes_in": 0,
        "bytes_out": 0,
    }
    assert workers["decode-0"]["num_generated_tokens_total"] == MAX_TOKENS - 1
    assert workers["decode-0"]["num_finished_requests_total"] == 1

    assert main(status_args) == 0
    table = capsys.readouterr().out.splitlines()
    assert (
        table[0] == f"router {deployment.internal_endpoint} serving {deployment.config.model}, "
        "KV cache auto: 2 workers"
    )
    header = "WORKER ROLE ADDRESS WAIT/RUN KV POOL STORE HIT/MISS/BAD TOKENS C/R/G"
    assert table[1].split() == header.split()
    assert table[2].split()[:4] == ["decode-0", "decode", decode.address, "0/0"]
    # A decode worker computes one token per step after the prefilled first one.
    assert table[2].split()[-2:] == ["3/0/0", f"{MAX_TOKENS - 1}/0/{MAX_TOKENS - 1}"]
    assert table[3].split() == [
        "prefill-0",
        "prefill",
        prefill.address,
        "0/0",
        "-",
        "0/0/0",
        f"{len(PROMPT)}/0/0",
    ]


def test_killed_worker_is_restarted_registers_again_and_serves(
    deployment: RayDeployment,
) -> None:
    before = actor_info(deployment, "prefill-0")
    # Its first block hash is PROMPT's: the index still lists that block, but its
    # owner (the killed process) is gone, so the restarted worker must recompute it.
    prompt = PROMPT[:20]
    expected = expected_greedy(deployment.config.model, prompt)
    os.kill(before.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30

    after = actor_info(deployment, "prefill-0")  # returns once Ray has restarted it
    assert after.pid != before.pid
    # The dead entry may expire before the new process registers: absent meanwhile.
    while getattr(registered(deployment).get("prefill-0"), "address", None) != after.address:
        assert time.monotonic() < deadline, "the restarted worker did not register in 30 s"
        time.sleep(0.2)
    assert generate(deployment.endpoint, prompt, timeout=deadline - time.monotonic()) == expected
    assert time.monotonic() < deadline

    with open_blocking_channel(after.address, deployment.config.tls) as channel:
        stats = wgrpc.PrefillWorkerStub(channel).GetStats(wpb.StatsRequest(), timeout=5)
    assert (stats.num_finished_requests_total, stats.num_computed_tokens_total) == (1, 20)
    assert (stats.store.hits, stats.store.misses) == (0, 1)
