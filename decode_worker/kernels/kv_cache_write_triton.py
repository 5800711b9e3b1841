"""Triton kernels for `write_kv_cache`: one program per token copies its K and V rows
(`num_kv_heads * head_dim` elements each) to the token's slot in the paged cache, or,
for an 8-bit cache, quantizes each head's row as `kvstore.kv_quant` does (absmax
scale rounded to float16, values divided by it with round-to-nearest-even) and
stores the values and the scale's two bytes."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from decode_worker.kernels.contracts import (
    KV_FORMAT_IDS,
    ROW_SCALE_BYTES,
    check_write_kv_cache_args,
)

_INT8 = tl.constexpr(KV_FORMAT_IDS["int8"])
# Adding then subtracting 1.5 * 2**23 rounds a float32 of magnitude below 2**22 to the
# nearest integer, ties to even (IEEE addition), as torch.round does.
_ROUNDING_MAGIC = tl.constexpr(12582912.0)
_MIN_SCALE = tl.constexpr(2.0**-24)  # as kvstore.kv_quant: float16's range
_MAX_SCALE = tl.constexpr(65504.0)


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


@triton.jit
def _quantize_rows(rows, QMAX: tl.constexpr, KV_FORMAT: tl.constexpr):
    """rows float32 [heads, dims] -> (8-bit values as uint8, float16 scale bits as uint16 [heads])."""
    amax = tl.max(tl.abs(rows), axis=1)
    scale = tl.math.div_rn(amax, QMAX)
    scale = tl.minimum(tl.maximum(scale, _MIN_SCALE), _MAX_SCALE).to(tl.float16)
    scaled = tl.math.div_rn(rows, scale.to(tl.float32)[:, None])
    scaled = tl.minimum(tl.maximum(scaled, -QMAX), QMAX)
    if KV_FORMAT == _INT8:
        rounded = (scaled + _ROUNDING_MAGIC) - _ROUNDING_MAGIC
        values = rounded.to(tl.int8).to(tl.uint8, bitcast=True)
    else:  # fp8 e4m3, rounded here so that the cast is exact
        values = _round_to_e4m3(scaled).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    return values, scale.to(tl.uint16, bitcast=True)


@triton.jit
def _round_to_e4m3(x):
    """float32 `x` (|x| <= 448) rounded to the nearest e4m3 value, ties to even, still
    as float32: e4m3 has 3 mantissa bits, so the step is 2**(exponent - 3), and 2**-9
    below its smallest normal (2**-6). Done in float32 rather than by the cast, whose
    rounding Triton's interpreter gets wrong where it carries into the exponent."""
    exponent = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    exponent = tl.maximum(exponent, -6)
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inverse_step = ((127 - exponent + 3) << 23).to(tl.float32, bitcast=True)  # both exact
    return ((x * inverse_step + _ROUNDING_MAGIC) - _ROUNDING_MAGIC) * step


@triton.jit
def _store_quantized(
    src_ptr,
    cache_ptr,
    stride_token,
    stride_head,
    token,
    slot,
    heads,
    dims,
    mask,
    HEAD_DIM: tl.constexpr,
    ROW_WIDTH: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    QMAX: tl.constexpr,
    KV_FORMAT: tl.constexpr,
):
    rows = tl.load(
        src_ptr + token * stride_token + heads[:, None] * stride_head + dims[None, :],
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    values, scale_bits = _quantize_rows(rows, QMAX, KV_FORMAT)
    # Slot s's rows start at s * NUM_KV_HEADS * ROW_WIDTH bytes in the contiguous cache.
    row_starts = cache_ptr + slot * (NUM_KV_HEADS * ROW_WIDTH) + heads * ROW_WIDTH
    is_head = heads < NUM_KV_HEADS
    tl.store(row_starts[:, None] + dims[None, :], values, mask=mask)
    tl.store(row_starts + HEAD_DIM, (scale_bits & 0xFF).to(tl.uint8), mask=is_head)
    tl.store(row_starts + HEAD_DIM + 1, (scale_bits >> 8).to(tl.uint8), mask=is_head)


@triton.jit
def _write_quantized_kv_cache_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    stride_key_token,
    stride_key_head,
    stride_value_token,
    stride_value_head,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    ROW_WIDTH: tl.constexpr,
    QMAX: tl.constexpr,
    KV_FORMAT: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, DIM_PAD)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)
    _store_quantized(
        key_ptr, key_cache_ptr, stride_key_token, stride_key_head, token, slot, heads, dims,
        mask, HEAD_DIM, ROW_WIDTH, NUM_KV_HEADS, QMAX, KV_FORMAT,
    )  # fmt: skip
    _store_quantized(
        value_ptr, value_cache_ptr, stride_value_token, stride_value_head, token, slot, heads,
        dims, mask, HEAD_DIM, ROW_WIDTH, NUM_KV_HEADS, QMAX, KV_FORMAT,
    )  # fmt: skip


def write_kv_cache_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str = "auto",
) -> None:
    """Launch the kernel; same contract as `decode_worker.kernels.kv_cache_write.write_kv_cache`."""
    check_write_kv_cache_args(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if kv_cache_dtype != "auto":
        kv_format = KV_FORMAT_IDS[kv_cache_dtype]
        _write_quantized_kv_cache_kernel[(num_tokens,)](
            key,
            value,
            key_cache,
            value_cache,
            slot_mapping,
            key.stride(0),
            key.stride(1),
            value.stride(0),
            value.stride(1),
            NUM_KV_HEADS=num_kv_heads,
            HEADS_PAD=triton.next_power_of_2(num_kv_heads),
            HEAD_DIM=head_dim,
            DIM_PAD=triton.next_power_of_2(head_dim),
            ROW_WIDTH=head_dim + ROW_SCALE_BYTES,
            QMAX=127.0 if kv_cache_dtype == "int8" else 448.0,
            KV_FORMAT=kv_format,
        )
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
