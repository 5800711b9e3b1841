"""Runs one scheduled step of the model over the paged KV pool.

The step's tokens are flattened decodes first, then prefill chunks. Every layer
writes the step's K/V into the pool by slot mapping; decodes attend with the
paged-attention op, prefill chunks with causal attention over their blocks
gathered from the pool (dequantized there, with an 8-bit KV cache dtype).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from decode_worker.block_pool import BlockPool
from decode_worker.cuda_graphs import DecodeGraphs, StaticDecodeInputs
from decode_worker.kernels.contracts import check_paged_attention_args
from decode_worker.kernels.kv_cache_write import write_kv_cache, write_kv_cache_torch
from decode_worker.kernels.paged_attention import (
    GatherBuffers,
    GatherLayout,
    gather_layout,
    paged_attention,
    paged_attention_torch,
)
from decode_worker.scheduler_output import ScheduledSequence, SchedulerOutput
from kvstore.kv_quant import KVCacheFormat
from model.attention import AttentionBackend, causal_window_mask
from model.loader import LoadedModel


class PagedAttentionBackend(AttentionBackend):
    """Attention for one step whose K/V lives in a `BlockPool`.

    Everything that depends only on the step's layout (slots, block tables, the torch
    path's gather indices and padding mask) is built once here, and the arguments are
    checked on the first layer only: the model calls `attend` once per layer with the
    same layout, and at batch 1 the per-layer bookkeeping cost as much as attention.
    """

    def __init__(
        self,
        pool: BlockPool,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor | None,
        context_lens: torch.Tensor | None,
        prefills: Sequence[ScheduledSequence],
        device: torch.device,
        gather_buffers: GatherBuffers | None = None,
    ) -> None:
        """The step's tokens are its decodes (one per row of `block_tables` and
        `context_lens`; None for none), then its `prefills`' chunks; `slot_mapping`
        has a slot per token. `for_step` builds these from a scheduled step."""
        self.pool = pool
        self.gather_buffers = gather_buffers
        self.kv_format = pool.kv_format
        self.kv_cache_dtype = pool.kv_format.name
        self.num_decode_tokens = 0 if block_tables is None else block_tables.shape[0]
        self.prefills = list(prefills)
        # Triton kernels on CUDA, the torch paths (which take the prebuilt layout) on CPU.
        self.is_torch_path = device.type != "cuda"
        self.slot_mapping = slot_mapping
        self.block_tables = block_tables
        self.context_lens = context_lens
        self._num_checked_layers = 0
        # Per window (None: the whole context), built on first use: the torch path's
        # gather layouts, and the prefill chunks' masks.
        self._layouts: dict[int | None, GatherLayout] = {}
        self._chunk_masks: dict[int | None, list[torch.Tensor]] = {}
        self.device = device
        # Prefill chunks gather their own blocks once per step too.
        self.chunk_blocks = [
            torch.tensor(
                c.block_table[: -(-c.context_len // pool.block_size)],
                dtype=torch.long,
                device=device,
            )
            for c in self.prefills
        ]

    @classmethod
    def for_step(
        cls,
        pool: BlockPool,
        decodes: Sequence[ScheduledSequence],
        prefills: Sequence[ScheduledSequence],
        device: torch.device,
        gather_buffers: GatherBuffers | None = None,
    ) -> PagedAttentionBackend:
        """The backend of one scheduled step: its tensors built from the sequences."""
        slot_mapping = torch.tensor(
            [slot for s in (*decodes, *prefills) for slot in s.slot_mapping],
            dtype=torch.long,
            device=device,
        )
        block_tables = context_lens = None
        if decodes:
            width = max(len(s.block_table) for s in decodes)
            block_tables = torch.tensor(
                [[*s.block_table, *[0] * (width - len(s.block_table))] for s in decodes],
                dtype=torch.int32,
                device=device,
            )
            context_lens = torch.tensor(
                [s.context_len for s in decodes], dtype=torch.int32, device=device
            )
        return cls(pool, slot_mapping, block_tables, context_lens, prefills, device, gather_buffers)

    def _layout(self, window: int | None) -> GatherLayout:
        assert self.block_tables is not None and self.context_lens is not None
        if window not in self._layouts:
            self._layouts[window] = gather_layout(
                self.block_tables, self.context_lens, self.pool.block_size, window
            )
        return self._layouts[window]

    def chunk_masks(self, window: int | None) -> list[torch.Tensor]:
        if window not in self._chunk_masks:
            self._chunk_masks[window] = [_chunk_mask(c, window, self.device) for c in self.prefills]
        return self._chunk_masks[window]

    def attend(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor:
        key_cache = self.pool.key_cache(layer_idx)
        value_cache = self.pool.value_cache(layer_idx)
        n, kv_cache_dtype = self.num_decode_tokens, self.kv_cache_dtype
        if self._num_checked_layers == 0 or not self.is_torch_path:
            write_kv_cache(
                key, value, key_cache, value_cache, self.slot_mapping,
                kv_cache_dtype=kv_cache_dtype,
            )  # fmt: skip
            if n:
                check_paged_attention_args(
                    query[:n], key_cache, value_cache, self.block_tables, self.context_lens,
                    kv_cache_dtype, window,
                )  # fmt: skip
            self._num_checked_layers += 1
        else:
            write_kv_cache_torch(
                key, value, key_cache, value_cache, self.slot_mapping, kv_cache_dtype
            )
        outputs = []
        if n:
            if self.is_torch_path:
                out = paged_attention_torch(
                    query[:n], key_cache, value_cache, self.block_tables, self.context_lens,
                    scale, self._layout(window), kv_cache_dtype, window, self.gather_buffers,
                )  # fmt: skip
            else:
                out = paged_attention(
                    query[:n], key_cache, value_cache, self.block_tables, self.context_lens,
                    scale, kv_cache_dtype=kv_cache_dtype, window=window,
                )  # fmt: skip
            outputs.append(out)
        start = n
        for chunk, blocks, mask in zip(
            self.prefills, self.chunk_blocks, self.chunk_masks(window), strict=True
        ):
            q = query[start : start + chunk.num_tokens]
            start += chunk.num_tokens
            outputs.append(
                _chunk_attention(
                    q, key_cache, value_cache, chunk, blocks, mask, scale, self.kv_format
                )
            )
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


def _chunk_mask(chunk: ScheduledSequence, window: int | None, device: torch.device) -> torch.Tensor:
    """bool `[chunk_len, context_len]`: token i of the chunk sees positions up to its own
    (with a `window`, the last `window` of them)."""
    return causal_window_mask(chunk.num_tokens, chunk.context_len, window, device)


def _chunk_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    chunk: ScheduledSequence,
    blocks: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    kv_format: KVCacheFormat,
) -> torch.Tensor:
    """Causal attention of a prefill chunk over its sequence's `blocks` (the chunk's own
    K/V already written), q: [chunk_len, num_heads, d]."""
    context_len = chunk.context_len
    k = key_cache[blocks].flatten(0, 1)[:context_len]
    v = value_cache[blocks].flatten(0, 1)[:context_len]
    if kv_format.is_quantized:
        k, v = kv_format.dequantize(k, q.dtype), kv_format.dequantize(v, q.dtype)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )
    return out.transpose(0, 1)


class ModelRunner:
    """Turns a SchedulerOutput into logits for the sequences that sample.

    With `graphs` (CUDA, unless `--enforce-eager`), decode-only steps replay a
    captured CUDA graph of their batch-size bucket; everything else runs eagerly."""

    def __init__(
        self, loaded: LoadedModel, pool: BlockPool, graphs: DecodeGraphs | None = None
    ) -> None:
        self.loaded = loaded
        self.pool = pool
        self.gather_buffers = GatherBuffers()
        self.graphs = graphs

    def attention_for_graph(self, inputs: StaticDecodeInputs, batch_size: int) -> AttentionBackend:
        """The attention of a captured decode step: the static buffers' first rows."""
        return PagedAttentionBackend(
            self.pool,
            inputs.slot_mapping[:batch_size],
            inputs.block_tables[:batch_size],
            inputs.context_lens[:batch_size],
            (),
            inputs.device,
            self.gather_buffers,
        )

    @torch.inference_mode()
    def run(self, step: SchedulerOutput) -> tuple[list[str], torch.Tensor]:
        """Returns the request ids that sample this step and their logits [n, vocab]."""
        if self.graphs is not None and step.decodes and not step.prefills:
            hidden = self.graphs.run(step.decodes)
            if hidden is not None:
                # A one-token step is a decode, or (rarely) a prompt chunk cut to one
                # token by the budget, which does not sample.
                rows = [i for i, s in enumerate(step.decodes) if s.is_sampled]
                if len(rows) < len(step.decodes):
                    hidden = hidden[torch.tensor(rows, device=hidden.device)]
                ids = [step.decodes[i].request_id for i in rows]
                return ids, self.loaded.model.compute_logits(hidden)
        device = self.loaded.device
        steps = [*step.decodes, *step.prefills]
        input_ids = torch.tensor([t for s in steps for t in s.token_ids], device=device)
        positions = torch.tensor(
            [p for s in steps for p in range(s.start_pos, s.context_len)], device=device
        )
        attention = PagedAttentionBackend.for_step(
            self.pool, step.decodes, step.prefills, device, self.gather_buffers
        )
        hidden = self.loaded.model(input_ids, positions, attention)
        last_rows, sampled_ids, end = [], [], 0
        for s in steps:
            end += s.num_tokens
            if s.is_sampled:
                last_rows.append(end - 1)
                sampled_ids.append(s.request_id)
        if not last_rows:
            return [], hidden.new_empty((0, self.loaded.config.vocab_size))
        rows = torch.tensor(last_rows, device=device)
        return sampled_ids, self.loaded.model.compute_logits(hidden[rows])
