"""Paged attention micro-benchmark: our torch path (and the Triton kernel where CUDA
exists) against the per-sequence reference and against dense SDPA on K/V that is already
gathered into contiguous per-sequence tensors (the floor a paged layout has to approach).

    .venv/bin/python -m benchmarks.paged_attention [--threads N]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from decode_worker.kernels.paged_attention import paged_attention_reference, paged_attention_torch

# (num_seqs, context_len, num_heads, num_kv_heads, head_dim): SmolLM-135M-like heads.
SHAPES = [
    (1, 128, 9, 3, 64),
    (8, 256, 9, 3, 64),
    (32, 512, 9, 3, 64),
    (8, 2048, 9, 3, 64),
    (16, 1024, 32, 8, 128),
]
BLOCK_SIZE = 16


def time_call(
    fn: Callable[[], torch.Tensor], device: torch.device, min_seconds: float = 0.3
) -> float:
    """Median seconds per call over enough repeats to fill `min_seconds`."""
    fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds or len(times) < 3:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def make_inputs(num_seqs, context_len, num_heads, num_kv_heads, head_dim, device, dtype):
    """Each sequence's blocks scattered over a shuffled pool with room to spare; lengths
    vary from half to all of `context_len`, as in a real batch."""
    blocks_per_seq = -(-context_len // BLOCK_SIZE)
    num_blocks = 2 * num_seqs * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, device=device, dtype=dtype)
    value_cache = torch.randn(shape, device=device, dtype=dtype)
    query = torch.randn(num_seqs, num_heads, head_dim, device=device, dtype=dtype)
    perm = torch.randperm(num_blocks, device=device)[: num_seqs * blocks_per_seq]
    block_tables = perm.view(num_seqs, blocks_per_seq).int()
    lens = torch.linspace(context_len // 2, context_len, num_seqs).round().int().to(device)
    return query, key_cache, value_cache, block_tables, lens


def dense_sdpa(query, key_cache, value_cache, block_tables, context_lens):
    """Gather once (outside the timed call) into padded [s, kvh, t, d] K/V, then time
    only SDPA with a padding mask: what attention costs with no paging at all."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    max_len = int(context_lens.max())
    flat = block_tables.long().reshape(-1)
    keys = key_cache.index_select(0, flat).view(num_seqs, -1, num_kv_heads, head_dim)
    values = value_cache.index_select(0, flat).view(num_seqs, -1, num_kv_heads, head_dim)
    group = num_heads // num_kv_heads
    keys = keys[:, :max_len].transpose(1, 2).repeat_interleave(group, dim=1).contiguous()
    values = values[:, :max_len].transpose(1, 2).repeat_interleave(group, dim=1).contiguous()
    mask = torch.arange(max_len, device=query.device)[None, :] < context_lens[:, None]
    mask = mask[:, None, None, :]
    q = query[:, :, None, :]
    return lambda: F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def bench_shape(num_seqs, context_len, num_heads, num_kv_heads, head_dim, device, dtype) -> str:
    """One table row: times of every implementation on one shape, and the ratios."""
    inputs = make_inputs(num_seqs, context_len, num_heads, num_kv_heads, head_dim, device, dtype)
    scale = head_dim**-0.5
    t_torch = time_call(lambda: paged_attention_torch(*inputs, scale), device)
    t_sdpa = time_call(dense_sdpa(*inputs), device)
    t_ref = time_call(lambda: paged_attention_reference(*inputs, scale), device, 0.05)
    row = (
        f"{num_seqs:>5} {context_len:>5} {f'{num_heads}/{num_kv_heads}/{head_dim}':>10} "
        f"{t_ref * 1e3:>8.2f}ms {t_torch * 1e3:>7.3f}ms {t_sdpa * 1e3:>7.3f}ms"
    )
    if device.type == "cuda":
        from decode_worker.kernels.paged_attention_triton import paged_attention_triton

        t_triton = time_call(lambda: paged_attention_triton(*inputs, scale), device)
        row += f" {t_triton * 1e3:>7.3f}ms"
    return row + f"   {t_ref / t_torch:>8.1f}x  {t_torch / t_sdpa:>9.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    print(
        f"device={device} dtype={dtype} threads={torch.get_num_threads()} block_size={BLOCK_SIZE}"
    )
    header = f"{'seqs':>5} {'ctx':>5} {'h/kvh/d':>10} {'reference':>10} {'torch':>9} {'sdpa':>9}"
    if device.type == "cuda":
        header += f" {'triton':>9}"
    print(header + "   ref/torch  torch/sdpa")
    for shape in SHAPES:
        print(bench_shape(*shape, device=device, dtype=dtype))


if __name__ == "__main__":
    main()
