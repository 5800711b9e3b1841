"""The router's OpenAI-compatible HTTP API on a real cluster, called with the
official `openai` SDK: the same answers as the gRPC API (text, tokens, usage),
OpenAI's shapes streamed and not, the SDK's typed errors for bad requests, and a
stream the client closes (or a client that leaves before a whole answer) freeing
every block, as a cancelled gRPC stream does.

One cluster for the module (a prefill and a decode worker), its decode worker
gated so `/health` is seen answering 503 before it registers; the first test
opens the gate."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from protos import generator_pb2 as pb
from tests.cluster.helpers import assert_back_to_baseline, wait_until
from tests.cluster.local_cluster import ROOT, LocalCluster

pytestmark = pytest.mark.slow

SERVED_NAME = "tiny-chat"
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
]
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def chat_model(cluster_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cluster model with a ChatML template, in a copy of its own (the shared
    fixture stays without one)."""
    path = tmp_path_factory.mktemp("chat-model") / "model"
    shutil.copytree(cluster_model, path)
    (path / "chat_template.jinja").write_text(CHATML)
    return path


@pytest.fixture(scope="module")
def api_cluster(
    chat_model: Path, cluster_redis: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    local = LocalCluster(
        str(chat_model),
        cluster_redis,
        tmp_path_factory.mktemp("openai-logs"),
        num_prefill=1,
        num_decode=1,
        max_inflight=2,
        router_args=("--served-model-name", SERVED_NAME),
        gated=("decode-0",),
    )
    yield local
    local.stop()


@pytest.fixture
def cluster(api_cluster: LocalCluster) -> LocalCluster:
    """The module's cluster with its decode worker registered."""
    api_cluster.open_gate()
    api_cluster.wait_registered("decode-0")
    wait_until(lambda: health(api_cluster)[0] == 200, 10, "/health to say 200")
    return api_cluster


@pytest.fixture
def client(api_cluster: LocalCluster) -> openai.OpenAI:
    # No retries: a 429 or 503 must reach the test, not be retried away.
    return openai.OpenAI(base_url=api_cluster.base_url, api_key="unused", max_retries=0)


def health(cluster: LocalCluster) -> tuple[int, bytes]:
    url = f"http://127.0.0.1:{cluster.http_port}/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def greedy(max_tokens: int = 12) -> dict:
    return {"max_tokens": max_tokens, "temperature": 0, "extra_body": {"ignore_eos": True}}


def grpc_answer(cluster: LocalCluster, max_tokens: int = 12, **fields) -> tuple[str, pb.Usage]:
    sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    responses = cluster.generate(sampling=sampling, **fields)
    return "".join(r.text for r in responses), responses[-1].usage


def chat_messages() -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role=m["role"], content=m["content"]) for m in MESSAGES]


def test_health_is_503_until_a_decode_worker_registers(
    api_cluster: LocalCluster, client: openai.OpenAI
) -> None:
    status, body = health(api_cluster)
    assert status == 503 and b'"error"' in body
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=2)
    assert err.value.status_code == 503
    assert "no decode worker is registered" in err.value.message
    api_cluster.open_gate()
    api_cluster.wait_registered("decode-0")
    wait_until(lambda: health(api_cluster)[0] == 200, 10, "/health to say 200")


def test_models_lists_the_served_model_name(cluster: LocalCluster, client) -> None:
    assert [m.id for m in client.models.list()] == [SERVED_NAME]


def test_a_completion_is_the_grpc_answer_streamed_or_not(cluster: LocalCluster, client) -> None:
    text, usage = grpc_answer(cluster, prompt=PROMPT)
    answer = client.completions.create(model=SERVED_NAME, prompt=PROMPT, **greedy())
    assert answer.object == "text_completion" and answer.model == SERVED_NAME
    assert answer.id.startswith("cmpl-")
    (choice,) = answer.choices
    assert (choice.index, choice.text, choice.finish_reason) == (0, text, "length")
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (
        usage.prompt_tokens,
        12,
    )
    assert answer.usage.total_tokens == usage.prompt_tokens + 12
    assert answer.usage.prompt_tokens_details.cached_tokens >= 0

    chunks = list(
        client.completions.create(
            model=SERVED_NAME,
            prompt=PROMPT,
            stream=True,
            stream_options={"include_usage": True},
            **greedy(),
        )
    )
    *texts, last = chunks
    assert "".join(c.choices[0].text for c in texts) == text
    assert [c.choices[0].finish_reason for c in texts][-1] == "length"
    assert all(c.usage is None for c in texts)
    assert last.choices == [] and last.usage.completion_tokens == 12
    assert last.usage.prompt_tokens == usage.prompt_tokens


