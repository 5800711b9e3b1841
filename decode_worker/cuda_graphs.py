"""CUDA graphs for decode steps.

A decode step of a small model on a GPU is hundreds of short kernels, and launching
them from Python takes longer than running them. So on CUDA a step with decodes only
(no prefill chunk) replays a graph captured once per batch-size bucket, instead of
launching the model layer by layer:

- `graph_batch_sizes` is the ladder of buckets (vLLM's: 1, 2, 4, 8, then every
  16), and a step runs in the smallest bucket that holds its decodes.
- `StaticDecodeInputs` are the device buffers the graphs read, at fixed addresses:
  token ids, positions, slot mapping, context lengths and block tables. Each step
  packs them into one host tensor, copies it to the device once and unpacks it
  there; rows past the step's decodes are padding that stores nothing (slot -1)
  and attends to one token of block 0, so a bucket's graph runs whatever fills it.
- `DecodeGraphs` captures the model's forward over those buffers for every bucket,
  largest first, in one memory pool, and replays the bucket a step needs. Logits
  and sampling stay outside the graph, on the rows that are real.

Prefill chunks, steps larger than the largest bucket and `--enforce-eager` run
eagerly, as does everything on the CPU, which has no graphs. The bucket and padding
logic is the same code on both: on the CPU `DecodeGraphs.run` runs the padded step
eagerly, which is how the tests check it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

import torch

from decode_worker.block_pool import BlockPool
from decode_worker.scheduler_output import ScheduledSequence
from model.attention import AttentionBackend
from model.transformer import Transformer

PADDING_SLOT = -1
"""Padding rows' slot: the KV write skips negative slots."""
PADDING_CONTEXT_LEN = 1
"""Padding rows attend to one token (block 0's first, whatever it holds), so the
kernels see no empty context; their outputs are never read."""
_NUM_SCALAR_COLUMNS = 4
"""Packed columns before the block table: token id, position, slot, context length."""

AttentionFactory = Callable[["StaticDecodeInputs", int], AttentionBackend]
"""(the static buffers, batch size) -> the attention backend of a captured step: it
reads only the buffers' first `batch_size` rows and never synchronizes with the host."""


