"""The attention-backend interface: how one layer's attention reads and writes KV.

The transformer computes q, k, v (after RoPE) for the tokens of one forward step,
flattened across the batch with no padding, and hands them to a backend. The
backend decides where K/V live (a contiguous per-request cache in prefill, the
paged block pool in decode) and how attention over them is computed. This is what
lets one model run both phases; `model/` never imports a worker.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionBackend(ABC):
    """Attention over one forward step's tokens, for every layer in turn.

    Contract:
    - The caller sets up the batch layout (which tokens belong to which sequence,
      their positions, where cached K/V lives) when it constructs the backend,
      before calling the model; the model calls `attend` once per layer, in layer
      order, with the same token layout each time.
    - `attend` stores this step's `key`/`value` in the backend's cache (if it has
      one) and returns causal attention of each token over its sequence's cached
      tokens plus the step's tokens up to and including itself; with a `window`,
      over the last `window` of those positions only (its own included).
    - It does not change `query`, `key` or `value`.
    """

    @abstractmethod
    def attend(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor:
        """query: [num_tokens, num_heads, head_dim]; key, value: [num_tokens,
        num_kv_heads, head_dim]. Returns [num_tokens, num_heads, head_dim]."""


class StoredRows(Protocol):
    """How K/V rows are stored (`kvstore.kv_quant.KVCacheFormat`, passed in by the
    caller so that `model/` imports no store): `quantize` turns `[..., head_dim]`
    rows into stored rows, `dequantize` turns them back."""

    def quantize(self, rows: torch.Tensor) -> torch.Tensor: ...

    def dequantize(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor: ...


class ContiguousKVAttention(AttentionBackend):
    """Causal attention for sequences whose cached K/V is one contiguous tensor each.

    This is the prefill backend (and the reference decode loop's): each sequence
    brings `new_lens[i]` new tokens, flattened in sequence order, and optionally the
    K/V of the prefix it continues, `[num_layers, 2, prefix_len, num_kv_heads,
    head_dim]` (the KV block layout of DESIGN.md, blocks concatenated along tokens).
    New token j of sequence i attends to the whole prefix and to new tokens 0..j.
    The new K/V of every layer is recorded, so after the forward pass `new_kv(i)`
    hands back the sequence's contribution in the same layout, ready to be cut into
    blocks or appended to its prefix for the next chunk or decode step.

    With `stored_rows` (an 8-bit KV cache), prefixes and `new_kv` hold stored rows,
    and every token attends to the K/V it will be read back as: the step's rows are
    quantized once, and attention reads them dequantized, exactly as the decode
    pool's will. So a prompt computed in one chunk, in several, or from a stored
    prefix gives the same tokens.
    """

    def __init__(
        self,
        new_lens: Sequence[int],
        prefix_kvs: Sequence[torch.Tensor | None] | None = None,
        stored_rows: StoredRows | None = None,
    ) -> None:
        if any(n <= 0 for n in new_lens):
            raise ValueError(f"every sequence needs at least one new token, got {list(new_lens)}")
        if prefix_kvs is not None and len(prefix_kvs) != len(new_lens):
            raise ValueError(f"{len(prefix_kvs)} prefix K/V tensors for {len(new_lens)} sequences")
        self.new_lens = list(new_lens)
        self.prefix_kvs: list[torch.Tensor | None] = (
            list(prefix_kvs) if prefix_kvs is not None else [None] * len(new_lens)
        )
        self.stored_rows = stored_rows
        # _new_keys[seq_idx][layer_idx] is that layer's K for the sequence's new tokens.
        self._new_keys: list[list[torch.Tensor]] = [[] for _ in new_lens]
        self._new_values: list[list[torch.Tensor]] = [[] for _ in new_lens]
        self._masks: dict[tuple[int, int, int | None], torch.Tensor] = {}

    @property
    def num_tokens(self) -> int:
        return sum(self.new_lens)

    def prefix_len(self, seq_idx: int) -> int:
        prefix = self.prefix_kvs[seq_idx]
        return 0 if prefix is None else prefix.shape[2]

    def attend(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor:
        if query.shape[0] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} tokens, got {query.shape[0]}")
        num_queries_per_kv = query.shape[1] // key.shape[1]
        rows = self.stored_rows
        stored_key = key if rows is None else rows.quantize(key)
        stored_value = value if rows is None else rows.quantize(value)
        if rows is not None:
            key = rows.dequantize(stored_key, query.dtype)
            value = rows.dequantize(stored_value, query.dtype)
        outputs = []
        for seq_idx, (q, k, v, stored_k, stored_v) in enumerate(
            zip(
                *(t.split(self.new_lens) for t in (query, key, value, stored_key, stored_value)),
                strict=True,
            )
        ):
            assert len(self._new_keys[seq_idx]) == layer_idx, "layers must be attended in order"
            self._new_keys[seq_idx].append(stored_k)
            self._new_values[seq_idx].append(stored_v)
            prefix = self.prefix_kvs[seq_idx]
            if prefix is not None:
                k = torch.cat((self._read(prefix[layer_idx, 0], k.dtype), k))
                v = torch.cat((self._read(prefix[layer_idx, 1], v.dtype), v))
            mask, is_causal = self._mask(q.shape[0], k.shape[0], window, q.device)
            outputs.append(_causal_attention(q, k, v, scale, num_queries_per_kv, mask, is_causal))
        return torch.cat(outputs)

    def _mask(
        self, new_len: int, total_len: int, window: int | None, device: torch.device
    ) -> tuple[torch.Tensor | None, bool]:
        """SDPA's (attn_mask, is_causal) for `new_len` queries over `total_len` keys;
        explicit masks are built once per shape and window, not once per layer."""
        if window is not None and window >= total_len:
            window = None  # no query here reaches past it
        if window is None and new_len == 1:
            return None, False  # one query sees everything before it
        if window is None and new_len == total_len:
            return None, True
        # SDPA's is_causal aligns the diagonal top-left; with a prefix the new tokens
        # sit bottom-right, and a window bands it: the mask is explicit.
        key = (new_len, total_len, window)
        if key not in self._masks:
            self._masks[key] = causal_window_mask(new_len, total_len, window, device)
        return self._masks[key], False

    def _read(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.stored_rows is None:
            return stored.to(dtype)
        return self.stored_rows.dequantize(stored, dtype)

    def new_kv(self, seq_idx: int) -> torch.Tensor:
        """`[num_layers, 2, new_len, num_kv_heads, row_width]`: what the forward pass
        added, as stored rows."""
        keys, values = self._new_keys[seq_idx], self._new_values[seq_idx]
        if not keys:
            raise RuntimeError("new_kv() before the model ran a forward pass with this backend")
        return torch.stack((torch.stack(keys), torch.stack(values)), dim=1)


def causal_window_mask(
    num_queries: int, num_keys: int, window: int | None, device: torch.device
) -> torch.Tensor:
    """bool `[num_queries, num_keys]`: query i, at position `num_keys - num_queries + i`,
    sees the keys up to its own position and, with a `window`, no more than the last
    `window` of them (HF's `sliding_window`: key j is seen when i - j < window)."""
    positions = torch.arange(num_keys - num_queries, num_keys, device=device)[:, None]
    keys = torch.arange(num_keys, device=device)[None, :]
    mask = keys <= positions
    if window is not None:
        mask &= keys > positions - window
    return mask


def _causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    num_queries_per_kv: int,
    mask: torch.Tensor | None,
    is_causal: bool,
) -> torch.Tensor:
    """q: [new_len, num_heads, d]; k, v: [total_len, num_kv_heads, d], the last
    new_len of which are q's own tokens. Returns [new_len, num_heads, d]."""
    if num_queries_per_kv > 1:
        k = k.repeat_interleave(num_queries_per_kv, dim=1)
        v = v.repeat_interleave(num_queries_per_kv, dim=1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        attn_mask=mask,
        is_causal=is_causal,
        scale=scale,
    )
    return out.transpose(0, 1)
