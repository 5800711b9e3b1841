"""`prepare`: the cache salt (the block hashes the router routes by are the salted
chain every worker computes, the salt travels on in the prepared request, a key
salt scopes it, and a bad salt is refused naming `cache_salt`), and what is refused
before any tokenizer pass."""

from __future__ import annotations

import pytest

from kvstore.hashing import MAX_CACHE_SALT_BYTES, hash_token_blocks
from model.tokenizer import ByteTokenizer
from protos import generator_pb2 as pb
from router.cluster import ClusterModel
from router.request import PreparedRequest, prepare
from router.validation import InvalidRequest, RequestLimits

MODEL = ClusterModel("test:prepare", b"f" * 16, 4, 259, 512)
PROMPT = list(range(3, 15))  # 3 full blocks of 4


def prepared(key_salt: str | None = None, **fields) -> PreparedRequest:
    request = pb.GenerateRequest(prompt_token_ids=PROMPT, **fields)
    return prepare(request, RequestLimits(), MODEL, ByteTokenizer(), key_salt=key_salt)


def test_the_salt_seeds_the_hashes_and_travels_with_the_request() -> None:
    req = prepared(cache_salt="tenant-a")
    assert req.cache_salt == "tenant-a"
    assert req.block_hashes == hash_token_blocks(PROMPT, 4, MODEL.kv_fingerprint, "tenant-a")
    assert len(req.block_hashes) == 3


def test_without_a_salt_the_hashes_are_the_unsalted_chain() -> None:
    req = prepared()
    assert req.cache_salt is None
    assert req.block_hashes == hash_token_blocks(PROMPT, 4, MODEL.kv_fingerprint)


def test_two_salts_and_no_salt_route_by_disjoint_hashes() -> None:
    chains = [prepared().block_hashes] + [
        prepared(cache_salt=salt).block_hashes for salt in ("a", "b")
    ]
    assert len({h for chain in chains for h in chain}) == 9


def test_a_key_salt_scopes_the_request_salt() -> None:
    scoped = prepared(key_salt="key-1", cache_salt="a")
    # Another key with the same request salt, the same key without one, and the
    # request salt alone: four scopes, no block in common.
    others = [
        prepared(key_salt="key-2", cache_salt="a"),
        prepared(key_salt="key-1"),
        prepared(cache_salt="a"),
    ]
    assert len(scoped.cache_salt) == 64  # a hex digest, within the workers' limit
    hashes = [h for req in (scoped, *others) for h in req.block_hashes]
    assert len(set(hashes)) == 12
    assert prepared(key_salt="key-1", cache_salt="a").block_hashes == scoped.block_hashes


@pytest.mark.parametrize(
    ("salt", "message"),
    [
        ("", "cache_salt is empty"),
        ("x" * (MAX_CACHE_SALT_BYTES + 1), f"cache_salt is {MAX_CACHE_SALT_BYTES + 1} bytes"),
    ],
    ids=["empty", "too-long"],
)
def test_a_bad_salt_is_refused_naming_it(salt: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=f"^{message}"):
        prepared(cache_salt=salt)


class CountingTokenizer(ByteTokenizer):
    """The byte tokenizer, counting the texts it was asked to encode."""

    def __init__(self) -> None:
        self.num_encoded = 0

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        self.num_encoded += 1
        return super().encode(text, add_bos)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pb.GenerateRequest(prompt="x" * 2_000_000), "request is 2000004 bytes"),
        (pb.GenerateRequest(prompt="x" * 300_000), "prompt is 300000 bytes of text"),
        (
            pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="x" * 300_000)]),
            "messages hold 300004 bytes of text",
        ),
        (pb.GenerateRequest(prompt="hi", cache_salt=""), "cache_salt is empty"),
        (
            pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(stop_token_ids=[1] * 65)),
            "sampling.stop_token_ids has 65 ids; at most 64",
        ),
    ],
    ids=["request-size", "prompt-text", "messages-text", "salt", "stop-token-ids"],
)
def test_refused_before_anything_is_tokenized(request_, message) -> None:
    tokenizer = CountingTokenizer()
    with pytest.raises(InvalidRequest, match=f"^{message}"):
        prepare(request_, RequestLimits(), MODEL, tokenizer)
    assert tokenizer.num_encoded == 0


def test_a_prompt_within_the_limits_is_tokenized_once() -> None:
    tokenizer = CountingTokenizer()
    req = prepare(pb.GenerateRequest(prompt="hi"), RequestLimits(), MODEL, tokenizer)
    assert tokenizer.num_encoded == 1 and req.prompt_token_ids == tokenizer.encode("hi")