def graph_batch_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """The batch sizes graphs are captured for: 1, 2, 4, 8, then every multiple of
    16, up to and always including `max_num_seqs`. A batch pads to at most 15 rows
    past 16, and at most 2x below it, where rows are cheapest."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = {size for size in (1, 2, 4, 8) if size < max_num_seqs}
    sizes.update(range(16, max_num_seqs, 16))
    sizes.add(max_num_seqs)
    return tuple(sorted(sizes))


def bucket_for(num_seqs: int, sizes: Sequence[int]) -> int | None:
    """The smallest of `sizes` (ascending) that holds `num_seqs` rows; None when
    none does (the step runs eagerly)."""
    if num_seqs < 1:
        raise ValueError(f"a decode step has at least one sequence, got {num_seqs}")
    index = bisect.bisect_left(sizes, num_seqs)
    return sizes[index] if index < len(sizes) else None


class StaticDecodeInputs:
    """The device buffers captured graphs read, sized for the largest bucket.

    `input_ids`, `positions` and `slot_mapping` are int64 views into one packed
    buffer; `context_lens` and `block_tables` are int32 (the kernels' types), filled
    from it on the device. Columns of a block-table row past its sequence's blocks
    keep stale ids: the kernels read only blocks inside the context."""

    def __init__(self, max_num_seqs: int, max_blocks_per_seq: int, device: torch.device) -> None:
        if max_blocks_per_seq < 1:
            raise ValueError(f"max_blocks_per_seq must be >= 1, got {max_blocks_per_seq}")
        self.max_num_seqs = max_num_seqs
        self.max_blocks_per_seq = max_blocks_per_seq
        self.device = device
        width = _NUM_SCALAR_COLUMNS + max_blocks_per_seq
        self.packed = torch.zeros(max_num_seqs, width, dtype=torch.long, device=device)
        self.input_ids = self.packed[:, 0]
        self.positions = self.packed[:, 1]
        self.slot_mapping = self.packed[:, 2]
        self.context_lens = torch.empty(max_num_seqs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(
            max_num_seqs, max_blocks_per_seq, dtype=torch.int32, device=device
        )
        self.fill((), max_num_seqs)

    def fits(self, decodes: Sequence[ScheduledSequence]) -> bool:
        """Whether these decodes fit the buffers: few enough, one token each, and no
        block table wider than the buffers' rows."""
        return len(decodes) <= self.max_num_seqs and all(
            s.num_tokens == 1 and len(s.block_table) <= self.max_blocks_per_seq for s in decodes
        )

    def fill(self, decodes: Sequence[ScheduledSequence], batch_size: int) -> None:
        """Rows `[0, len(decodes))` from the decodes, `[len(decodes), batch_size)`
        padding; one host-to-device copy. Rows past `batch_size` are left as they
        are: the bucket's graph does not read them."""
        if not len(decodes) <= batch_size <= self.max_num_seqs:
            raise ValueError(
                f"{len(decodes)} decodes in a batch of {batch_size} (at most {self.max_num_seqs})"
            )
        if not self.fits(decodes):
            raise ValueError("a decode has more than one token or more blocks than the buffers")
        width = max((len(s.block_table) for s in decodes), default=1)
        rows = [
            [s.token_ids[0], s.start_pos, s.slot_mapping[0], s.context_len, *s.block_table]
            + [0] * (width - len(s.block_table))
            for s in decodes
        ]
        padding = [0, 0, PADDING_SLOT, PADDING_CONTEXT_LEN] + [0] * width
        rows += [padding] * (batch_size - len(decodes))
        host = torch.tensor(rows, dtype=torch.long)
        columns = _NUM_SCALAR_COLUMNS + width
        packed = self.packed[:batch_size, :columns]
        packed.copy_(host, non_blocking=True)
        self.context_lens[:batch_size].copy_(packed[:, 3])
        self.block_tables[:batch_size, :width].copy_(packed[:, _NUM_SCALAR_COLUMNS:])


class DecodeGraphs:
    """Decode steps as CUDA graphs, one per bucket (see the module docstring)."""

    def __init__(
        self,
        model: Transformer,
        pool: BlockPool,
        max_num_seqs: int,
        device: torch.device,
        attention_for: AttentionFactory,
    ) -> None:
        block_size, num_blocks = pool.config.block_size, pool.config.num_blocks
        max_len = model.config.max_position_embeddings
        self.model = model
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.inputs = StaticDecodeInputs(
            max_num_seqs, min(num_blocks, -(-max_len // block_size)), device
        )
        self.hidden = torch.zeros(
            max_num_seqs, model.config.hidden_size, dtype=pool.config.dtype, device=device
        )
        self._attention_for = attention_for
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}

    @property
    def is_captured(self) -> bool:
        return bool(self._graphs)

    def _forward(self, batch_size: int) -> None:
        """The step a graph holds: the model over the buffers' first `batch_size`
        rows, its hidden states into `self.hidden`."""
        inputs = self.inputs
        hidden = self.model(
            inputs.input_ids[:batch_size],
            inputs.positions[:batch_size],
            self._attention_for(inputs, batch_size),
        )
        self.hidden[:batch_size].copy_(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket's graph, largest first, so the smaller ones fit in
        the memory the largest took (one pool). The inputs are padding throughout:
        capture stores no K/V. CUDA only."""
        if self.inputs.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        memory_pool = None
        for batch_size in reversed(self.sizes):
            self.inputs.fill((), batch_size)
            self._forward(batch_size)  # compiles the Triton kernels, settles the allocator
            torch.cuda.synchronize(self.inputs.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=memory_pool):
                self._forward(batch_size)
            memory_pool = graph.pool()
            self._graphs[batch_size] = graph
        torch.cuda.synchronize(self.inputs.device)

    def run(self, decodes: Sequence[ScheduledSequence]) -> torch.Tensor | None:
        """Hidden states `[len(decodes), hidden]` of a decode-only step, from its
        bucket's graph (on the CPU: the same padded step, run eagerly); None when
        the step needs the eager path (too many decodes, or a block table wider
        than the buffers). The step's K/V is written to the pool as eagerly."""
        batch_size = bucket_for(len(decodes), self.sizes)
        if batch_size is None or not self.inputs.fits(decodes):
            return None
        self.inputs.fill(decodes, batch_size)
        graph = self._graphs.get(batch_size)
        if graph is not None:
            graph.replay()
        else:
            self._forward(batch_size)
        return self.hidden[: len(decodes)]
