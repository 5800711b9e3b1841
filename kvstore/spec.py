"""The shape of one KV block and the fingerprint that keeps models apart.

A block payload holds K and V of every layer for `block_size` tokens, one
contiguous tensor `[num_layers, 2, block_size, num_kv_heads, row_width]`. A
request's *tail* (the partial last block of a prompt) has the same layout with
`0 < num_tokens <= block_size` tokens. A row is one token's K (or V) for one KV
head: `head_dim` elements of the model's dtype, or with an 8-bit KV cache dtype
(`kvstore.kv_format`) `head_dim + 2` bytes, the values and then their scale.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from kvstore.hashing import DEFAULT_BLOCK_SIZE
from kvstore.kv_format import AUTO, KV_FORMAT_CODES, check_kv_cache_dtype
from kvstore.kv_quant import KVCacheFormat

# Bump when the payload layout or the codec changes meaning: every hash and
# every key changes with it, so old blocks can never be read as new ones.
LAYOUT_VERSION = 2


# Payload dtypes the codec can carry, with the stable code written in headers.
# The codes are part of the on-wire format: never renumber, only append.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
}


@dataclass(frozen=True)
class BlockSpec:
    """What a KV block of one model looks like.

    The fingerprint is a property of the spec (rather than a separate value
    threaded through every call) because the two must never disagree: a store
    opened for one spec keys, hashes and validates everything with that spec's
    fingerprint.
    """

    model_id: str
    """Model identity, e.g. `dummy:135m` or the checkpoint's name and revision."""
    num_layers: int
    """Transformer layers; each contributes one K and one V slab."""
    num_kv_heads: int
    """Key/value heads per layer (fewer than query heads under GQA/MQA)."""
    head_dim: int
    """Channels per head."""
    block_size: int = DEFAULT_BLOCK_SIZE
    """Tokens per full block."""
    dtype: torch.dtype = torch.float32
    """The model's dtype, which K and V are computed in (and stored in, with `auto`)."""
    kv_cache_dtype: str = AUTO
    """How K/V rows are stored: `auto` (in `dtype`), `int8` or `fp8_e4m3`."""

    def __post_init__(self) -> None:
        if not self.model_id:
            raise ValueError("model_id must be a non-empty string")
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.dtype not in DTYPE_CODES:
            supported = ", ".join(str(d) for d in DTYPE_CODES)
            raise ValueError(f"dtype {self.dtype} is not supported; use one of {supported}")
        check_kv_cache_dtype(self.kv_cache_dtype)

    @classmethod
    def for_model(
        cls,
        model_id: str,
        config: Any,
        dtype: torch.dtype,
        block_size: int = DEFAULT_BLOCK_SIZE,
        kv_cache_dtype: str = AUTO,
    ) -> BlockSpec:
        """The spec of a model whose config has `num_layers`, `num_kv_heads` and
        `head_dim` (duck-typed, so the store does not depend on the model package)."""
        return cls(
            model_id=model_id,
            num_layers=config.num_layers,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            block_size=block_size,
            dtype=dtype,
            kv_cache_dtype=kv_cache_dtype,
        )

    @cached_property
    def kv_format(self) -> KVCacheFormat:
        """Quantizes and dequantizes this spec's rows."""
        return KVCacheFormat(self.kv_cache_dtype, self.dtype)

    @property
    def payload_dtype(self) -> torch.dtype:
        """Element type of a payload: `dtype`, or uint8 for an 8-bit KV cache dtype."""
        return self.kv_format.storage_dtype

    @property
    def row_width(self) -> int:
        """Elements per stored row (one token, one KV head)."""
        return self.kv_format.row_width(self.head_dim)

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """Shape of a full block payload."""
        return self.tail_shape(self.block_size)

    def tail_shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        """Shape of a payload holding `num_tokens` tokens (a tail when < block_size)."""
        if not 0 < num_tokens <= self.block_size:
            raise ValueError(f"num_tokens must be in 1..{self.block_size}, got {num_tokens}")
        return (self.num_layers, 2, num_tokens, self.num_kv_heads, self.row_width)

    def check_payload(self, kv: torch.Tensor, *, is_tail: bool = False) -> None:
        """Raises `ValueError` unless `kv` is a full block (or, with `is_tail`, a tail)."""
        if kv.dtype != self.payload_dtype:
            raise ValueError(f"KV payload dtype is {kv.dtype}, spec says {self.payload_dtype}")
        num_tokens = kv.shape[2] if kv.dim() == 5 else 0
        is_valid_len = (
            0 < num_tokens <= self.block_size if is_tail else num_tokens == self.block_size
        )
        if not is_valid_len or tuple(kv.shape) != self.tail_shape(num_tokens):
            expected = "[num_layers, 2, 1..block_size, ...]" if is_tail else str(self.shape)
            raise ValueError(f"KV payload shape is {tuple(kv.shape)}, expected {expected}")

    @property
    def bytes_per_token(self) -> int:
        """Payload bytes one token occupies across all layers, K and V."""
        itemsize = self.payload_dtype.itemsize
        return self.num_layers * 2 * self.num_kv_heads * self.row_width * itemsize

    @property
    def nbytes(self) -> int:
        """Payload bytes of a full block (header excluded)."""
        return self.block_size * self.bytes_per_token

    @cached_property
    def fingerprint(self) -> bytes:
        """16-byte digest of everything that makes two blocks interchangeable.

        Covers model identity, dtype, KV cache dtype, block size, layout version
        and the payload shape, so workers that differ in any of them never share a
        block (nor read one in another format).
        """
        fields = struct.pack(
            "<IIIIIII",
            LAYOUT_VERSION,
            DTYPE_CODES[self.dtype],
            KV_FORMAT_CODES[self.kv_cache_dtype],
            self.block_size,
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
        )
        digest = hashlib.blake2b(digest_size=16, person=b"kvrelay-fprint")
        digest.update(fields)
        digest.update(self.model_id.encode("utf-8"))
        return digest.digest()
