"""Failures that are not a dead worker, on real processes: the KV store going away
and coming back, the router killed and restarted, ten times more requests than the
cluster admits, and health that says whether a service can serve. Nothing mocked:
redis-server and `kvrelay serve` processes are killed for real."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tests.cluster.helpers import (
    BLOCK,
    Stream,
    assert_back_to_baseline,
    expected_tokens,
    greedy,
    prompt,
    wait_until,
)
from tests.kvstore.redis_server import RedisServer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
STORE_HEALTH = "kvrelay.v1.KVStore"


def worker_health(cluster, worker_id: str, service: str = "") -> int:
    return cluster.health(service, cluster.workers()[worker_id].address)


def test_redis_killed_while_serving_answers_stay_correct_and_hits_return_with_it(
    make_cluster, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path)
    try:
        cluster = make_cluster(store_url=redis.url, num_prefill=1, num_decode=1)
        requests = [(prompt(100 + i, n=45), greedy(20)) for i in range(4)]
        want = expected_tokens(cluster.model, requests)
        assert Stream(cluster, *requests[0]).result() == want[0]
        assert worker_health(cluster, "decode-0", STORE_HEALTH) == SERVING

        redis.kill()
        # Every answer stays correct: the prefill worker still samples the first
        # token, the decode worker computes what it cannot fetch.
        for (token_ids, sampling), expected in zip(requests, want, strict=True):
            assert Stream(cluster, token_ids, sampling).result() == expected
        for worker_id in ("prefill-0", "decode-0"):
            wait_until(
                lambda w=worker_id: worker_health(cluster, w, STORE_HEALTH) == NOT_SERVING,
                5,
                f"{worker_id} to report its store down",
            )
            assert worker_health(cluster, worker_id) == SERVING  # it still serves
            wait_until(  # the router hears it with the next heartbeat
                lambda w=worker_id: cluster.workers()[w].is_store_unavailable,
                5,
                f"the router to list {worker_id}'s store as down",
            )
        assert cluster.health() == SERVING

        redis.start()  # same port: the workers reconnect by themselves
        for worker_id in ("prefill-0", "decode-0"):
            wait_until(
                lambda w=worker_id: worker_health(cluster, w, STORE_HEALTH) == SERVING,
                10,
                f"{worker_id} to see its store again",
            )
            wait_until(
                lambda w=worker_id: not cluster.workers()[w].is_store_unavailable,
                5,
                f"the router to list {worker_id}'s store as up",
            )
        fresh = (prompt(120, n=45), greedy(6))
        (fresh_want,) = expected_tokens(cluster.model, [fresh])
        assert Stream(cluster, *fresh).result() == fresh_want
        again = Stream(cluster, *fresh)
        assert again.result() == fresh_want
        # The second prefill found the first's blocks in the restarted store.
        assert again.responses[-1].usage.cached_prompt_tokens == 45 // BLOCK * BLOCK
        assert_back_to_baseline(cluster)
    finally:
        redis.kill()


def test_the_router_killed_and_restarted_fails_streams_fast_and_serves_again(make_cluster):
    cluster = make_cluster(num_prefill=1, num_decode=1)
    stream = Stream(cluster, prompt(130), greedy(400))
    wait_until(lambda: len(stream.token_ids) > 5, 30, "the stream to start")
    cluster.signal("router", signal.SIGKILL)
    killed = time.monotonic()
    stream.join(5)
    assert not stream.is_alive()
    assert time.monotonic() - killed < 2.0
    assert stream.error is not None and stream.error.code() == grpc.StatusCode.UNAVAILABLE

    cluster.wait_exit("router", 5)
    cluster.restart("router")
    restarted = time.monotonic()
    request = (prompt(131), greedy(8))
    (want,) = expected_tokens(cluster.model, [request])
    while True:  # a client retrying while the workers register again
        retry = Stream(cluster, *request)
        retry.join(30)
        if retry.error is None:
            break
        assert retry.error.code() == grpc.StatusCode.UNAVAILABLE, retry.error.details()
        assert time.monotonic() - restarted < 10, "not serving 10 s after the restart"
        time.sleep(0.2)
    assert retry.token_ids == want
    assert time.monotonic() - restarted < 10
    cluster.wait_registered("prefill-0", "decode-0")
    assert_back_to_baseline(cluster)  # the cut stream's KV was freed on the worker


def test_ten_times_the_admission_limit_sheds_the_excess_fast_and_finishes_the_rest(
    make_cluster,
) -> None:
    limit = 6
    cluster = make_cluster(num_prefill=1, num_decode=1, max_inflight=limit)
    requests = [(prompt(140 + i), greedy(48)) for i in range(10 * limit)]
    want = expected_tokens(cluster.model, requests[:limit])
    rss_before = {name: _rss_mib(p.pid) for name, p in cluster.processes.items()}
    peak = dict(rss_before)
    sampling_rss = threading.Event()

    def sample_rss() -> None:
        while not sampling_rss.is_set():
            for name, process in cluster.processes.items():
                peak[name] = max(peak[name], _rss_mib(process.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    started = time.monotonic()
    streams = [Stream(cluster, *request) for request in requests]
    for stream in streams:
        stream.join(120)
    sampling_rss.set()
    sampler.join(5)

    shed = [s for s in streams if s.error is not None]
    served = [s for s in streams if s.error is None]
    assert all(s.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for s in shed)
    assert len(served) >= limit and len(shed) >= 8 * limit
    # Refusals come at once, not after the admitted requests.
    assert all(s.ended_at - started < 2.0 for s in shed)
    by_prompt = {tuple(t): w for (t, _), w in zip(requests[:limit], want, strict=True)}
    for stream in served:
        token_ids = tuple(stream.request.prompt_token_ids)
        if token_ids in by_prompt:
            assert stream.token_ids == by_prompt[token_ids]
        else:  # admitted later, once others finished: check it on its own
            (expected,) = expected_tokens(cluster.model, [(list(token_ids), greedy(48))])
            assert stream.token_ids == expected
    # Memory stays flat: the excess is refused, never queued.
    for name in cluster.processes:
        assert peak[name] - rss_before[name] < 150, (
            f"{name} grew {peak[name] - rss_before[name]} MiB"
        )
    assert_back_to_baseline(cluster)


def test_the_router_is_not_serving_until_a_decode_worker_registers(make_cluster):
    cluster = make_cluster(num_prefill=1, num_decode=1, gated=("decode-0",))
    assert set(cluster.workers()) == {"prefill-0"}
    assert cluster.health() == NOT_SERVING
    # Workers can still join: the Registry, on the internal port, serves.
    assert cluster.health("kvrelay.v1.Registry", cluster.internal_target) == SERVING
    with pytest.raises(grpc.RpcError) as err:
        cluster.generate(prompt_token_ids=prompt(150), sampling=greedy(2))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    cluster.open_gate()
    cluster.wait_registered("decode-0")
    wait_until(lambda: cluster.health() == SERVING, 5, "the router to serve")
    responses = cluster.generate(prompt_token_ids=prompt(150), sampling=greedy(2))
    assert sum(len(r.token_ids) for r in responses) == 2
    # The decode worker drains and leaves: the router stops serving again.
    cluster.signal("decode-0", signal.SIGTERM)
    assert cluster.wait_exit("decode-0", 15) == 0
    wait_until(lambda: cluster.health() == NOT_SERVING, 5, "the router to stop serving")


def _rss_mib(pid: int) -> float:
    """Resident memory of process `pid` and its threads, MiB (0 once it exited)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def test_a_request_while_redis_is_paused_is_bounded_not_hung(make_cluster, tmp_path: Path):
    """A store that accepts connections but never answers (frozen): every request
    still completes correctly, within the store's timeout per attempt."""
    redis = RedisServer(tmp_path)
    try:
        cluster = make_cluster(store_url=redis.url, num_prefill=1, num_decode=1)
        request = (prompt(160, n=45), greedy(10))
        (want,) = expected_tokens(cluster.model, [request])
        redis.pause()
        started = time.monotonic()
        assert Stream(cluster, *request).result(timeout_s=60) == want
        assert time.monotonic() - started < 30
    finally:
        redis.resume()
        redis.kill()
