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
"""

from __future__ import annotations

from typing import Literal

import torch

Backend = Literal["triton", "torch"]
"""Which implementation runs an op; `None` where accepted picks Triton for CUDA tensors."""

CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Element types the caches may hold."""

INDEX_DTYPES = (torch.int32, torch.int64)
"""Element types a slot mapping may hold."""


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
) -> None:
    """Raise ValueError naming the first argument whose shape, dtype, device or strides
    do not match the layout in this module's docstring. Never reads tensor values, so
    it costs no device synchronization."""
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
    _, _, num_kv_heads, cache_head_dim = key_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"query head_dim {head_dim} != cache head_dim {cache_head_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
    if query.dtype not in CACHE_DTYPES:
        raise ValueError(f"query dtype must be one of {CACHE_DTYPES}, got {query.dtype}")
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if cache.dtype != query.dtype:
            raise ValueError(f"{name} dtype {cache.dtype} != query dtype {query.dtype}")
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
) -> None:
    """Raise ValueError naming the first argument that does not fit the layout above."""
    if key.dim() != 3:
        raise ValueError(f"key must be [num_tokens, num_kv_heads, head_dim], got {list(key.shape)}")
    if value.shape != key.shape:
        raise ValueError(f"value shape {list(value.shape)} != key shape {list(key.shape)}")
    if key_cache.dim() != 4 or key_cache.shape[2:] != key.shape[1:]:
        raise ValueError(
            f"key_cache must be [num_blocks, block_size, {key.shape[1]}, {key.shape[2]}], "
            f"got {list(key_cache.shape)}"
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
    for name, tensor in (("value", value), ("key_cache", key_cache), ("value_cache", value_cache)):
        if tensor.dtype != key.dtype:
            raise ValueError(f"{name} dtype {tensor.dtype} != key dtype {key.dtype}")
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


def _shape(tensor: torch.Tensor) -> list[int]:
    return list(tensor.shape)
