"""Rotary position embeddings (RoPE), including `linear` and `llama3` frequency scaling.

The inverse frequencies are computed exactly as `transformers` computes them (same
float32 arithmetic, same order), so logits match the reference to float rounding.
cos/sin are looked up by position id per token, because the tokens of one batch
belong to different sequences at arbitrary positions.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.config import ModelConfig, RopeScaling


def compute_inv_freq(head_dim: int, rope_theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """float32 `[head_dim // 2]` inverse frequencies, scaled as `scaling` says."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim
    inv_freq = 1.0 / (rope_theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        # Dividing the frequencies is the same as dividing the positions.
        return inv_freq / scaling.factor
    assert scaling.rope_type == "llama3", scaling.rope_type
    return _llama3_scale(inv_freq, scaling)


def _llama3_scale(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed down by `factor`, short ones are kept, and
    # the band in between is interpolated smoothly.
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context_len / scaling.low_freq_factor
    high_freq_wavelen = old_context_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for a batch's position ids and rotates q and k with them."""

    inv_freq: torch.Tensor

    def __init__(self, config: ModelConfig, local: bool = False) -> None:
        """`local`: the windowed layers' RoPE, `config.local_rope_theta` unscaled."""
        super().__init__()
        if local:
            assert config.local_rope_theta is not None, "the config has no local RoPE"
            inv_freq = compute_inv_freq(config.head_dim, config.local_rope_theta, None)
        else:
            inv_freq = compute_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        # Not a checkpoint tensor: recomputed from the config, never loaded or saved.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [num_tokens] -> cos, sin: [num_tokens, 1, head_dim] in `dtype`.

        The angles are computed in float32 whatever `dtype` is, as the reference does.
        """
        freqs = positions[:, None].float() * self.inv_freq.float()[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype)[:, None, :], angles.sin().to(dtype)[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [num_tokens, num_heads, head_dim] (the half-split layout HF Llama uses)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
