"""The paged-attention op: one decode query per sequence against its paged KV cache.

The layout and the argument checks are in `decode_worker.kernels.contracts`. Two
implementations share them: a Triton kernel (CUDA; CPU under `TRITON_INTERPRET=1`,
in `paged_attention_triton`) and a batched torch path (what CPU decode runs). Both
are tested against `paged_attention_reference`, a per-sequence loop written to be
obviously right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from decode_worker.kernels.contracts import Backend, check_paged_attention_args, pick_backend
from kvstore.kv_quant import KVCacheFormat


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    backend: Backend | None = None,
    kv_cache_dtype: str = "auto",
    window: int | None = None,
) -> torch.Tensor:
    """Attention of each sequence's query over its first `context_lens[s]` cached tokens,
    or with a `window` over the last `window` of them only (sliding-window layers;
    blocks wholly before the window are not read).

    `backend=None` picks Triton for CUDA tensors and torch otherwise. `kv_cache_dtype`
    says how the caches hold rows (`auto`: the query's dtype; `int8`, `fp8_e4m3`:
    8-bit rows with their scales). Raises ValueError naming the offending argument
    when shapes, dtypes, devices or strides are wrong. Returns a new `[num_seqs,
    num_heads, head_dim]` tensor in `query.dtype`.
    """
    check_paged_attention_args(
        query, key_cache, value_cache, block_tables, context_lens, kv_cache_dtype, window
    )
    if pick_backend(backend, query) == "torch":
        return paged_attention_torch(
            query, key_cache, value_cache, block_tables, context_lens, scale,
            kv_cache_dtype=kv_cache_dtype, window=window,
        )  # fmt: skip
    # Imported here so that a CPU-only install without Triton can still decode.
    from decode_worker.kernels.paged_attention_triton import paged_attention_triton

    return paged_attention_triton(
        query, key_cache, value_cache, block_tables, context_lens, scale,
        kv_cache_dtype=kv_cache_dtype, window=window,
    )  # fmt: skip


@dataclass(frozen=True)
class GatherLayout:
    """What the torch path reads from `block_tables` and `context_lens`: the same for
    every layer of a step (every layer with the same window), so the model runner
    builds it once per step, not per layer."""

    block_indices: torch.Tensor
    """int64 `[num_seqs * num_ctx_blocks]`: the physical blocks to gather, sequence by
    sequence, from the first block the window reaches; padding entries point at
    block 0 (gathered, then masked out)."""
    is_padding: torch.Tensor | None
    """bool `[num_seqs, 1, 1, padded_len]`: gathered tokens past a sequence's context
    or before its window; None when there are none."""
    is_attended: torch.Tensor | None
    """`~is_padding`, the form `scaled_dot_product_attention` takes; None with it."""
    padded_len: int
    """`num_ctx_blocks * block_size` tokens per sequence after the gather."""
    window: int | None = None
    """The window it was built for (None: the whole context)."""


def gather_layout(
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    window: int | None = None,
) -> GatherLayout:
    """The `GatherLayout` of one step. Reads `context_lens` on the host (one sync; free
    on CPU)."""
    device = block_tables.device
    context_lens = context_lens.long()
    starts = (context_lens - window).clamp(min=0) if window else torch.zeros_like(context_lens)
    first_blocks = starts // block_size
    num_blocks = (context_lens + block_size - 1) // block_size - first_blocks
    num_ctx_blocks = int(num_blocks.max())
    # Padding entries may hold anything; point them at block 0 so index_select stays in
    # range. The mask hides whatever they gather.
    offsets = torch.arange(num_ctx_blocks, device=device)
    logical = (first_blocks[:, None] + offsets[None, :]).clamp(max=block_tables.shape[1] - 1)
    tables = block_tables.long().gather(1, logical)
    tables = torch.where(offsets[None, :] < num_blocks[:, None], tables, 0).reshape(-1)
    padded_len = num_ctx_blocks * block_size
    positions = first_blocks[:, None] * block_size + torch.arange(padded_len, device=device)
    is_padding = (positions >= context_lens[:, None]) | (positions < starts[:, None])
    has_padding = bool(is_padding.any())
    return GatherLayout(
        block_indices=tables,
        is_padding=is_padding[:, None, None, :] if has_padding else None,
        is_attended=~is_padding[:, None, None, :] if has_padding else None,
        padded_len=padded_len,
        window=window,
    )


class GatherBuffers:
    """Destinations for the torch path's block gathers, kept from layer to layer and
    step to step. A gather of a batch-16 step is megabytes; a fresh tensor that size
    comes from the OS as new pages every time, and faulting them in took 8x as long
    as the copy itself when measured (4.0 ms against 0.5 ms a layer at 16 sequences
    of ~300 tokens). Grows, never shrinks. Not thread-safe: one per engine."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """A `shape` tensor whose contents are whatever its last user left."""
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.device != device:
            buffer = torch.empty(0, dtype=dtype, device=device)
        if buffer.numel() < numel:
            # Headroom, so that contexts growing a block at a time do not reallocate.
            buffer = torch.empty(numel + numel // 2, dtype=dtype, device=device)
            self._buffers[name] = buffer
        return buffer[:numel].view(shape)


def _gather_blocks(
    cache: torch.Tensor, layout: GatherLayout, buffers: GatherBuffers | None, name: str
) -> torch.Tensor:
    if buffers is None:
        return cache.index_select(0, layout.block_indices)
    shape = (layout.block_indices.numel(), *cache.shape[1:])
    out = buffers.take(name, shape, cache.dtype, cache.device)
    return torch.index_select(cache, 0, layout.block_indices, out=out)


def paged_attention_torch(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    layout: GatherLayout | None = None,
    kv_cache_dtype: str = "auto",
    window: int | None = None,
    buffers: GatherBuffers | None = None,
) -> torch.Tensor:
    """Batched torch path: gather every sequence's blocks (with a `window`, those it
    reaches) into one padded `[num_seqs, max_context_len, num_kv_heads, head_dim]`
    tensor and attend over it with a padding mask, so the cost is a handful of
    kernels per layer rather than a Python loop per sequence. `layout` is
    `gather_layout(block_tables, context_lens, block_size, window)`, computed here
    when not given; `buffers` (the caller's, reused) receive the gathers.

    K/V in the query's dtype go to `scaled_dot_product_attention` as they were
    gathered: its CPU kernel reads the `[num_seqs, num_kv_heads, t, head_dim]`
    transposed view in place, and each KV head's group of query heads is one query
    block of `group_size` rows, so K/V are read once per KV head (measured 5x faster
    than the transpose copy and two batched matmuls it replaced, at batch 16).

    8-bit rows are never dequantized as such: the values are widened to float32 by
    the copy that lays them out for a batched matmul, and the scales, one per token
    and head, multiply the scores (K's) and the probabilities (V's), which are
    `head_dim` times smaller than the K/V they stand for."""
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    if num_seqs == 0:
        return torch.empty_like(query)
    if layout is None:
        layout = gather_layout(block_tables, context_lens, block_size, window)
    if layout.window != window:
        raise ValueError(f"the gather layout is for window {layout.window}, not {window}")
    kv_format = KVCacheFormat(kv_cache_dtype, query.dtype)
    padded_len = layout.padded_len
    num_batches = num_seqs * num_kv_heads
    group_size = num_heads // num_kv_heads

    def gather(cache: torch.Tensor, name: str) -> torch.Tensor:
        # index_select copies whole blocks, one contiguous run each.
        blocks = _gather_blocks(cache, layout, buffers, name)
        return blocks.view(num_seqs, padded_len, num_kv_heads, -1).transpose(1, 2)

    if not kv_format.is_quantized:
        out = F.scaled_dot_product_attention(
            query.reshape(num_seqs, num_kv_heads, group_size, head_dim),
            gather(key_cache, "key"),
            gather(value_cache, "value"),
            attn_mask=layout.is_attended,
            scale=scale,
        )
        return out.view(num_seqs, num_heads, head_dim)

    def gather_quantized(cache: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        # The widening copy makes [s * kvh, t, d] contiguous, because batched matmul on a
        # permuted operand falls off the BLAS path and was ~100x slower when measured.
        # 3-D bmm rather than 4-D matmul: measured ~25 % faster at 16 sequences.
        values, scales = kv_format.split(gather(cache, name))
        scales = scales.reshape(num_batches, 1, padded_len).float()
        if kv_format.name == "fp8_e4m3":
            values, scales = _fp8_e4m3_as_float16(values), scales.mul_(_FP8_AS_FLOAT16_SCALE)
        shape = (num_seqs, num_kv_heads, padded_len, head_dim)
        if buffers is None:
            widened = torch.empty(shape, device=query.device)
        else:
            widened = buffers.take(f"{name}-float32", shape, torch.float32, query.device)
        widened.copy_(values)  # float32, as the softmax statistics
        return widened.view(num_batches, padded_len, head_dim), scales

    keys, key_scales = gather_quantized(key_cache, "key")
    values, value_scales = gather_quantized(value_cache, "value")
    queries = query.float().reshape(num_batches, group_size, head_dim) * scale
    scores = torch.bmm(queries, keys.transpose(1, 2)).mul_(key_scales)  # [s * kvh, group, t]
    if layout.is_padding is not None:
        scores.view(num_seqs, num_kv_heads, group_size, padded_len).masked_fill_(
            layout.is_padding, float("-inf")
        )
    probs = torch.softmax(scores, dim=-1).mul_(value_scales)
    out = torch.bmm(probs, values)  # [s * kvh, group, d]
    return out.view(num_seqs, num_heads, head_dim).to(query.dtype)


_FP8_AS_FLOAT16_SCALE = 2.0**8
"""e4m3's exponent bias is 7, float16's 15: moved into float16, an e4m3 value is
2^-8 of itself, so its row's scale takes the 2^8 back."""


def _fp8_e4m3_as_float16(values: torch.Tensor) -> torch.Tensor:
    """e4m3 values `[..., head_dim]` as float16 values 2^-8 times theirs, exactly
    (three mantissa bits fit in ten, subnormals included; no stored value is NaN).

    The sign and the seven exponent and mantissa bits move into place with integer
    ops; on CPUs torch's own float8 cast is an element-at-a-time conversion that was
    measured 2.8x slower than this at batch 16 x 1,024 tokens, and it ran twice per
    layer per decode step."""
    bits = torch.empty(values.shape, dtype=torch.int16, device=values.device)
    bits.copy_(values.view(torch.int8))  # sign-extended: bit 15 is the sign
    magnitude = (bits & 0x7F).bitwise_left_shift_(7)
    return magnitude.bitwise_or_(bits & -0x8000).view(torch.float16)


def paged_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    kv_cache_dtype: str = "auto",
    window: int | None = None,
) -> torch.Tensor:
    """The slow, obviously-correct definition: for each sequence, copy its tokens (the
    last `window` of them, with a window) out of the cache one at a time, dequantize
    them (8-bit rows) and run plain softmax attention per query head."""
    kv_format = KVCacheFormat(kv_cache_dtype, torch.float32)
    num_seqs, num_heads = query.shape[:2]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group_size = num_heads // num_kv_heads
    out = torch.empty_like(query)
    for seq in range(num_seqs):
        context_len = int(context_lens[seq])
        keys, values = [], []
        first = max(context_len - window, 0) if window else 0
        for pos in range(first, context_len):
            block = int(block_tables[seq, pos // block_size])
            keys.append(key_cache[block, pos % block_size])
            values.append(value_cache[block, pos % block_size])
        k = kv_format.dequantize(torch.stack(keys), torch.float32)  # [context_len, kvh, d]
        v = kv_format.dequantize(torch.stack(values), torch.float32)
        for head in range(num_heads):
            kv_head = head // group_size
            scores = (k[:, kv_head] @ query[seq, head].float()) * scale  # [context_len]
            out[seq, head] = (torch.softmax(scores, dim=0) @ v[:, kv_head]).to(query.dtype)
    return out
