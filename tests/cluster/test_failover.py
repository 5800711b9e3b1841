"""Workers dying and draining under real load: `kvrelay serve` processes on a real
redis-server, killed with SIGKILL or stopped with SIGTERM, and nothing mocked.

Each test compares every client's tokens with an uninterrupted run of the same
requests (the decode engine in this process: greedy, and seeded sampling, whose
draws depend only on (seed, i)), and checks that the workers go back to baseline.

To catch requests mid-generation on one chosen worker, a test can start a worker
"gated" (it loads but cannot reach the router until the gate opens) and freeze the
worker that holds the streams with SIGSTOP: a frozen process keeps its streams open
mid-generation, and SIGKILL or SIGTERM then lands at a known point.
"""

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
    MAX_TOKENS,
    Stream,
    assert_back_to_baseline,
    expected_tokens,
    greedy,
    metric_value,
    prompt,
    seeded,
    wait_gone,
    wait_until,
    with_max_tokens,
)

# 6 greedy and 2 seeded requests, with different prompts.
REQUESTS = [(prompt(i), greedy()) for i in range(6)] + [
    (prompt(6), seeded(1234)),
    (prompt(7), seeded(99)),
]


def wait_mid_generation(streams: list[Stream], num_tokens: int = 2 * BLOCK + 4) -> None:
    """Until every stream has `num_tokens` (past a few full blocks) and none ended."""
    wait_until(
        lambda: all(len(s.token_ids) >= num_tokens for s in streams), 60, "tokens on every stream"
    )
    assert all(s.is_alive() for s in streams), "a stream ended before the fault"


@pytest.fixture(scope="module")
def expected(cluster_model: Path) -> list[list[int]]:
    return expected_tokens(str(cluster_model), REQUESTS)


def test_kill_9_of_a_decode_worker_mid_generation_loses_no_token(make_cluster, expected):
    cluster = make_cluster(num_prefill=1, num_decode=2, gated=("decode-1",))
    streams = [Stream(cluster, token_ids, sampling) for token_ids, sampling in REQUESTS]
    wait_mid_generation(streams)
    cluster.signal("decode-0", signal.SIGSTOP)  # all 8 streams are frozen on decode-0
    sent = [len(s.token_ids) for s in streams]
    cluster.open_gate()
    cluster.wait_registered("decode-1")
    cluster.signal("decode-0", signal.SIGKILL)

    for stream, want in zip(streams, expected, strict=True):
        assert stream.result() == want  # no token duplicated, missing or different
    assert all(0 < n < MAX_TOKENS for n in sent)
    stats = cluster.stats("decode-1")
    assert stats.num_resumed_requests_total == len(REQUESTS)
    # Each resume fetched what decode-0 published and computed only its last partial
    # block (at most BLOCK tokens each), not the prompt and tokens so far.
    # (A block filled in the last moment before the freeze may not have reached the
    # store yet: at most one more block per request.)
    assert 0 < stats.num_resumed_computed_tokens_total <= len(REQUESTS) * 2 * BLOCK
    assert metric_value(cluster.metrics("router"), "kvrelay:request_migrations_total") == 8
    assert cluster.wait_exit("decode-0", 5) == -signal.SIGKILL
    wait_gone(cluster, "decode-0")
    assert_back_to_baseline(cluster)


@pytest.mark.parametrize("num_prefill", [2, 1], ids=["retried-elsewhere", "prefilled-locally"])
def test_kill_9_of_a_prefill_worker_during_a_prefill_loses_nothing(make_cluster, num_prefill):
    cluster = make_cluster(num_prefill=num_prefill, num_decode=1)
    long = prompt(50 + num_prefill, n=400)  # in no store yet: it must be computed
    (want,) = expected_tokens(cluster.model, [(long, greedy(24))])
    # Frozen, prefill-0 (the router's first choice for a new prompt) holds the call.
    cluster.signal("prefill-0", signal.SIGSTOP)
    stream = Stream(cluster, long, greedy(24))
    time.sleep(0.5)
    assert stream.is_alive() and not stream.token_ids
    cluster.signal("prefill-0", signal.SIGKILL)
    assert stream.result() == want
    if num_prefill == 2:  # retried on the other prefill worker
        assert cluster.stats("prefill-1").num_computed_tokens_total >= len(long) - BLOCK
    else:  # no prefill worker left: the decode worker prefilled it itself
        assert cluster.stats("decode-0").num_computed_tokens_total >= len(long) - BLOCK
    wait_gone(cluster, "prefill-0")
    assert_back_to_baseline(cluster)


