"""Redis failures on a real `redis-server`: down, frozen, full, corrupt, locked."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import torch
from redis_server import RedisServer
from tiny_blocks import TINY_SPEC, make_block

from kvstore.codec import BlockCodec, tail_key
from kvstore.hashing import hash_token_blocks
from kvstore.local_cache import LocalCachedStore
from kvstore.redis.store import RedisStore
from kvstore.spec import BlockSpec
from kvstore.stats import StoreStats
from kvstore.store import StoreUnavailableError

pytestmark = pytest.mark.redis

HASHES = hash_token_blocks(list(range(40)), TINY_SPEC.block_size, TINY_SPEC.fingerprint)
PROMPT = HASHES[-1]
"""The prompt hash the test's tails are bound to (any 16 bytes would do)."""
TIMEOUT_S = 0.5


def elapsed_s(call: Callable[[], object]) -> float:
    """Seconds until `call` raises `StoreUnavailableError` (fails if it does not)."""
    start = time.monotonic()
    with pytest.raises(StoreUnavailableError):
        call()
    return time.monotonic() - start


def wait_healthy(store: RedisStore, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not store.is_healthy():
        assert time.monotonic() < deadline, "store did not recover"
        time.sleep(0.05)


def fail_fast_calls(store: RedisStore) -> list[Callable[[], object]]:
    return [
        lambda: store.lookup(HASHES[:2]),
        lambda: store.put([(HASHES[3], make_block(3))]),
        lambda: store.get(HASHES[:2]),
        lambda: store.get_tail("req", PROMPT),
    ]


def test_killed_redis_fails_fast_then_recovers(own_redis: RedisServer) -> None:
    store = RedisStore(own_redis.url, TINY_SPEC, timeout_s=TIMEOUT_S)
    store.put([(HASHES[0], make_block(0))])
    own_redis.kill()
    for call in fail_fast_calls(store):
        assert elapsed_s(call) < TIMEOUT_S + 0.5
    assert not store.is_healthy()
    assert store.stats().errors == 4

    own_redis.start()  # same port, empty (no persistence)
    wait_healthy(store)
    assert store.lookup(HASHES[:1]) == 0
    store.put([(HASHES[1], make_block(1))])
    block = store.get([HASHES[1]])[0]
    assert block is not None and torch.equal(block, make_block(1))
    store.close()


def test_frozen_redis_times_out_then_recovers(own_redis: RedisServer) -> None:
    store = RedisStore(own_redis.url, TINY_SPEC, timeout_s=TIMEOUT_S)
    store.put([(HASHES[0], make_block(0))])
    own_redis.pause()
    for call in fail_fast_calls(store)[:2]:
        elapsed = elapsed_s(call)
        assert TIMEOUT_S - 0.05 < elapsed < TIMEOUT_S + 0.5, elapsed
    assert not store.is_healthy()

    own_redis.resume()
    wait_healthy(store)
    block = store.get([HASHES[0]])[0]
    assert block is not None and torch.equal(block, make_block(0))
    store.close()


def test_local_cache_answers_while_redis_is_down(own_redis: RedisServer) -> None:
    backend = RedisStore(own_redis.url, TINY_SPEC, timeout_s=TIMEOUT_S)
    store = LocalCachedStore(backend, budget_bytes=8 * TINY_SPEC.nbytes)
    store.put([(HASHES[0], make_block(0)), (HASHES[1], make_block(1))])
    own_redis.kill()
    assert store.lookup(HASHES[:2]) == 2
    block = store.get([HASHES[1]])[0]
    assert block is not None and torch.equal(block, make_block(1))
    assert store.num_local_hits == 1
    with pytest.raises(StoreUnavailableError):
        store.get(HASHES[:3])  # block 2 must come from Redis
    with pytest.raises(StoreUnavailableError):
        store.lookup(HASHES[:3])
    store.close()


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "truncated": lambda data: data[: len(data) // 2],
    "flipped_byte": lambda data: data[:100] + bytes([data[100] ^ 0xFF]) + data[101:],
    "garbage": lambda data: b"definitely not a KV block",
    "empty": lambda data: b"",
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_values_are_counted_misses(shared_redis: RedisServer, corruption: str) -> None:
    raw = redis.Redis(port=shared_redis.port)
    raw.flushall()
    store = RedisStore(shared_redis.url, TINY_SPEC)
    store.put([(HASHES[0], make_block(0)), (HASHES[1], make_block(1))])
    good = raw.get(store.block_key(HASHES[0]))
    assert good is not None
    raw.set(store.block_key(HASHES[0]), CORRUPTIONS[corruption](good))
    # A valid block copied under another hash's key is also a corrupt block.
    raw.set(store.block_key(HASHES[2]), good)

    blocks = store.get(HASHES[:3])
    assert blocks[0] is None and blocks[2] is None
    assert blocks[1] is not None and torch.equal(blocks[1], make_block(1))
    assert store.stats() == StoreStats(
        hits=1,
        misses=2,
        corrupt_blocks=2,
        bytes_in=2 * TINY_SPEC.nbytes,
        bytes_out=TINY_SPEC.nbytes,
    )
    raw.set(store.tail_key("req-x"), CORRUPTIONS[corruption](good))
    assert store.get_tail("req-x", PROMPT) is None
    assert store.stats().corrupt_blocks == 3
    store.close()


def test_tail_stored_for_another_request_is_rejected(shared_redis: RedisServer) -> None:
    raw = redis.Redis(port=shared_redis.port)
    store = RedisStore(shared_redis.url, TINY_SPEC)
    store.put_tail("req-a", make_block(1, num_tokens=2), PROMPT)
    raw.set(store.tail_key("req-b"), raw.get(store.tail_key("req-a")))
    assert store.get_tail("req-b", PROMPT) is None
    assert store.stats().corrupt_blocks == 1
    assert BlockCodec(TINY_SPEC).decode(
        raw.get(store.tail_key("req-a")), tail_key("req-a", PROMPT), is_tail=True
    ).shape == (2, 2, 2, 1, 4)
    store.delete_tail("req-a")
    raw.delete(store.tail_key("req-b"))
    store.close()


def test_every_key_has_a_ttl(shared_redis: RedisServer) -> None:
    raw = redis.Redis(port=shared_redis.port)
    raw.flushall()
    store = RedisStore(shared_redis.url, TINY_SPEC, block_ttl_s=300, tail_ttl_s=30)
    store.put([(HASHES[0], make_block(0))])
    store.put_tail("req-ttl", make_block(0, num_tokens=1), PROMPT)
    assert 290 <= raw.ttl(store.block_key(HASHES[0])) <= 300
    assert 20 <= raw.ttl(store.tail_key("req-ttl")) <= 30
    raw.expire(store.block_key(HASHES[0]), 5)
    store.get(HASHES[:1])  # a read refreshes a block's TTL
    assert raw.ttl(store.block_key(HASHES[0])) > 200
    store.delete_tail("req-ttl")
    store.close()


def test_evicted_blocks_are_misses_under_allkeys_lru(
    redis_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = RedisServer(
        tmp_path_factory.mktemp("redis-lru"),
        "--maxmemory",
        "4mb",
        "--maxmemory-policy",
        "allkeys-lru",
    )
    try:
        # 64 KiB blocks: 128 of them (8 MiB) cannot fit in 4 MiB.
        spec = BlockSpec("test:lru", num_layers=8, num_kv_heads=4, head_dim=32, block_size=16)
        hashes = hash_token_blocks(list(range(16 * 128)), 16, spec.fingerprint)
        store = RedisStore(server.url, spec)
        for start in range(0, 128, 8):
            store.put([(h, make_block(start, spec)) for h in hashes[start : start + 8]])
        num_present = sum(redis.Redis(port=server.port).exists(store.block_key(h)) for h in hashes)
        assert 0 < num_present < 128
        newest = store.get(hashes[-1:])[0]
        assert newest is not None, "the most recently written block was evicted"
        assert torch.equal(newest, make_block(120, spec))
        # Replies take memory too, so the GETs themselves may evict a few more.
        blocks = store.get(hashes)
        num_found = sum(b is not None for b in blocks)
        assert 0 < num_found <= num_present
        for i, block in enumerate(blocks):
            assert block is None or torch.equal(block, make_block(i // 8 * 8, spec)), i
        assert store.lookup(hashes) < 128
        stats = store.stats()
        assert (stats.hits, stats.misses, stats.errors, stats.corrupt_blocks) == (
            num_found + 1,
            128 - num_found,
            0,
            0,
        )
        store.close()
    finally:
        server.kill()


def test_auth_comes_from_the_url(
    redis_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = RedisServer(tmp_path_factory.mktemp("redis-auth"), "--requirepass", "s3cret")
    try:
        store = RedisStore(f"redis://:s3cret@127.0.0.1:{server.port}/0", TINY_SPEC)
        store.put([(HASHES[0], make_block(0))])
        assert store.lookup(HASHES[:1]) == 1
        store.close()
        locked_out = RedisStore(server.url, TINY_SPEC)
        assert not locked_out.is_healthy()
        with pytest.raises(StoreUnavailableError, match=r"NOAUTH|authenticated"):
            locked_out.lookup(HASHES[:1])
        locked_out.close()
    finally:
        server.kill()


# The ACL user docs/security.md recommends: the store's key prefix and commands only.
KVRELAY_ACL = (
    "kvrelay on >pw-kv ~kvrelay:* resetchannels -@all +get +getex +set +exists +del +scan +ping"
)


def test_an_acl_user_from_the_url_can_do_everything_the_store_does_and_no_more(
    redis_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = RedisServer(
        tmp_path_factory.mktemp("redis-acl"),
        *("--user", *KVRELAY_ACL.split(), "--user", "default", "off"),
    )
    try:
        store = RedisStore(f"redis://kvrelay:pw-kv@127.0.0.1:{server.port}/0", TINY_SPEC)
        assert store.is_healthy()
        store.put([(HASHES[0], make_block(0)), (HASHES[1], make_block(1))])
        assert store.lookup(HASHES[:3]) == 2
        assert torch.equal(store.get(HASHES[:1])[0], make_block(0))
        tail = make_block(2, num_tokens=2)
        store.put_tail("r1", tail, PROMPT)
        assert store.num_tails() == 1
        assert torch.equal(store.get_tail("r1", PROMPT), tail)
        store.delete_tail("r1")
        assert store.get_tail("r1", PROMPT) is None
        assert store.stats().errors == 0
        store.close()
        # The user may not touch keys outside kvrelay's prefix.
        client = redis.Redis(port=server.port, username="kvrelay", password="pw-kv")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.set("not-kvrelay", b"x")
        client.close()
        wrong = RedisStore(f"redis://kvrelay:nope@127.0.0.1:{server.port}/0", TINY_SPEC)
        assert not wrong.is_healthy()
        wrong.close()
    finally:
        server.kill()


def test_tls_comes_from_the_url(redis_binary: str, tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    openssl_args = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    openssl_args += ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
    openssl_args += ["-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(["openssl", *openssl_args], check=True, capture_output=True)
    tls_args = ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    tls_args += ["--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]
    server = RedisServer(tmp_path, *tls_args, is_tls=True)
    try:
        store = RedisStore(f"{server.url}?ssl_ca_certs={cert}", TINY_SPEC)
        store.put([(HASHES[0], make_block(0))])
        block = store.get(HASHES[:1])[0]
        assert block is not None and torch.equal(block, make_block(0))
        store.close()
        untrusted = RedisStore(server.url, TINY_SPEC)  # the self-signed CA is not trusted
        assert not untrusted.is_healthy()
        untrusted.close()
        plain = RedisStore(f"redis://127.0.0.1:{server.port}", TINY_SPEC, timeout_s=TIMEOUT_S)
        assert not plain.is_healthy()
        plain.close()
    finally:
        server.kill()
