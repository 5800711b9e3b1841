"""The contracts of the decode kernels: tensor layouts, argument checks and the
backend type, shared by the ops (`paged_attention`, `write_kv_cache`), their torch
paths and their Triton kernels.

The Triton modules import only this one, so the ops can import them lazily (a
CPU-only install needs no Triton) without any import loop.

Paged attention, one layer:
- `query` `[num_seqs, num_heads, head_dim]`: the token being decoded, one per sequence.
- `key_cache`, `value_cache` `[num_blocks, block_size, num_kv_heads, head_dim]`.
- `block_tables` int32 `[num_seqs, max_blocks_per_seq]`: logical block i of sequence s
  lives in physical block `block_tables[s, i]`. Entries past a sequence's context are
  padding and are never read (any value, 0 by convention).
- `context_lens` int32 `[num_seqs]`: cached tokens per sequence, including the token
  being decoded, whose K/V the caller has already written (so every length is >= 1).
Query head h attends with KV head `h // (num_heads // num_kv_heads)` (MHA, GQA, MQA).

KV-cache write: `key`, `value` `[num_tokens, num_kv_heads, head_dim]` go to slot
`slot_mapping[i]` (`block_id * block_size + offset`, a flat token index into the
cache); a negative slot means "do not store this token".

With an 8-bit `kv_cache_dtype` (`int8`, `fp8_e4m3`) the caches are uint8
`[num_blocks, block_size, num_kv_heads, head_dim + 2]`: each row holds its 8-bit
values and then its float16 scale (`kvstore.kv_quant`). `write_kv_cache` quantizes
the rows it writes; paged attention reads the values, applies the scales (to the
scores for K, to the probabilities for V) and accumulates in float32.
"""

from __future__ import annotations

from typing import Literal

import torch

from kvstore.kv_format import KV_FORMAT_CODES, SCALE_BYTES, check_kv_cache_dtype

Backend = Literal["triton", "torch"]
"""Which implementation runs an op; `None` where accepted picks Triton for CUDA tensors."""

CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Element types the caches may hold."""

INDEX_DTYPES = (torch.int32, torch.int64)
"""Element types a slot mapping may hold."""

KV_FORMAT_IDS = KV_FORMAT_CODES
"""`kv_cache_dtype` by the number the Triton kernels take as a constexpr (0: rows in
the model's dtype, 1: int8 rows, 2: fp8 e4m3 rows)."""
ROW_SCALE_BYTES = SCALE_BYTES
"""Bytes of a quantized row's scale, after its `head_dim` values."""


def pick_backend(backend: Backend | None, tensor: torch.Tensor) -> Backend:
    """`backend`, or Triton for CUDA tensors and torch otherwise; ValueError for a bad name."""
    if backend is None:
        return "triton" if tensor.is_cuda else "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton', 'torch' or None, got {backend!r}")
    return backend


def check_paged_attention_args(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    kv_cache_dtype: str = "auto",
    window: int | None = None,
) -> None:
    """Raise ValueError naming the first argument whose shape, dtype, device or strides
    do not match the layout in this module's docstring (or a `window` below 1). Never
    reads tensor values, so it costs no device synchronization."""
    check_kv_cache_dtype(kv_cache_dtype)
    if window is not None and window < 1:
        raise ValueError(f"window must be None or >= 1 positions, got {window}")
    if query.dim() != 3:
        raise ValueError(f"query must be [num_seqs, num_heads, head_dim], got {_shape(query)}")
    if key_cache.dim() != 4:
        raise ValueError(
            "key_cache must be [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {_shape(key_cache)}"
        )
    if value_cache.shape != key_cache.shape:
        raise ValueError(
            f"value_cache shape {_shape(value_cache)} != key_cache shape {_shape(key_cache)}"
        )
    num_seqs, num_heads, head_dim = query.shape
    _, _, num_kv_heads, cache_row_width = key_cache.shape
    _check_row_width(cache_row_width, head_dim, kv_cache_dtype, "query head_dim")
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
    if query.dtype not in CACHE_DTYPES:
        raise ValueError(f"query dtype must be one of {CACHE_DTYPES}, got {query.dtype}")
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        _check_cache_dtype(name, cache, query.dtype, kv_cache_dtype, "query")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"block_tables must be [num_seqs={num_seqs}, max_blocks_per_seq], "
            f"got {_shape(block_tables)}"
        )
    if context_lens.shape != (num_seqs,):
        raise ValueError(f"context_lens must be [num_seqs={num_seqs}], got {_shape(context_lens)}")
    for name, index in (("block_tables", block_tables), ("context_lens", context_lens)):
        if index.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {index.dtype}")
    for name, tensor in (
        ("key_cache", key_cache),
        ("value_cache", value_cache),
        ("block_tables", block_tables),
        ("context_lens", context_lens),
    ):
        if tensor.device != query.device:
            raise ValueError(f"{name} is on {tensor.device}, query is on {query.device}")
    # The kernels walk rows with explicit strides but read each head vector (and each
    # block-table row) as one contiguous run.
    for name, tensor in (
        ("query", query),
        ("key_cache", key_cache),
        ("value_cache", value_cache),
        ("block_tables", block_tables),
        ("context_lens", context_lens),
    ):
        if tensor.numel() > 0 and tensor.stride(-1) != 1:
            raise ValueError(
                f"{name} must have a contiguous last dimension, strides {tensor.stride()}"
            )


