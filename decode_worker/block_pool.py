"""The paged KV block pool: the cache tensors and who holds which block.

Every block is in exactly one of three states:
- used: ref count >= 1, held by one or more running sequences (shared prefix blocks
  have a count above one);
- free and cached: ref count 0 but still holding the K/V of a full block with a known
  hash, so a later request with the same prefix can take it back without recompute;
- free and uncached: ref count 0, contents meaningless.

Allocation takes uncached free blocks first (oldest-freed first), and only then evicts
the least-recently-freed cached block, dropping its hash. All block ids are usable; the
pool reserves none (block tables are padded with 0, which the kernels never read).

Tensor layout: one `[num_layers, 2, num_blocks, block_size, num_kv_heads, row_width]`
tensor. Layer-major so that each layer's K and V caches are contiguous
`[num_blocks, block_size, num_kv_heads, row_width]` views, which is what the attention op
and `write_kv_cache` read and write every step of every layer. Copying one block in or
out (`[num_layers, 2, block_size, num_kv_heads, row_width]`, the KV store's payload)
becomes a strided copy of `2 * num_layers` runs, which happens once per block, not per
step. A row is `head_dim` elements of the model's dtype, or with an 8-bit KV cache
dtype `head_dim + 2` bytes, values then scale (`kvstore.kv_quant`): the same bytes as
in the store, so fetched blocks are copied in without converting.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvstore.hashing import DEFAULT_BLOCK_SIZE
from kvstore.kv_format import AUTO
from kvstore.kv_quant import KVCacheFormat

BlockHash = bytes


class NoFreeBlocksError(RuntimeError):
    """The pool has fewer free blocks than an allocation asked for."""


@dataclass(frozen=True)
class BlockPoolConfig:
    """Size and layout of a decode worker's KV pool."""

    num_blocks: int
    """Blocks in the pool (each holds `block_size` tokens of every layer's K and V)."""
    block_size: int = DEFAULT_BLOCK_SIZE
    """Tokens per block; must match the KV store's block size."""
    num_layers: int = 1
    """Transformer layers; one K and one V cache per layer."""
    num_kv_heads: int = 1
    """KV heads per layer."""
    head_dim: int = 64
    """Elements per head vector."""
    dtype: torch.dtype = torch.float32
    """The model's activation dtype (the cache's element type with `auto`)."""
    kv_cache_dtype: str = AUTO
    """How rows are stored: `auto`, `int8` or `fp8_e4m3` (`kvstore.kv_format`)."""
    device: str = "cpu"
    """Where the cache tensor lives."""

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"BlockPoolConfig.{name} must be a positive int, got {value!r}")
        if not self.dtype.is_floating_point:
            raise ValueError(f"BlockPoolConfig.dtype must be a floating type, got {self.dtype}")
        KVCacheFormat(self.kv_cache_dtype, self.dtype)  # raises for an unknown name

    @property
    def kv_format(self) -> KVCacheFormat:
        return KVCacheFormat(self.kv_cache_dtype, self.dtype)

    @property
    def block_payload_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one block's K and V for every layer, as the KV store keeps it."""
        row_width = self.kv_format.row_width(self.head_dim)
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, row_width)

    @property
    def bytes_per_block(self) -> int:
        """Pool bytes one block takes, scales included."""
        return torch.Size(self.block_payload_shape).numel() * self.kv_format.storage_dtype.itemsize


