"""Triton kernels for paged attention, flash-decoding style.

A decode step has one query token per sequence, so one program per (sequence, KV head)
gives too few programs to fill a GPU when the batch is small and contexts are long.
The context is therefore split into partitions of `partition_size` tokens:

1. the partition kernel, grid `(num_seqs, num_kv_heads, num_partitions)`, runs online
   softmax over its partition's blocks for all query heads of one KV head group (so each
   K/V block is read once per group, not once per query head) and writes the partial
   max, sum of exponentials and unnormalized output;
2. the reduce kernel, grid `(num_seqs, num_heads)`, rescales the partials to a common
   max and normalizes.

With an 8-bit cache (`KV_FORMAT` 1: int8, 2: fp8 e4m3) each row is `HEAD_DIM` value
bytes and then its float16 scale: the values are widened to float32 in registers, K's
scales multiply the scores and V's the probabilities, so nothing is dequantized in
memory and the bytes read per token are about a quarter of float32's.

When one partition covers the whole context, the partition kernel normalizes and writes
the output itself and the reduce pass is skipped. The number of partitions comes from
`block_tables.shape[1]` (an upper bound), never from `context_lens` values, so launching
needs no device-to-host sync; programs whose partition starts past their sequence's
context exit at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from decode_worker.kernels.contracts import KV_FORMAT_IDS, check_paged_attention_args

_AUTO = tl.constexpr(KV_FORMAT_IDS["auto"])
_INT8 = tl.constexpr(KV_FORMAT_IDS["int8"])

# 512 tokens: long enough that a partition amortizes its partial write-out, short enough
# that a batch of a few sequences at 4k+ context still yields hundreds of programs.
DEFAULT_PARTITION_SIZE = 512
# A window no context reaches past (context lengths are int32).
_NO_WINDOW = 2**30
# Below this many (sequence, KV head) programs a GPU has idle SMs; split the context.
_MIN_PROGRAMS_WITHOUT_SPLIT = 256


@triton.jit
def _load_rows(row_ptrs, dims, is_valid, HEAD_DIM: tl.constexpr, KV_FORMAT: tl.constexpr):
    """One block's rows `[BLOCK_SIZE, HEAD_DIM]` as float32, and their scales
    `[BLOCK_SIZE]` (ones for rows in the model's dtype, which callers skip)."""
    raw = tl.load(row_ptrs[:, None] + dims[None, :], mask=is_valid[:, None], other=0)
    if KV_FORMAT == _AUTO:
        values = raw.to(tl.float32)
        scales = tl.full(is_valid.shape, 1.0, tl.float32)
    else:
        if KV_FORMAT == _INT8:
            values = raw.to(tl.int8, bitcast=True).to(tl.float32)
        else:
            values = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        low = tl.load(row_ptrs + HEAD_DIM, mask=is_valid, other=0).to(tl.uint16)
        high = tl.load(row_ptrs + HEAD_DIM + 1, mask=is_valid, other=0).to(tl.uint16)
        scales = (low | (high << 8)).to(tl.float16, bitcast=True).to(tl.float32)
    return values, scales


@triton.jit
def _paged_attention_partition_kernel(
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    partial_out_ptr,
    scale,
    window,
    stride_q_seq,
    stride_q_head,
    stride_k_block,
    stride_k_token,
    stride_k_head,
    stride_v_block,
    stride_v_token,
    stride_v_head,
    stride_bt_seq,
    stride_o_seq,
    stride_o_head,
    num_partitions,
    GROUP_SIZE: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCKS_PER_PARTITION: tl.constexpr,
    IS_SINGLE_PARTITION: tl.constexpr,
    KV_FORMAT: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    partition = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    first_block = partition * BLOCKS_PER_PARTITION
    if first_block * BLOCK_SIZE >= context_len:
        return  # the reduce pass only reads partitions that start inside the context
    # The first position seen: 0, or with a window (sliding-window layers) the first
    # of the last `window`. Blocks wholly before it are skipped, and a partition wholly
    # before it writes an empty partial (max -inf, sum 0), which the reduce weighs 0.
    window_start = tl.maximum(context_len - window, 0)

    group = tl.arange(0, GROUP_PAD)
    is_head = group < GROUP_SIZE
    heads = kv_head * GROUP_SIZE + group
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        query_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :],
        mask=is_head[:, None],
        other=0.0,
    ).to(tl.float32)
    q = q * scale

    running_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    running_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    tokens = tl.arange(0, BLOCK_SIZE)
    num_context_blocks = tl.cdiv(context_len, BLOCK_SIZE)
    last_block = tl.minimum(first_block + BLOCKS_PER_PARTITION, num_context_blocks)
    # The first block read holds a position the window sees, so no block's scores are
    # all -inf before one that is not (which would make the running max NaN).
    for logical_block in range(tl.maximum(first_block, window_start // BLOCK_SIZE), last_block):
        physical_block = tl.load(block_tables_ptr + seq * stride_bt_seq + logical_block)
        physical_block = physical_block.to(tl.int64)  # block * stride overflows int32
        positions = logical_block * BLOCK_SIZE + tokens
        is_valid = (positions < context_len) & (positions >= window_start)
        k, k_scales = _load_rows(
            key_cache_ptr
            + physical_block * stride_k_block
            + tokens * stride_k_token
            + kv_head * stride_k_head,
            dims,
            is_valid,
            HEAD_DIM,
            KV_FORMAT,
        )
        # Broadcast-multiply instead of tl.dot: the group and block dims can be below
        # tl.dot's 16 minimum, and decode is bound by reading K/V, not by FLOPs.
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [GROUP_PAD, BLOCK_SIZE]
        if KV_FORMAT != _AUTO:
            scores = scores * k_scales[None, :]
        scores = tl.where(is_valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        rescale = tl.exp(running_max - new_max)
        probs = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(probs, axis=1)
        v, v_scales = _load_rows(
            value_cache_ptr
            + physical_block * stride_v_block
            + tokens * stride_v_token
            + kv_head * stride_v_head,
            dims,
            is_valid,
            HEAD_DIM,
            KV_FORMAT,
        )
        probs_v = probs * v_scales[None, :] if KV_FORMAT != _AUTO else probs
        acc = acc * rescale[:, None] + tl.sum(probs_v[:, :, None] * v[None, :, :], axis=1)
        running_max = new_max

    if IS_SINGLE_PARTITION:
        out = acc / running_sum[:, None]
        tl.store(
            out_ptr + seq * stride_o_seq + heads[:, None] * stride_o_head + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=is_head[:, None],
        )
    else:
        # Partials are contiguous [num_seqs, num_heads, num_partitions(, HEAD_DIM)].
        stat_offsets = (seq * tl.num_programs(1) * GROUP_SIZE + heads) * num_partitions + partition
        tl.store(partial_max_ptr + stat_offsets, running_max, mask=is_head)
        tl.store(partial_sum_ptr + stat_offsets, running_sum, mask=is_head)
        tl.store(
            partial_out_ptr + stat_offsets[:, None] * HEAD_DIM + dims[None, :],
            acc,
            mask=is_head[:, None],
        )


@triton.jit
def _paged_attention_reduce_kernel(
    out_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    partial_out_ptr,
    context_lens_ptr,
    stride_o_seq,
    stride_o_head,
    num_partitions,
    HEAD_DIM: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,
    PARTITIONS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    num_used = tl.cdiv(context_len, PARTITION_SIZE)
    partitions = tl.arange(0, PARTITIONS_PAD)
    is_used = partitions < num_used
    stat_offsets = (seq * tl.num_programs(1) + head) * num_partitions + partitions
    maxes = tl.load(partial_max_ptr + stat_offsets, mask=is_used, other=float("-inf"))
    sums = tl.load(partial_sum_ptr + stat_offsets, mask=is_used, other=0.0)
    global_max = tl.max(maxes, axis=0)
    weights = tl.where(is_used, tl.exp(maxes - global_max), 0.0)
    dims = tl.arange(0, HEAD_DIM)
    partial_out = tl.load(
        partial_out_ptr + stat_offsets[:, None] * HEAD_DIM + dims[None, :],
        mask=is_used[:, None],
        other=0.0,
    )
    out = tl.sum(partial_out * weights[:, None], axis=0) / tl.sum(sums * weights, axis=0)
    tl.store(
        out_ptr + seq * stride_o_seq + head * stride_o_head + dims,
        out.to(out_ptr.dtype.element_ty),
    )


def paged_attention_triton(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    partition_size: int | None = None,
    kv_cache_dtype: str = "auto",
    window: int | None = None,
) -> torch.Tensor:
    """Launch the kernels; same contract as `decode_worker.kernels.paged_attention.paged_attention`.

    `partition_size` (tokens, a multiple of the block size) forces a split; by default
    the context is split only when (num_seqs * num_kv_heads) programs would leave the
    GPU idle. Raises ValueError for layouts the kernels cannot run.
    """
    check_paged_attention_args(
        query, key_cache, value_cache, block_tables, context_lens, kv_cache_dtype, window
    )
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    for name, size in (("head_dim", head_dim), ("block_size", block_size)):
        if size < 1 or size & (size - 1):
            raise ValueError(f"triton paged attention needs a power-of-two {name}, got {size}")
    if head_dim < 16:
        raise ValueError(f"triton paged attention needs head_dim >= 16, got {head_dim}")
    out = torch.empty_like(query)
    max_blocks_per_seq = block_tables.shape[1]
    if num_seqs == 0 or max_blocks_per_seq == 0:
        return out
    if partition_size is None:
        is_split = num_seqs * num_kv_heads < _MIN_PROGRAMS_WITHOUT_SPLIT
        partition_size = DEFAULT_PARTITION_SIZE if is_split else max_blocks_per_seq * block_size
    if partition_size <= 0 or partition_size % block_size:
        raise ValueError(
            f"partition_size {partition_size} must be a positive multiple of block_size {block_size}"
        )
    blocks_per_partition = min(partition_size // block_size, max_blocks_per_seq)
    num_partitions = triton.cdiv(max_blocks_per_seq, blocks_per_partition)
    is_single_partition = num_partitions == 1
    group_size = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group_size)
    # The broadcast products hold GROUP_PAD * BLOCK_SIZE * HEAD_DIM floats; spread big
    # tiles over more warps so they stay in registers instead of spilling.
    tile_size = group_pad * block_size * head_dim
    num_warps = 4 if tile_size <= 8192 else 8
    if is_single_partition:
        partial_max = partial_sum = partial_out = out  # unused by the kernel
    else:
        partial_max = torch.empty(
            num_seqs, num_heads, num_partitions, dtype=torch.float32, device=query.device
        )
        partial_sum = torch.empty_like(partial_max)
        partial_out = torch.empty(
            num_seqs, num_heads, num_partitions, head_dim, dtype=torch.float32, device=query.device
        )
    _paged_attention_partition_kernel[(num_seqs, num_kv_heads, num_partitions)](
        query,
        key_cache,
        value_cache,
        block_tables,
        context_lens,
        out,
        partial_max,
        partial_sum,
        partial_out,
        scale,
        window or _NO_WINDOW,
        query.stride(0),
        query.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        num_partitions,
        GROUP_SIZE=group_size,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCKS_PER_PARTITION=blocks_per_partition,
        IS_SINGLE_PARTITION=is_single_partition,
        KV_FORMAT=KV_FORMAT_IDS[kv_cache_dtype],
        num_warps=num_warps,
    )
    if not is_single_partition:
        _paged_attention_reduce_kernel[(num_seqs, num_heads)](
            out,
            partial_max,
            partial_sum,
            partial_out,
            context_lens,
            out.stride(0),
            out.stride(1),
            num_partitions,
            HEAD_DIM=head_dim,
            PARTITION_SIZE=blocks_per_partition * block_size,
            PARTITIONS_PAD=triton.next_power_of_2(num_partitions),
        )
    return out