@pytest.mark.parametrize(
    ("drain_timeout_s", "max_tokens"),
    [(30.0, MAX_TOKENS), (0.2, 440)],
    ids=["finishes-in-drain", "drain-times-out-and-resumes"],
)
def test_sigterm_drains_a_decode_worker_and_loses_no_token(
    make_cluster, expected, drain_timeout_s, max_tokens
):
    cluster = make_cluster(
        num_prefill=1,
        num_decode=2,
        gated=("decode-1",),
        worker_args=("--drain-timeout", str(drain_timeout_s)),
    )
    finishes_in_drain = max_tokens == MAX_TOKENS
    requests = REQUESTS
    if not finishes_in_drain:  # too long to finish within the drain timeout
        requests = [(t, with_max_tokens(s, max_tokens)) for t, s in REQUESTS]
        expected = expected_tokens(cluster.model, requests)
    streams = [Stream(cluster, token_ids, sampling) for token_ids, sampling in requests]
    wait_mid_generation(streams)
    cluster.signal("decode-0", signal.SIGSTOP)
    cluster.open_gate()
    cluster.wait_registered("decode-1")
    cluster.signal("decode-0", signal.SIGTERM)
    terminated = time.monotonic()
    cluster.signal("decode-0", signal.SIGCONT)  # SIGTERM is delivered now

    # The router hears of the drain at once and routes new requests elsewhere.
    wait_until(
        lambda: "decode-0" not in (w := cluster.workers()) or w["decode-0"].is_draining,
        5,
        "decode-0 to say it is draining",
    )
    finished_before = cluster.stats("decode-1").num_finished_requests_total
    new = cluster.generate(prompt_token_ids=prompt(60), sampling=greedy(8))
    assert sum(len(r.token_ids) for r in new) == 8
    assert cluster.stats("decode-1").num_finished_requests_total == finished_before + 1

    for stream, want in zip(streams, expected, strict=True):
        assert stream.result() == want
    assert cluster.wait_exit("decode-0", drain_timeout_s + 10) == 0
    assert time.monotonic() - terminated < drain_timeout_s + 10
    num_resumed = cluster.stats("decode-1").num_resumed_requests_total
    if finishes_in_drain:
        assert num_resumed == 0  # every stream finished on decode-0
    else:
        assert num_resumed > 0  # cut by the drain timeout, resumed on decode-1
    wait_gone(cluster, "decode-0")
    assert_back_to_baseline(cluster)


def test_a_rolling_restart_of_every_decode_worker_under_load_fails_no_request(make_cluster):
    cluster = make_cluster(num_prefill=1, num_decode=2, worker_args=("--drain-timeout", "1"))
    load = [(prompt(70 + i), greedy(48)) for i in range(4)]
    want = expected_tokens(cluster.model, load)
    done, results, stop = threading.Lock(), [], threading.Event()

    def client(index: int) -> None:
        while not stop.is_set():
            token_ids, sampling = load[index]
            stream = Stream(cluster, token_ids, sampling)
            stream.join(120)
            with done:
                results.append((index, stream.token_ids, stream.error))

    clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(3)]
    for thread in clients:
        thread.start()
    for name in ("decode-0", "decode-1"):
        time.sleep(1.0)
        cluster.signal(name, signal.SIGTERM)
        assert cluster.wait_exit(name, 15) == 0
        wait_gone(cluster, name)
        cluster.restart(name)
        cluster.wait_registered(name)
    time.sleep(1.0)
    stop.set()
    for thread in clients:
        thread.join(150)
    failures = [(i, err.code(), err.details()) for i, _, err in results if err is not None]
    assert failures == []
    assert len(results) >= 6
    assert all(token_ids == want[i] for i, token_ids, _ in results)
    assert_back_to_baseline(cluster)


def test_duplicate_request_ids_in_concurrent_requests_each_get_their_own_answer(cluster):
    requests = [(prompt(80 + i), greedy(40)) for i in range(4)]
    want = expected_tokens(cluster.model, requests)
    streams = [Stream(cluster, t, s, request_id="same-id") for t, s in requests]
    assert [s.result() for s in streams] == want
    assert {r.request_id for s in streams for r in s.responses} == {"same-id"}


def test_a_request_id_over_128_bytes_is_refused(cluster):
    with pytest.raises(grpc.RpcError) as err:
        cluster.generate(request_id="x" * 129, prompt_token_ids=prompt(1), sampling=greedy(2))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id is 129 bytes; the limit is 128" in err.value.details()
    ok = cluster.generate(request_id="x" * 128, prompt_token_ids=prompt(1), sampling=greedy(2))
    assert {r.request_id for r in ok} == {"x" * 128}


def test_turn_two_of_a_conversation_reuses_all_of_turn_one_on_another_decode_worker(
    make_cluster,
):
    cluster = make_cluster(num_prefill=1, num_decode=2, gated=("decode-1",))
    turn_1 = prompt(90, n=37)
    answer = Stream(cluster, turn_1, greedy(45)).result()
    assert cluster.stats("decode-0").num_published_blocks_total > 0
    # decode-0 leaves: turn 2 can only go to decode-1, which never saw turn 1.
    cluster.open_gate()
    cluster.wait_registered("decode-1")
    cluster.signal("decode-0", signal.SIGTERM)
    assert cluster.wait_exit("decode-0", 15) == 0
    wait_gone(cluster, "decode-0")

    turn_2 = [*turn_1, *answer, *prompt(91, n=9)]
    (want,) = expected_tokens(cluster.model, [(turn_2, greedy(10))])
    responses = Stream(cluster, turn_2, greedy(10))
    assert responses.result() == want
    # Everything of turn 1 whose K/V exists (its prompt and answer but the answer's
    # last token, which was sampled and never fed back) is in the store, by full block.
    reusable = (len(turn_1) + len(answer) - 1) // BLOCK * BLOCK
    assert responses.responses[-1].usage.cached_prompt_tokens == reusable
    assert cluster.stats("decode-1").num_finished_requests_total == 1
    assert_back_to_baseline(cluster)


def test_sigterm_drains_the_router_its_streams_finish_and_new_requests_get_unavailable(
    make_cluster,
):
    cluster = make_cluster(num_prefill=1, num_decode=1, router_args=("--drain-timeout", "30"))
    request = (prompt(95), greedy(300))
    (want,) = expected_tokens(cluster.model, [request])
    stream = Stream(cluster, *request)
    wait_until(lambda: len(stream.token_ids) > 5, 30, "the stream to start")
    cluster.signal("router", signal.SIGTERM)
    wait_until(lambda: cluster.health() != health_pb2.HealthCheckResponse.SERVING, 5, "NOT_SERVING")
    with pytest.raises(grpc.RpcError) as err:
        cluster.generate(prompt_token_ids=prompt(96), sampling=greedy(2))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert stream.result() == want  # the stream in flight finished
    assert cluster.wait_exit("router", 15) == 0
