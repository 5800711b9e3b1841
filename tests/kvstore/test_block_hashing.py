"""The hash chain and the fingerprint, pinned to fixed vectors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kvstore.hashing import (
    MAX_CACHE_SALT_BYTES,
    chain_seed,
    hash_block,
    hash_prompt,
    hash_token_blocks,
)
from kvstore.spec import BlockSpec

SPEC_135M = BlockSpec("dummy:135m", num_layers=30, num_kv_heads=3, head_dim=64)

# Computed once with blake2b and written down: if these change, every stored
# block in every deployed store silently becomes unreachable.
FINGERPRINT_135M = "6333624d61e07411fc17df36f7a252aa"
HASHES_135M_0_TO_39 = [
    "a99d656d636d45df395f73d34facf617",
    "f323dbf774a739b594f856a2480c66ba",
]


SALTED_SEED_135M = "0ca5834d260555495fc3c1c0ced4fd78"
SALTED_HASHES_135M_0_TO_39 = [
    "268895114e9931de2629235b9cc4910e",
    "8003b8a8fded037079198d39dd1c4cee",
]


def test_fingerprint_is_fixed() -> None:
    assert SPEC_135M.fingerprint.hex() == FINGERPRINT_135M


def test_hash_chain_is_fixed() -> None:
    hashes = hash_token_blocks(list(range(40)), 16, SPEC_135M.fingerprint)
    assert [h.hex() for h in hashes] == HASHES_135M_0_TO_39


def test_chain_is_blake2b_of_parent_and_uint32_tokens() -> None:
    import hashlib
    import struct

    parent = SPEC_135M.fingerprint
    expected = hashlib.blake2b(parent + struct.pack("<16I", *range(16)), digest_size=16)
    assert hash_block(parent, list(range(16))) == expected.digest()


def test_same_in_another_process_with_another_hash_seed() -> None:
    code = (
        "from kvstore import BlockSpec, hash_token_blocks;"
        "s = BlockSpec('dummy:135m', num_layers=30, num_kv_heads=3, head_dim=64);"
        "print(','.join(h.hex() for h in hash_token_blocks(list(range(40)), 16, s.fingerprint)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().split(",") == HASHES_135M_0_TO_39


def test_partial_last_block_has_no_hash() -> None:
    seed = SPEC_135M.fingerprint
    assert hash_token_blocks(list(range(15)), 16, seed) == []
    assert hash_token_blocks(list(range(47)), 16, seed) == hash_token_blocks(
        list(range(32)), 16, seed
    )


def test_chain_can_be_extended_from_a_parent() -> None:
    seed = SPEC_135M.fingerprint
    full = hash_token_blocks(list(range(48)), 16, seed)
    assert hash_token_blocks(list(range(16, 48)), 16, full[0]) == full[1:]


def test_a_block_hash_depends_on_its_whole_prefix() -> None:
    seed = SPEC_135M.fingerprint
    a = hash_token_blocks([1] * 16 + [2] * 16, 16, seed)
    b = hash_token_blocks([3] * 16 + [2] * 16, 16, seed)
    assert a[1] != b[1]


@pytest.mark.parametrize(
    "other",
    [
        BlockSpec("dummy:other", num_layers=30, num_kv_heads=3, head_dim=64),
        BlockSpec("dummy:135m", num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16),
        BlockSpec("dummy:135m", num_layers=30, num_kv_heads=3, head_dim=64, block_size=32),
        BlockSpec("dummy:135m", num_layers=29, num_kv_heads=3, head_dim=64),
        BlockSpec("dummy:135m", num_layers=30, num_kv_heads=3, head_dim=64, kv_cache_dtype="int8"),
        BlockSpec(
            "dummy:135m", num_layers=30, num_kv_heads=3, head_dim=64, kv_cache_dtype="fp8_e4m3"
        ),
    ],
    ids=["model", "dtype", "block_size", "shape", "int8", "fp8_e4m3"],
)
def test_other_models_never_share_hashes(other: BlockSpec) -> None:
    tokens = list(range(64))
    assert other.fingerprint != SPEC_135M.fingerprint
    assert set(hash_token_blocks(tokens, 16, other.fingerprint)).isdisjoint(
        hash_token_blocks(tokens, 16, SPEC_135M.fingerprint)
    )


def test_a_salted_chain_is_fixed() -> None:
    # As the fingerprint: a changed salted seed would orphan every tenant's blocks.
    seed = chain_seed(SPEC_135M.fingerprint, "tenant-a")
    assert seed.hex() == SALTED_SEED_135M
    hashes = hash_token_blocks(list(range(40)), 16, SPEC_135M.fingerprint, "tenant-a")
    assert hashes == hash_token_blocks(list(range(40)), 16, seed)
    assert [h.hex() for h in hashes] == SALTED_HASHES_135M_0_TO_39


def test_no_salt_is_the_fingerprint_itself() -> None:
    # Unsalted requests keep the blocks stored before salts existed.
    assert chain_seed(SPEC_135M.fingerprint, None) == SPEC_135M.fingerprint
    assert hash_token_blocks(list(range(40)), 16, SPEC_135M.fingerprint, None) == [
        bytes.fromhex(h) for h in HASHES_135M_0_TO_39
    ]


def test_different_salts_share_no_block_with_each_other_or_with_no_salt() -> None:
    tokens = list(range(16 * 8))
    chains = [
        hash_token_blocks(tokens, 16, SPEC_135M.fingerprint, salt)
        for salt in (None, "a", "b", "ab", "a" * MAX_CACHE_SALT_BYTES)
    ]
    every_hash = [h for chain in chains for h in chain]
    assert len(every_hash) == 5 * 8
    assert len(set(every_hash)) == len(every_hash)
    # The same salt always gives the same chain.
    assert hash_token_blocks(tokens, 16, SPEC_135M.fingerprint, "a") == chains[1]


def test_an_empty_or_too_long_salt_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"^cache_salt is empty"):
        chain_seed(SPEC_135M.fingerprint, "")
    too_long = "é" * (MAX_CACHE_SALT_BYTES // 2 + 1)  # counted in UTF-8 bytes
    with pytest.raises(ValueError, match=f"^cache_salt is {MAX_CACHE_SALT_BYTES + 2} bytes"):
        hash_token_blocks(list(range(16)), 16, SPEC_135M.fingerprint, too_long)


def test_a_prompt_hash_names_every_token_the_tail_included() -> None:
    fingerprint = SPEC_135M.fingerprint
    full = hash_token_blocks(list(range(40)), 16, fingerprint)
    # 40 tokens: 2 full blocks and a tail of 8, chained on the last full block.
    assert hash_prompt(list(range(40)), 16, fingerprint) == hash_block(full[1], range(32, 40))
    assert hash_prompt(list(range(32)), 16, fingerprint) == full[1]  # no tail
    assert hash_prompt([5, 6], 16, fingerprint) == hash_block(fingerprint, [5, 6])
    prompts = [list(range(40)), [*range(39), 99], [*range(39)], [99, *range(1, 40)]]
    hashes = {hash_prompt(p, 16, fingerprint) for p in prompts}
    hashes |= {hash_prompt(list(range(40)), 16, fingerprint, salt) for salt in ("a", "b")}
    assert len(hashes) == 6


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="token ids"):
        hash_block(SPEC_135M.fingerprint, [-1] * 16)
    with pytest.raises(ValueError, match="seed"):
        hash_token_blocks(list(range(16)), 16, b"short")
    with pytest.raises(ValueError, match="block_size"):
        hash_token_blocks(list(range(16)), 0, SPEC_135M.fingerprint)


def test_spec_shape_and_size() -> None:
    assert SPEC_135M.shape == (30, 2, 16, 3, 64)
    assert SPEC_135M.nbytes == 737_280
    assert SPEC_135M.tail_shape(5) == (30, 2, 5, 3, 64)
    with pytest.raises(ValueError, match="num_tokens"):
        SPEC_135M.tail_shape(17)
    with pytest.raises(ValueError, match="num_layers"):
        BlockSpec("m", num_layers=0, num_kv_heads=1, head_dim=1)
    with pytest.raises(ValueError, match="dtype"):
        BlockSpec("m", num_layers=1, num_kv_heads=1, head_dim=1, dtype=torch.int64)