def check_write_kv_cache_args(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str = "auto",
) -> None:
    """Raise ValueError naming the first argument that does not fit the layout above."""
    check_kv_cache_dtype(kv_cache_dtype)
    if key.dim() != 3:
        raise ValueError(f"key must be [num_tokens, num_kv_heads, head_dim], got {list(key.shape)}")
    if value.shape != key.shape:
        raise ValueError(f"value shape {list(value.shape)} != key shape {list(key.shape)}")
    row_width = key.shape[2] + (ROW_SCALE_BYTES if kv_cache_dtype != "auto" else 0)
    if key_cache.dim() != 4 or tuple(key_cache.shape[2:]) != (key.shape[1], row_width):
        raise ValueError(
            f"key_cache must be [num_blocks, block_size, {key.shape[1]}, {row_width}] "
            f"for kv_cache_dtype {kv_cache_dtype}, got {list(key_cache.shape)}"
        )
    if value_cache.shape != key_cache.shape:
        raise ValueError(
            f"value_cache shape {list(value_cache.shape)} != key_cache shape {list(key_cache.shape)}"
        )
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(
            f"slot_mapping must be [num_tokens={key.shape[0]}], got {list(slot_mapping.shape)}"
        )
    if slot_mapping.dtype not in INDEX_DTYPES:
        raise ValueError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    if value.dtype != key.dtype:
        raise ValueError(f"value dtype {value.dtype} != key dtype {key.dtype}")
    if key.dtype not in CACHE_DTYPES:
        raise ValueError(f"key dtype must be one of {CACHE_DTYPES}, got {key.dtype}")
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        _check_cache_dtype(name, cache, key.dtype, kv_cache_dtype, "key")
    for name, tensor in (
        ("value", value),
        ("key_cache", key_cache),
        ("value_cache", value_cache),
        ("slot_mapping", slot_mapping),
    ):
        if tensor.device != key.device:
            raise ValueError(f"{name} is on {tensor.device}, key is on {key.device}")
    # Tokens are copied as whole [num_kv_heads, head_dim] rows, and the torch path
    # flattens the caches into a slot-indexed view.
    for name, tensor in (("key_cache", key_cache), ("value_cache", value_cache)):
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous, strides {tensor.stride()}")
    for name, tensor in (("key", key), ("value", value)):
        if tensor.numel() > 0 and (tensor.stride(2) != 1 or tensor.stride(1) != key.shape[2]):
            raise ValueError(f"{name} rows must be contiguous, strides {tensor.stride()}")
    if slot_mapping.device.type == "cpu" and slot_mapping.numel() > 0:
        num_slots = key_cache.shape[0] * key_cache.shape[1]
        max_slot = int(slot_mapping.max())
        if max_slot >= num_slots:
            raise ValueError(f"slot_mapping holds slot {max_slot}, the cache has {num_slots} slots")


def _check_row_width(row_width: int, head_dim: int, kv_cache_dtype: str, what: str) -> None:
    scale_bytes = ROW_SCALE_BYTES if kv_cache_dtype != "auto" else 0
    if row_width != head_dim + scale_bytes:
        if scale_bytes:
            raise ValueError(
                f"{kv_cache_dtype} cache rows must be {what} {head_dim} + {scale_bytes} scale "
                f"bytes = {head_dim + scale_bytes}, got {row_width}"
            )
        raise ValueError(f"{what} {head_dim} != cache head_dim {row_width}")


def _check_cache_dtype(
    name: str, cache: torch.Tensor, dtype: torch.dtype, kv_cache_dtype: str, what: str
) -> None:
    if kv_cache_dtype == "auto":
        if cache.dtype != dtype:
            raise ValueError(f"{name} dtype {cache.dtype} != {what} dtype {dtype}")
    elif cache.dtype != torch.uint8:
        raise ValueError(
            f"{name} must be uint8 rows for kv_cache_dtype {kv_cache_dtype}, got {cache.dtype}"
        )


def _shape(tensor: torch.Tensor) -> list[int]:
    return list(tensor.shape)
