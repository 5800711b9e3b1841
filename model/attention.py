"""The attention-backend interface: how one layer's attention reads and writes KV.

The transformer computes q, k, v (after RoPE) for the tokens of one forward step,
flattened across the batch with no padding, and hands them to a backend. The
backend decides where K/V live (a contiguous per-request cache in prefill, the
paged block pool in decode) and how attention over them is computed. This is what
lets one model run both phases; `model/` never imports a worker.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class AttentionBackend(ABC):
    """Attention over one forward step's tokens, for every layer in turn.

    Contract:
    - The caller sets up the batch layout (which tokens belong to which sequence,
      their positions, where cached K/V lives) when it constructs the backend,
      before calling the model; the model calls `attend` once per layer, in layer
      order, with the same token layout each time.
    - `attend` stores this step's `key`/`value` in the backend's cache (if it has
      one) and returns causal attention of each token over its sequence's cached
      tokens plus the step's tokens up to and including itself.
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
    ) -> torch.Tensor:
        """query: [num_tokens, num_heads, head_dim]; key, value: [num_tokens,
        num_kv_heads, head_dim]. Returns [num_tokens, num_heads, head_dim]."""
