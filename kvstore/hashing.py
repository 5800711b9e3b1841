"""Chained block hashes: a prompt's token ids become one hash per full block.

`h_i = blake2b(h_{i-1} ‖ token_ids of block i)` with `h_{-1}` the model
fingerprint, so a hash names a block *and its whole prefix*: two prompts share
block `i` only if they agree on every token up to its end, under the same model.

blake2b rather than xxh3: a collision would feed one tenant's KV to another's
prompt, and xxh3 is not collision-resistant against someone who picks the
tokens. Hashing costs about a microsecond per 16-token block, nothing next to
the forward pass. Token ids are encoded as little-endian uint32, so the result
is the same on every machine, process and Python version (no `hash()`, no
`PYTHONHASHSEED`).

A request's `cache_salt` (vLLM's name) replaces `h_{-1}` by a digest of the
fingerprint and the salt (`chain_seed`), so every block of a salted chain differs
from every block of another salt's chain and of the unsalted one: tenants with
different salts share no prefix in any cache (router, prefill lookups, decode pool,
store), and cannot learn from a cache hit what another tenant's prompt was.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

BlockHash = bytes
"""16-byte digest naming a full block and its prefix."""

BLOCK_HASH_LEN = 16

DEFAULT_BLOCK_SIZE = 16
"""Tokens per KV block unless a flag says otherwise: the one place it is defined
(here, in a torch-free module, so the CLI and the router can read it)."""

MAX_CACHE_SALT_BYTES = 256
"""Longest `cache_salt`, in UTF-8 bytes (a 256-bit random salt in base64 is 44)."""

_MAX_TOKEN_ID = 2**32 - 1


def chain_seed(fingerprint: bytes, cache_salt: str | None = None) -> BlockHash:
    """The parent of a prompt's first block: the fingerprint itself without a salt,
    else blake2b(fingerprint ‖ salt) under a personalization of its own, so no salted
    seed can equal a fingerprint or another salt's seed. Raises ValueError as
    `check_cache_salt` does."""
    check_cache_salt(cache_salt)
    if cache_salt is None:
        return fingerprint
    digest = hashlib.blake2b(fingerprint, digest_size=BLOCK_HASH_LEN, person=b"kvrelay-salt")
    digest.update(cache_salt.encode("utf-8"))
    return digest.digest()


def check_cache_salt(cache_salt: str | None) -> None:
    """Raises ValueError, naming `cache_salt`, for a salt that is set but empty (which
    would read as no salt) or over MAX_CACHE_SALT_BYTES. Every service applies it."""
    if cache_salt is None:
        return
    num_bytes = len(cache_salt.encode("utf-8"))
    if num_bytes == 0:
        raise ValueError("cache_salt is empty; leave it unset or send a non-empty string")
    if num_bytes > MAX_CACHE_SALT_BYTES:
        raise ValueError(
            f"cache_salt is {num_bytes} bytes; the limit is {MAX_CACHE_SALT_BYTES}; "
            "send a shorter salt"
        )


def hash_block(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """Hash of the block holding `token_ids` whose prefix hashes to `parent`."""
    if any(not 0 <= t <= _MAX_TOKEN_ID for t in token_ids):
        raise ValueError(f"token ids must be in 0..{_MAX_TOKEN_ID}")
    digest = hashlib.blake2b(parent, digest_size=BLOCK_HASH_LEN)
    digest.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return digest.digest()


def hash_token_blocks(
    token_ids: Sequence[int],
    block_size: int,
    seed: bytes,
    cache_salt: str | None = None,
) -> list[BlockHash]:
    """One hash per *full* block of `token_ids`; the partial last block has none.

    `seed` is the model fingerprint (`BlockSpec.fingerprint`) for a prompt's
    first block, salted with the request's `cache_salt` (`chain_seed`), or the
    hash of the block before `token_ids[0]` to extend a chain (which already
    carries its salt: leave `cache_salt` unset).
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if len(seed) != BLOCK_HASH_LEN:
        raise ValueError(f"seed must be {BLOCK_HASH_LEN} bytes, got {len(seed)}")
    hashes: list[BlockHash] = []
    parent = chain_seed(seed, cache_salt)
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


def hash_prompt(
    token_ids: Sequence[int],
    block_size: int,
    fingerprint: bytes,
    cache_salt: str | None = None,
) -> BlockHash:
    """A hash of the whole prompt: its chain of full blocks (seeded as
    `hash_token_blocks` seeds it) extended over the partial last block, if any.

    It binds a prompt's tail to the prompt it was computed for: the prefill worker
    stores the tail under it and the decode worker reads it back only with the one
    it computes from its own prompt, so a caller that names another request's tail
    gets a miss, never K/V of other tokens filed under its prompt's hashes.
    """
    hashes = hash_token_blocks(token_ids, block_size, fingerprint, cache_salt)
    tail = token_ids[len(hashes) * block_size :]
    parent = hashes[-1] if hashes else chain_seed(fingerprint, cache_salt)
    return hash_block(parent, tail) if tail else parent


def first_seen_block(position: int, window: int, block_size: int) -> int:
    """The first block a token at `position` sees through a sliding `window` (the last
    `window` positions, its own included): blocks before it are never read for it."""
    return max(position - window + 1, 0) // block_size