class BlockPool:
    """Ref-counted KV blocks with a hash index for prefix reuse. Not thread-safe: the
    engine thread owns it."""

    def __init__(self, config: BlockPoolConfig) -> None:
        self.config = config
        self.kv_format = config.kv_format
        layers, kv, block_size, heads, row_width = config.block_payload_shape
        self.kv = torch.zeros(
            (layers, kv, config.num_blocks, block_size, heads, row_width),
            dtype=self.kv_format.storage_dtype,
            device=config.device,
        )
        self._ref_counts = [0] * config.num_blocks
        self._hash_of_block: dict[int, BlockHash] = {}
        self._block_of_hash: dict[BlockHash, int] = {}
        # OrderedDicts used as queues: popitem(last=False) takes the oldest entry, and a
        # cached block reclaimed by `acquire_cached` is removed from the middle in O(1),
        # which a deque or heap cannot do.
        self._free_uncached: OrderedDict[int, None] = OrderedDict.fromkeys(range(config.num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()

    @property
    def num_blocks(self) -> int:
        return self.config.num_blocks

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation could take now, cached ones included."""
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_free_blocks(self) -> int:
        return len(self._free_cached)

    def usage(self) -> float:
        """Fraction of blocks held by sequences, in [0, 1] (for the pool-usage metric)."""
        return self.num_used_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> BlockHash | None:
        return self._hash_of_block.get(block_id)

    def cached_block(self, block_hash: BlockHash) -> int | None:
        """The block holding `block_hash`, used or free, or None if it is not resident."""
        return self._block_of_hash.get(block_hash)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` blocks, each with ref count 1 and no hash. Raises
        NoFreeBlocksError, taking nothing, if fewer are free."""
        if num_blocks > self.num_free_blocks:
            raise NoFreeBlocksError(
                f"asked for {num_blocks} blocks, {self.num_free_blocks} of {self.num_blocks} free"
            )
        block_ids = []
        for _ in range(num_blocks):
            if self._free_uncached:
                block_id, _ = self._free_uncached.popitem(last=False)
            else:
                block_id, _ = self._free_cached.popitem(last=False)
                del self._block_of_hash[self._hash_of_block.pop(block_id)]
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block, in order. A block whose count reaches zero
        joins the back of its free queue, so pass a sequence's blocks last-first to have
        its tail evicted before its (more shareable) prefix."""
        for block_id in block_ids:
            assert self._ref_counts[block_id] > 0, f"block {block_id} freed more than once"
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                if block_id in self._hash_of_block:
                    self._free_cached[block_id] = None
                else:
                    self._free_uncached[block_id] = None

    def register_hash(self, block_id: int, block_hash: BlockHash) -> bool:
        """Record that used block `block_id` is full and holds `block_hash`'s tokens.
        Returns False (and records nothing) if another block already holds that hash:
        two sequences computed the same block, and the first copy stays the shared one."""
        assert self._ref_counts[block_id] > 0, f"block {block_id} is not in use"
        assert block_id not in self._hash_of_block, f"block {block_id} already has a hash"
        if block_hash in self._block_of_hash:
            return False
        self._hash_of_block[block_id] = block_hash
        self._block_of_hash[block_hash] = block_id
        return True

    def lookup_prefix(self, block_hashes: Sequence[BlockHash]) -> int:
        """How many leading blocks of this hash chain are resident (used or cached)."""
        num_resident = 0
        for block_hash in block_hashes:
            if block_hash not in self._block_of_hash:
                break
            num_resident += 1
        return num_resident

    def acquire_cached(self, block_hashes: Sequence[BlockHash]) -> list[int]:
        """Take one reference to the resident block of each hash (reclaiming it from the
        free queue if its count was zero). Every hash must be resident (check with
        `lookup_prefix` first); raises KeyError, taking nothing, otherwise."""
        missing = [h for h in block_hashes if h not in self._block_of_hash]
        if missing:
            raise KeyError(f"{len(missing)} of {len(block_hashes)} block hashes are not resident")
        block_ids = []
        for block_hash in block_hashes:
            block_id = self._block_of_hash[block_hash]
            if self._ref_counts[block_id] == 0:
                del self._free_cached[block_id]
            self._ref_counts[block_id] += 1
            block_ids.append(block_id)
        return block_ids

    def key_cache(self, layer_idx: int) -> torch.Tensor:
        """Layer `layer_idx`'s K cache, a contiguous view [num_blocks, block_size, kvh, row]."""
        return self.kv[layer_idx, 0]

    def value_cache(self, layer_idx: int) -> torch.Tensor:
        """Layer `layer_idx`'s V cache, a contiguous view [num_blocks, block_size, kvh, row]."""
        return self.kv[layer_idx, 1]

    def write_block(self, block_id: int, payload: torch.Tensor) -> None:
        """Copy a store payload `[num_layers, 2, n, kvh, row]` into the first n slots of
        `block_id`: n is block_size for a full block, fewer for a prompt's tail."""
        layers, kv, _, heads, dim = self.config.block_payload_shape
        num_tokens = payload.shape[2] if payload.dim() == 5 else 0
        if (
            tuple(payload.shape) != (layers, kv, num_tokens, heads, dim)
            or not 0 < num_tokens <= self.block_size
        ):
            raise ValueError(
                f"block payload shape {list(payload.shape)} != "
                f"{list(self.config.block_payload_shape)} (or fewer tokens)"
            )
        if payload.dtype != self.kv.dtype:
            raise ValueError(f"block payload dtype {payload.dtype} != pool dtype {self.kv.dtype}")
        self.kv[:, :, block_id, :num_tokens].copy_(payload)

    def read_block(self, block_id: int) -> torch.Tensor:
        """A contiguous copy of `block_id` as a store payload `[num_layers, 2, bs, kvh, row]`."""
        return self.kv[:, :, block_id].contiguous()

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """One CPU copy of several blocks, `[num_layers, 2, n, bs, kvh, row]`: a single
        gather (and, on a GPU, one transfer) however many blocks are read."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.kv.device)
        return self.kv.index_select(2, index).to("cpu")

    def check_integrity(self) -> None:
        """Assert every invariant of the bookkeeping (for tests and debug builds)."""
        free_uncached, free_cached = set(self._free_uncached), set(self._free_cached)
        used = {b for b, count in enumerate(self._ref_counts) if count > 0}
        assert all(count >= 0 for count in self._ref_counts), "negative ref count"
        assert not free_uncached & free_cached, "block in both free queues"
        assert not (free_uncached | free_cached) & used, "used block in a free queue"
        assert len(free_uncached) + len(free_cached) + len(used) == self.num_blocks, (
            "a block is in no state"
        )
        assert len(self._hash_of_block) == len(self._block_of_hash), "hash maps differ in size"
        for block_id, block_hash in self._hash_of_block.items():
            assert self._block_of_hash[block_hash] == block_id, (
                f"hash of {block_id} not mapped back"
            )
            assert block_id not in free_uncached, f"hashed block {block_id} in the uncached queue"
        for block_id in free_cached:
            assert block_id in self._hash_of_block, f"cached free block {block_id} has no hash"