def test_token_id_prompts_match_grpc(cluster: LocalCluster, client) -> None:
    token_ids = [3 + (i * 37) % 250 for i in range(20)]
    text, _ = grpc_answer(cluster, prompt_token_ids=token_ids)
    answer = client.completions.create(model=SERVED_NAME, prompt=token_ids, **greedy())
    assert answer.choices[0].text == text and answer.usage.prompt_tokens == 20


def test_a_chat_completion_is_the_grpc_answer_streamed_or_not(
    cluster: LocalCluster, client
) -> None:
    text, usage = grpc_answer(cluster, messages=chat_messages())
    answer = client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, **greedy())
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    (choice,) = answer.choices
    assert (choice.message.role, choice.message.content) == ("assistant", text)
    assert choice.finish_reason == "length"
    # The ChatML rendering of MESSAGES, one byte-level token per byte, no BOS.
    rendered = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in MESSAGES)
    rendered += "<|im_start|>assistant\n"
    assert answer.usage.prompt_tokens == usage.prompt_tokens == len(rendered.encode())
    assert answer.usage.completion_tokens == 12

    chunks = list(
        client.chat.completions.create(
            model=SERVED_NAME,
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            **greedy(),
        )
    )
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "length" and set(finish[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_max_completion_tokens_and_add_generation_prompt(cluster: LocalCluster, client) -> None:
    answer = client.chat.completions.create(
        model=SERVED_NAME,
        messages=MESSAGES,
        max_completion_tokens=3,
        temperature=0,
        extra_body={"ignore_eos": True, "add_generation_prompt": False},
    )
    rendered = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in MESSAGES)
    assert answer.usage.completion_tokens == 3
    assert answer.usage.prompt_tokens == len(rendered.encode())


def test_stop_strings_end_the_text_before_them(cluster: LocalCluster, client) -> None:
    full, _ = grpc_answer(cluster, max_tokens=24, prompt=PROMPT)
    stop = full[6:9]
    expected = full[: full.index(stop)]
    answer = client.completions.create(model=SERVED_NAME, prompt=PROMPT, stop=stop, **greedy(24))
    assert (answer.choices[0].text, answer.choices[0].finish_reason) == (expected, "stop")
    streamed = client.completions.create(
        model=SERVED_NAME, prompt=PROMPT, stop=[stop, "\x00never"], stream=True, **greedy(24)
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_are_the_grpc_logprobs(cluster: LocalCluster, client) -> None:
    sampling = pb.SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=True)
    expected = [lp for r in cluster.generate(prompt=PROMPT, sampling=sampling) for lp in r.logprobs]
    answer = client.completions.create(model=SERVED_NAME, prompt=PROMPT, logprobs=1, **greedy(5))
    assert answer.choices[0].logprobs.token_logprobs == pytest.approx(expected, abs=1e-6)
    assert len(answer.choices[0].logprobs.tokens) == 5
    chat = client.chat.completions.create(
        model=SERVED_NAME, messages=MESSAGES, logprobs=True, **greedy(5)
    )
    assert len(chat.choices[0].logprobs.content) == 5


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"max_tokens": 0}, "max_tokens", "max_tokens must be at least 1"),
        ({"max_tokens": 100_000}, "max_tokens", "this server allows at most 4096"),
        ({"temperature": -1}, "temperature", "temperature must be a finite number >= 0"),
        ({"top_p": 0}, "top_p", "top_p must be in (0, 1]"),
        ({"n": 2}, "n", "n is 2; this server generates one choice"),
        ({"prompt": ""}, "prompt", "prompt is empty"),
        ({"prompt": [[1, 2], [3]]}, "prompt.0", "valid integer"),
        ({"stop": [""]}, "stop", "stop[0] is empty"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        # Found by tests/fuzz/fuzz_requests.py: past a uint32, once a 500.
        ({"max_tokens": 1 << 40}, "max_tokens", "less than 4294967296"),
        ({"prompt": [1, 1 << 40]}, "prompt.1", "less than 4294967296"),
        ({"extra_body": {"stop_token_ids": [1 << 33]}}, "stop_token_ids.0", "less than"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_completion_fields_are_400s_that_name_them(
    cluster: LocalCluster, client, fields: dict, param: str, message: str
) -> None:
    request = {"model": SERVED_NAME, "prompt": PROMPT, **fields}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**request)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"
    assert message in err.value.message


def test_bad_chat_requests_raise_the_sdks_typed_errors(cluster: LocalCluster, client) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert not_found.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as empty:
        client.chat.completions.create(model=SERVED_NAME, messages=[])
    assert empty.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as no_role:
        client.chat.completions.create(model=SERVED_NAME, messages=[{"content": "hi"}])
    assert no_role.value.body["param"] == "messages.0.role"
    with pytest.raises(openai.BadRequestError) as n:
        client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, n=2)
    assert n.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as over:
        client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, max_tokens=500)
    assert over.value.body["param"] == "messages"
    assert "over the model's context of 512 tokens" in over.value.message


