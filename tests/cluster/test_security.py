"""A cluster no stranger can join, read or steer, proven on real processes with
real certificates (`kvrelay certs`): the router's Registry only on its internal
port, mTLS on every internal call (plaintext and wrong-CA peers refused, a worker
with the wrong CA never joins), API keys on the public API (gRPC and HTTP, health
open), and a stranger's `Decode` straight to a worker refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos import generator_pb2 as pb
from protos import workers_pb2 as wpb
from protos import workers_pb2_grpc as wgrpc
from rpc.channel import open_blocking_channel
from rpc.tls import ClusterTLS
from tests.cluster.helpers import wait_until
from tests.cluster.local_cluster import ROOT, LocalCluster

pytestmark = pytest.mark.slow

API_KEY = "sk-kvrelay-test-0123456789"
KV_SECRET = b"s" * 32
SAMPLING = pb.SamplingParams(max_tokens=4, ignore_eos=True)
PROMPT_IDS = [5, 6, 7, 8, 9, 10, 11, 12]


def kvrelay_certs(directory: Path) -> Path:
    result = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "certs", str(directory)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return directory


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second CA and certificate, made the same way: a stranger's."""
    return kvrelay_certs(tmp_path_factory.mktemp("other-tls"))


@pytest.fixture(scope="module")
def secure_cluster(
    cluster_model: Path, cluster_redis: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    tls_dir = kvrelay_certs(tmp_path_factory.mktemp("tls"))
    keys = tmp_path_factory.mktemp("keys") / "api-keys.txt"
    keys.write_text(f"# the test's key\n{API_KEY}\nsk-another-key\n")
    secret = keys.parent / "kv.secret"
    secret.write_bytes(KV_SECRET)
    local = LocalCluster(
        str(cluster_model),
        cluster_redis,
        tmp_path_factory.mktemp("secure-logs"),
        num_prefill=1,
        num_decode=1,
        router_args=("--api-keys-file", str(keys), "--salt-per-key"),
        worker_args=("--kv-secret-file", str(secret)),
        tls_dir=tls_dir,
    )
    yield local
    local.stop()


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def generate(cluster: LocalCluster, metadata=()) -> list[pb.GenerateResponse]:
    request = pb.GenerateRequest(prompt_token_ids=PROMPT_IDS, sampling=SAMPLING)
    return list(cluster.generator.Generate(request, metadata=metadata, timeout=30))


def stranger_channel(target: str, tls_dir: Path | None) -> grpc.Channel:
    """Plaintext (no `tls_dir`) or mTLS with another CA's certificate."""
    return open_blocking_channel(target, ClusterTLS.from_dir(tls_dir) if tls_dir else None)


@pytest.mark.parametrize("credentials", ["plaintext", "other-ca"])
def test_a_stranger_cannot_register_or_list_workers_on_the_internal_port(
    secure_cluster: LocalCluster, other_ca: Path, credentials: str
) -> None:
    tls_dir = other_ca if credentials == "other-ca" else None
    registration = wpb.RegisterRequest(
        worker_id="intruder", role=wpb.WORKER_ROLE_DECODE, address="127.0.0.1:1"
    )
    with stranger_channel(secure_cluster.internal_target, tls_dir) as channel:
        registry = wgrpc.RegistryStub(channel)
        for call, request in (
            (registry.ListWorkers, wpb.ListWorkersRequest()),
            (registry.Register, registration),
            (registry.Deregister, wpb.DeregisterRequest(worker_id="decode-0")),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # A member of the cluster (the CA's certificate) is answered: nothing changed.
    assert set(secure_cluster.workers()) == {"prefill-0", "decode-0"}


def test_the_public_port_serves_no_registry(secure_cluster: LocalCluster) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(secure_cluster.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (answer,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    services = {s.name for s in answer.list_services_response.service}
    assert "kvrelay.v1.Generator" in services and "grpc.health.v1.Health" in services
    assert "kvrelay.v1.Registry" not in services
    registry = wgrpc.RegistryStub(secure_cluster.channel)
    with pytest.raises(grpc.RpcError) as err:
        registry.ListWorkers(wpb.ListWorkersRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("credentials", ["plaintext", "other-ca"])
def test_a_strangers_calls_straight_to_a_worker_are_refused(
    secure_cluster: LocalCluster, other_ca: Path, credentials: str
) -> None:
    """Decode, Prefill and Release, each refused at the handshake: no work done."""
    tls_dir = other_ca if credentials == "other-ca" else None
    workers = secure_cluster.workers()
    decode = wpb.DecodeRequest(request_id="forged.d1", prompt_token_ids=PROMPT_IDS)
    with stranger_channel(workers["decode-0"].address, tls_dir) as channel:
        with pytest.raises(grpc.RpcError) as err:
            list(wgrpc.DecodeWorkerStub(channel).Decode(decode, timeout=5))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    prefill_before = secure_cluster.stats("prefill-0").num_computed_tokens_total
    prefill = wpb.PrefillRequest(request_id="forged.p1", prompt_token_ids=PROMPT_IDS)
    with stranger_channel(workers["prefill-0"].address, tls_dir) as channel:
        stub = wgrpc.PrefillWorkerStub(channel)
        for call, request in ((stub.Prefill, prefill), (stub.Release, wpb.ReleaseRequest())):
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert secure_cluster.stats("decode-0").num_running == 0
    assert secure_cluster.stats("prefill-0").num_computed_tokens_total == prefill_before


def test_a_worker_with_another_ca_never_joins_and_the_cluster_keeps_serving(
    secure_cluster: LocalCluster, other_ca: Path
) -> None:
    secure_cluster.start_worker("decode-intruder", "decode", "--tls-dir", str(other_ca))
    try:
        # It loads its model and keeps trying to register (every second) in vain.
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            assert "decode-intruder" not in secure_cluster.workers()
            assert secure_cluster.processes["decode-intruder"].poll() is None
            time.sleep(0.5)
        assert generate(secure_cluster, bearer(API_KEY))[-1].usage.completion_tokens == 4
    finally:
        secure_cluster.signal("decode-intruder", signal.SIGKILL)
        secure_cluster.wait_exit("decode-intruder", 10)


@pytest.mark.parametrize("metadata", [(), bearer("sk-wrong"), (("authorization", API_KEY),)])
def test_generate_without_a_valid_key_is_unauthenticated(
    secure_cluster: LocalCluster, metadata
) -> None:
    computed_before = secure_cluster.stats("prefill-0").num_computed_tokens_total
    with pytest.raises(grpc.RpcError) as err:
        generate(secure_cluster, metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer KEY" in err.value.details()
    assert secure_cluster.stats("prefill-0").num_computed_tokens_total == computed_before


def test_the_right_key_gets_tokens_and_health_needs_none(secure_cluster: LocalCluster) -> None:
    responses = generate(secure_cluster, bearer(API_KEY))
    assert sum(len(r.token_ids) for r in responses) == 4
    assert secure_cluster.health() == 1  # SERVING, asked without a key
    command = ["generate", "--target", secure_cluster.target, "--json", "--max-tokens", "4"]
    result = subprocess.run(
        [sys.executable, "-m", "deploy.cli", *command, "--prompt-token-ids", "5,6,7,8,9,10,11,12"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KVRELAY_API_KEY": API_KEY},
    )
    assert result.returncode == 0, result.stderr
    assert '"completion_tokens": 4' in result.stdout


def test_each_key_has_a_prefix_cache_of_its_own(secure_cluster: LocalCluster) -> None:
    """--salt-per-key: a prompt sent again under the same key hits the cache; under
    another key it shares nothing, and cached_prompt_tokens says 0."""
    prompt = [(i * 11 + 5) % 250 + 3 for i in range(48)]  # three full blocks

    def cached(key: str) -> int:
        request = pb.GenerateRequest(prompt_token_ids=prompt, sampling=SAMPLING)
        responses = secure_cluster.generator.Generate(request, metadata=bearer(key), timeout=30)
        return list(responses)[-1].usage.cached_prompt_tokens

    assert cached(API_KEY) == 0
    assert cached(API_KEY) >= 32
    assert cached("sk-another-key") == 0


def test_the_http_api_needs_the_key_too(secure_cluster: LocalCluster) -> None:
    import urllib.request

    wrong = openai.OpenAI(base_url=secure_cluster.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.completions.create(model=secure_cluster.model, prompt=PROMPT_IDS, max_tokens=2)
    assert err.value.status_code == 401
    assert err.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    right = openai.OpenAI(base_url=secure_cluster.base_url, api_key=API_KEY, max_retries=0)
    answer = right.completions.create(
        model=secure_cluster.model, prompt=PROMPT_IDS, max_tokens=2, temperature=0
    )
    assert answer.usage.completion_tokens == 2
    url = f"http://127.0.0.1:{secure_cluster.http_port}/health"
    wait_until(lambda: urllib.request.urlopen(url, timeout=5).status == 200, 5, "/health")


def test_blocks_planted_in_redis_without_the_secret_are_misses_and_the_answer_is_right(
    secure_cluster: LocalCluster,
) -> None:
    """Someone who can write to Redis but has no secret plants well-formed blocks
    (right key, header, length and xxh3) for a prompt before anyone sends it: the
    prefill worker counts them as corrupt, computes the prompt itself, and the
    answer is the model's own."""
    import torch

    from decode_worker.batch_generate import generate_with_engine
    from kvstore.hashing import hash_token_blocks
    from kvstore.redis.store import RedisStore
    from kvstore.spec import BlockSpec
    from model.loader import load_model
    from model.sampling_params import SamplingParams
    from model.sources import model_identity
    from router.api_keys import ApiKeys
    from router.request import scoped_cache_salt

    prompt = [(i * 7 + 3) % 200 + 3 for i in range(40)]  # two full blocks and a tail
    loaded = load_model(secure_cluster.model, dtype=torch.float32)
    spec = BlockSpec.for_model(model_identity(secure_cluster.model), loaded.config, torch.float32)
    planter = RedisStore(secure_cluster.store_url, spec)  # no secret
    assert not planter.is_authenticated
    # The router scopes the key's requests (--salt-per-key): the planter aims there.
    salt = scoped_cache_salt(ApiKeys([API_KEY]).salt_of(f"Bearer {API_KEY}"), None)
    hashes = hash_token_blocks(prompt, spec.block_size, spec.fingerprint, salt)
    planter.put([(h, torch.full(spec.shape, 7.0)) for h in hashes])
    planter.close()

    corrupt_before = secure_cluster.stats("prefill-0").store.corrupt_blocks
    responses = list(
        secure_cluster.generator.Generate(
            pb.GenerateRequest(prompt_token_ids=prompt, sampling=SAMPLING),
            metadata=bearer(API_KEY),
            timeout=30,
        )
    )
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    expected = [out.token_id for _, out in generate_with_engine(loaded, [prompt], params)]
    assert [t for r in responses for t in r.token_ids] == expected
    assert responses[-1].usage.cached_prompt_tokens == 0
    assert secure_cluster.stats("prefill-0").store.corrupt_blocks >= corrupt_before + 1
