"""The pieces together: scheduler slots and block tables drive write_kv_cache into the
pool's layer caches, and paged attention over them equals dense attention over each
sequence's own K/V."""

from __future__ import annotations

import pytest
import torch

from decode_worker.block_pool import BlockPool, BlockPoolConfig
from decode_worker.kernels.kv_cache_write import write_kv_cache
from decode_worker.kernels.paged_attention import paged_attention
from decode_worker.scheduler import Scheduler, SchedulerConfig
from decode_worker.sequence import SequenceRequest
from kvstore.hashing import hash_block

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 4, 2, 32, 4


def dense_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale):
    """query [num_heads, d]; keys, values [t, kvh, d] -> [num_heads, d]."""
    group = NUM_HEADS // NUM_KV_HEADS
    keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [h, t, d]
    values = values.repeat_interleave(group, dim=1).transpose(0, 1)
    probs = torch.softmax((keys @ query[:, :, None]).squeeze(-1) * scale, dim=-1)
    return (probs[:, None, :] @ values).squeeze(1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_scheduled_decode_steps_match_dense_attention(backend: str) -> None:
    pool = BlockPool(
        BlockPoolConfig(
            num_blocks=10,
            block_size=BLOCK_SIZE,
            num_layers=2,
            num_kv_heads=NUM_KV_HEADS,
            head_dim=HEAD_DIM,
        )
    )
    scheduler = Scheduler(
        SchedulerConfig(max_num_batched_tokens=8), pool, lambda p, t: hash_block(p or bytes(16), t)
    )
    generator = torch.Generator().manual_seed(0)
    # Each sequence's K/V per position and layer is fixed up front: what the model would
    # produce, and what dense attention is computed from.
    kv = {
        rid: torch.randn(2, 2, 20, NUM_KV_HEADS, HEAD_DIM, generator=generator)
        for rid in ("a", "b")
    }
    scheduler.add_request(SequenceRequest("a", tuple(range(6)), max_new_tokens=6))
    scheduler.add_request(SequenceRequest("b", tuple(range(50, 59)), max_new_tokens=5))
    num_checked = 0
    scale = HEAD_DIM**-0.5
    while scheduler.has_unfinished():
        out = scheduler.schedule()
        for layer in range(2):
            for entry in out.prefills + out.decodes:
                positions = slice(entry.start_pos, entry.context_len)
                write_kv_cache(
                    kv[entry.request_id][layer, 0, positions],
                    kv[entry.request_id][layer, 1, positions],
                    pool.key_cache(layer),
                    pool.value_cache(layer),
                    torch.tensor(entry.slot_mapping),
                    backend=backend,
                )
            if not out.decodes:
                continue
            max_blocks = max(len(e.block_table) for e in out.decodes)
            block_tables = torch.tensor(
                [
                    list(e.block_table) + [0] * (max_blocks - len(e.block_table))
                    for e in out.decodes
                ],
                dtype=torch.int32,
            )
            context_lens = torch.tensor([e.context_len for e in out.decodes], dtype=torch.int32)
            query = torch.randn(len(out.decodes), NUM_HEADS, HEAD_DIM, generator=generator)
            actual = paged_attention(
                query,
                pool.key_cache(layer),
                pool.value_cache(layer),
                block_tables,
                context_lens,
                scale,
                backend=backend,
            )
            for row, entry in enumerate(out.decodes):
                own = kv[entry.request_id][layer, :, : entry.context_len]
                expected = dense_attention(query[row], own[0], own[1], scale)
                assert torch.allclose(actual[row], expected, atol=1e-5, rtol=1e-4), (
                    f"{backend}: request {entry.request_id} layer {layer} ctx {entry.context_len}"
                )
                num_checked += 1
        scheduler.update({e.request_id: 7 for e in out.prefills + out.decodes if e.is_sampled})
    # a samples its first token from its prefill, then decodes 5; b's 9-token prompt is
    # chunked into 2 + 7 tokens by the budget of 8, then it decodes 4.
    assert num_checked == 2 * (5 + 4)
    pool.check_integrity()
    assert pool.num_free_blocks == pool.num_blocks
