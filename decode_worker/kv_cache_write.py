"""Writing a step's new K/V into the paged cache, addressed by slot.

A slot is `block_id * block_size + offset`: the flat token index into one layer's
`[num_blocks, block_size, num_kv_heads, head_dim]` cache. The scheduler hands the model
runner one slot per token it computes; a negative slot means "do not store this token"
(padding, or a token whose K/V is already resident).

`write_kv_cache` has a Triton kernel (CUDA; CPU under `TRITON_INTERPRET=1`) and a torch
path (`index_copy_` on the flattened cache); both are tested against
`write_kv_cache_reference`, a per-token loop.
"""

from __future__ import annotations

import torch

from decode_worker.attention import Backend

_INDEX_DTYPES = (torch.int32, torch.int64)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    backend: Backend | None = None,
) -> None:
    """Store `key[i]`, `value[i]` (`[num_tokens, num_kv_heads, head_dim]`) at slot
    `slot_mapping[i]` of `key_cache`, `value_cache`, in place; skip negative slots.

    `backend=None` picks Triton for CUDA tensors and torch otherwise. Raises ValueError
    naming the offending argument for a wrong shape, dtype, device or layout, and (on
    CPU, where reading the slots is free) for a slot past the end of the cache. Two
    tokens with the same slot leave an unspecified one of them.
    """
    check_write_kv_cache_args(key, value, key_cache, value_cache, slot_mapping)
    if backend is None:
        backend = "triton" if key.is_cuda else "torch"
    if backend == "torch":
        write_kv_cache_torch(key, value, key_cache, value_cache, slot_mapping)
    elif backend == "triton":
        # Imported here so that a CPU-only install without Triton can still decode.
        from decode_worker.kv_cache_write_triton import write_kv_cache_triton

        write_kv_cache_triton(key, value, key_cache, value_cache, slot_mapping)
    else:
        raise ValueError(f"backend must be 'triton', 'torch' or None, got {backend!r}")


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
    if slot_mapping.dtype not in _INDEX_DTYPES:
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


def write_kv_cache_torch(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """One `index_copy_` per cache on the `[num_slots, num_kv_heads, head_dim]` view."""
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    slots = slot_mapping.long()
    is_stored = slots >= 0
    if not bool(is_stored.all()):
        slots, key, value = slots[is_stored], key[is_stored], value[is_stored]
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, key)
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, value)


def write_kv_cache_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """The obviously-correct definition: one token at a time, block and offset by hand."""
    block_size = key_cache.shape[1]
    for token, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        key_cache[slot // block_size, slot % block_size] = key[token]
        value_cache[slot // block_size, slot % block_size] = value[token]
