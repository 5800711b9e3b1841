"""Writing a step's new K/V into the paged cache, addressed by slot.

A slot is `block_id * block_size + offset`: the flat token index into one layer's
`[num_blocks, block_size, num_kv_heads, head_dim]` cache. The scheduler hands the model
runner one slot per token it computes; a negative slot means "do not store this token"
(padding, or a token whose K/V is already resident). Checks and layout:
`decode_worker.kernels.contracts`.

With an 8-bit `kv_cache_dtype` each row is quantized as it is written
(`kvstore.kv_quant`: its values and its scale, per token and KV head), so a row is
quantized once and never again: a block that is still filling keeps the precision
of the tokens already in it whatever the next token's range.

`write_kv_cache` has a Triton kernel (CUDA; CPU under `TRITON_INTERPRET=1`, in
`kv_cache_write_triton`) and a torch path (`index_copy_` on the flattened cache);
both are tested against `write_kv_cache_reference`, a per-token loop.
"""

from __future__ import annotations

import torch

from decode_worker.kernels.contracts import Backend, check_write_kv_cache_args, pick_backend
from kvstore.kv_quant import KVCacheFormat


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    backend: Backend | None = None,
    kv_cache_dtype: str = "auto",
) -> None:
    """Store `key[i]`, `value[i]` (`[num_tokens, num_kv_heads, head_dim]`) at slot
    `slot_mapping[i]` of `key_cache`, `value_cache`, in place; skip negative slots.
    With an 8-bit `kv_cache_dtype` the rows are quantized into the uint8 caches.

    `backend=None` picks Triton for CUDA tensors and torch otherwise. Raises ValueError
    naming the offending argument for a wrong shape, dtype, device or layout, and (on
    CPU, where reading the slots is free) for a slot past the end of the cache. Two
    tokens with the same slot leave an unspecified one of them.
    """
    check_write_kv_cache_args(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype)
    if pick_backend(backend, key) == "torch":
        write_kv_cache_torch(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype)
        return
    # Imported here so that a CPU-only install without Triton can still decode.
    from decode_worker.kernels.kv_cache_write_triton import write_kv_cache_triton

    write_kv_cache_triton(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype)


def write_kv_cache_torch(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str = "auto",
) -> None:
    """One `index_copy_` per cache on the `[num_slots, num_kv_heads, row_width]` view,
    of the rows quantized first with an 8-bit `kv_cache_dtype`."""
    num_kv_heads, row_width = key_cache.shape[2], key_cache.shape[3]
    slots = slot_mapping.long()
    is_stored = slots >= 0
    if not bool(is_stored.all()):
        slots, key, value = slots[is_stored], key[is_stored], value[is_stored]
    if kv_cache_dtype != "auto":
        kv_format = KVCacheFormat(kv_cache_dtype, key.dtype)
        key, value = kv_format.quantize(key), kv_format.quantize(value)
    key_cache.view(-1, num_kv_heads, row_width).index_copy_(0, slots, key)
    value_cache.view(-1, num_kv_heads, row_width).index_copy_(0, slots, value)


def write_kv_cache_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str = "auto",
) -> None:
    """The obviously-correct definition: one token at a time, block and offset by hand,
    each row quantized on its own with an 8-bit `kv_cache_dtype`."""
    kv_format = KVCacheFormat(kv_cache_dtype, key.dtype)
    block_size = key_cache.shape[1]
    for token, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        key_cache[slot // block_size, slot % block_size] = kv_format.quantize(key[token])
        value_cache[slot // block_size, slot % block_size] = kv_format.quantize(value[token])
