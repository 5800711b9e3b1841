"""Triton kernel for `write_kv_cache`: one program per token copies its K and V rows
(`num_kv_heads * head_dim` elements each) to the token's slot in the paged cache."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from decode_worker.kernels.contracts import check_write_kv_cache_args


@triton.jit
def _write_kv_cache_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    stride_key_token,
    stride_value_token,
    ROW_SIZE: tl.constexpr,
    ROW_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)  # slot * ROW_SIZE overflows int32
    if slot < 0:
        return
    offsets = tl.arange(0, ROW_PAD)
    is_in_row = offsets < ROW_SIZE
    # The caches are contiguous, so slot s starts at s * ROW_SIZE in the flat view.
    k = tl.load(key_ptr + token * stride_key_token + offsets, mask=is_in_row)
    tl.store(key_cache_ptr + slot * ROW_SIZE + offsets, k, mask=is_in_row)
    v = tl.load(value_ptr + token * stride_value_token + offsets, mask=is_in_row)
    tl.store(value_cache_ptr + slot * ROW_SIZE + offsets, v, mask=is_in_row)


def write_kv_cache_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Launch the kernel; same contract as `decode_worker.kernels.kv_cache_write.write_kv_cache`."""
    check_write_kv_cache_args(key, value, key_cache, value_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    row_size = num_kv_heads * head_dim
    _write_kv_cache_kernel[(num_tokens,)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        key.stride(0),
        value.stride(0),
        ROW_SIZE=row_size,
        ROW_PAD=triton.next_power_of_2(row_size),
    )
