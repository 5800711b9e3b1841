"""ContiguousKVAttention: chunked prefill and decode steps equal one-shot prefill."""

from __future__ import annotations

import torch

from model.attention import ContiguousKVAttention
from model.loader import load_model


@torch.inference_mode()
def test_chunks_continue_from_prefix_kv() -> None:
    loaded = load_model("dummy:tiny")
    model, config = loaded.model, loaded.config
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(0))

    full = ContiguousKVAttention([40])
    full_hidden = model(ids, torch.arange(40), full)
    full_kv = full.new_kv(0)
    assert full_kv.shape == (config.num_layers, 2, 40, config.num_kv_heads, config.head_dim)

    # Chunk 1 (tokens 0..15) as its own sequence, batched with an unrelated one.
    first = ContiguousKVAttention([16, 5])
    other = torch.tensor([7, 8, 9, 10, 11])
    model(torch.cat([ids[:16], other]), torch.cat([torch.arange(16), torch.arange(5)]), first)
    prefix = first.new_kv(0)
    torch.testing.assert_close(prefix, full_kv[:, :, :16], rtol=1e-5, atol=1e-5)

    # Chunk 2 (16..39) continues from chunk 1's K/V; a decode-style single token too.
    second = ContiguousKVAttention([24], [prefix])
    hidden = model(ids[16:], torch.arange(16, 40), second)
    torch.testing.assert_close(hidden, full_hidden[16:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second.new_kv(0), full_kv[:, :, 16:], rtol=1e-5, atol=1e-5)

    step = ContiguousKVAttention([1], [full_kv[:, :, :39]])
    hidden = model(ids[39:], torch.tensor([39]), step)
    torch.testing.assert_close(hidden, full_hidden[39:], rtol=1e-5, atol=1e-5)