def test_a_closed_stream_frees_its_blocks_and_admission_is_a_429(
    cluster: LocalCluster, client
) -> None:
    """Two long streams fill the router (--max-inflight 2): a third request is a
    429. Closing both mid-generation cancels them: every worker back to idle."""
    streams = [
        client.completions.create(model=SERVED_NAME, prompt=PROMPT * 3, stream=True, **greedy(400))
        for _ in range(2)
    ]
    for stream in streams:
        assert next(iter(stream)).choices[0].text is not None
    # The first token may be the prefill worker's: wait until decode holds their blocks.
    wait_until(lambda: cluster.stats("decode-0").num_used_blocks > 0, 10, "decode to admit them")
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, max_tokens=2)
    assert err.value.status_code == 429
    for stream in streams:
        stream.close()
    assert_back_to_baseline(cluster, timeout_s=10)
    # And the router serves again.
    answer = client.completions.create(model=SERVED_NAME, prompt=PROMPT, **greedy(2))
    assert answer.usage.completion_tokens == 2


def test_a_client_that_leaves_before_a_whole_answer_cancels_it(cluster: LocalCluster) -> None:
    """A non-streamed request whose client closes its connection mid-generation is
    cancelled: every block is freed long before its 400 tokens would be done."""
    generated_before = cluster.stats("decode-0").num_generated_tokens_total
    body = {"model": SERVED_NAME, "prompt": PROMPT * 3, "max_tokens": 400, "temperature": 0}
    body["ignore_eos"] = True
    connection = http.client.HTTPConnection("127.0.0.1", cluster.http_port, timeout=10)
    connection.request(
        "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    wait_until(lambda: cluster.stats("decode-0").num_used_blocks > 0, 10, "decode to admit it")
    connection.close()
    assert_back_to_baseline(cluster, timeout_s=10)
    generated = cluster.stats("decode-0").num_generated_tokens_total - generated_before
    assert 0 < generated < 300, f"{generated} tokens: the request ran on after its client left"


def test_kvrelay_generate_chat_sends_messages(cluster: LocalCluster) -> None:
    text, usage = grpc_answer(cluster, messages=chat_messages())
    command = ["generate", "--target", cluster.target, "--json", "--max-tokens", "12"]
    command += [
        "--ignore-eos",
        "--system",
        MESSAGES[0]["content"],
        "--chat",
        MESSAGES[1]["content"],
    ]
    result = subprocess.run(
        [sys.executable, "-m", "deploy.cli", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["text"] == text and record["usage"]["prompt_tokens"] == usage.prompt_tokens
