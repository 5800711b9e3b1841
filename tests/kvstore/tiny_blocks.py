"""Tiny deterministic KV blocks for the store tests (a module, not a conftest, so
test files can import it by a name no other test directory uses)."""

from __future__ import annotations

import torch

from kvstore.spec import BlockSpec

# 2 layers, 1 KV head, head_dim 4, 4-token blocks: 256 bytes of float32 per block.
TINY_SPEC = BlockSpec("test:tiny", num_layers=2, num_kv_heads=1, head_dim=4, block_size=4)


def make_block(
    seed: int, spec: BlockSpec = TINY_SPEC, num_tokens: int | None = None
) -> torch.Tensor:
    """A block (or a tail of `num_tokens`) whose values are a pure function of `seed`."""
    shape = spec.tail_shape(num_tokens or spec.block_size)
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape).to(
        spec.dtype
    ) + float(seed * 1000)
