"""Quantizing K/V rows to 8 bits and back: the one definition every path uses.

A row is one token's K (or V) for one KV head, `head_dim` values. An 8-bit format
(`kvstore.kv_format`) stores it as `head_dim` bytes of values and then its scale, a
float16, in one `uint8` row of `head_dim + 2`: like GGUF's Q8_0 block (32 int8 and
their float16 scale), the scale travels inside the row, so a block of such rows is
one tensor that the pool, the codec, the stores and the kernels move as they move
a full-precision block.

Why a scale per token and head, not per block: a block that is still filling (the
decode side's last block) never loses precision on the tokens already written when
a new token with a larger range arrives, because no row is ever re-quantized; each
is quantized once, when its token's K/V is first written, and prefill and decode
compute the same bytes for the same token. It costs 2 bytes per 64 values (3 %)
against 2/16 per token for a per-block scale, and measured on SmolLM2-135M-Instruct
it is the layout that meets the accuracy goal for int8 (docs/benchmarks.md).

The scale is absmax / qmax (127 for int8, 448 for fp8 e4m3), computed in float32,
rounded to float16 and clamped to its range; values are divided by the rounded
scale, so dequantization is exact against what was stored. int8 rounds to nearest
(ties to even) and clamps to ±127 (symmetric, no -128); fp8 clamps to ±448 first
(torch's cast does not saturate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.kv_format import AUTO, SCALE_BYTES, check_kv_cache_dtype

_QMAX = {"int8": 127.0, "fp8_e4m3": 448.0}
_VALUE_DTYPES = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}
_MIN_SCALE = 2.0**-24  # float16's smallest subnormal: a zero row stays zero
_MAX_SCALE = 65504.0  # float16's largest


@dataclass(frozen=True)
class KVCacheFormat:
    """How K/V rows of a model running in `dtype` are stored: `name` is `auto` (the
    model's dtype, rows as they are) or an 8-bit format. Stateless and thread-safe."""

    name: str
    dtype: torch.dtype
    """The model's activation dtype: what `dequantize` returns by default."""

    def __post_init__(self) -> None:
        check_kv_cache_dtype(self.name)

    @property
    def is_quantized(self) -> bool:
        return self.name != AUTO

    @property
    def storage_dtype(self) -> torch.dtype:
        """The element type of stored rows: uint8 for 8-bit formats."""
        return torch.uint8 if self.is_quantized else self.dtype

    @property
    def value_dtype(self) -> torch.dtype:
        """How a quantized row's value bytes read (int8 or float8_e4m3fn)."""
        return _VALUE_DTYPES.get(self.name, self.dtype)

    @property
    def qmax(self) -> float:
        return _QMAX[self.name]

    def row_width(self, head_dim: int) -> int:
        return head_dim + SCALE_BYTES if self.is_quantized else head_dim

    def head_dim(self, row_width: int) -> int:
        return row_width - SCALE_BYTES if self.is_quantized else row_width

    def quantize(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` `[..., head_dim]` (any float dtype) as stored rows `[..., row_width]`
        of `storage_dtype`, on the same device. `auto` only casts."""
        if not self.is_quantized:
            return rows.to(self.dtype)
        values = rows.float()
        amax = values.abs().amax(dim=-1, keepdim=True)
        scale = (amax / self.qmax).clamp_(_MIN_SCALE, _MAX_SCALE).to(torch.float16)
        scaled = values / scale.float()
        if self.name == "int8":
            quantized = scaled.round_().clamp_(-self.qmax, self.qmax).to(torch.int8)
        else:
            quantized = scaled.clamp_(-self.qmax, self.qmax).to(torch.float8_e4m3fn)
        head_dim = rows.shape[-1]
        stored = torch.empty(
            (*rows.shape[:-1], head_dim + SCALE_BYTES), dtype=torch.uint8, device=rows.device
        )
        stored[..., :head_dim] = quantized.view(torch.uint8)
        stored[..., head_dim:] = scale.view(torch.uint8)
        return stored

    def dequantize(self, stored: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Stored rows `[..., row_width]` back as `[..., head_dim]` in `dtype` (default
        the model's), computed in float32. Any strides whose last is 1 (a view into a
        pool or a gathered tile)."""
        dtype = dtype or self.dtype
        if not self.is_quantized:
            return stored.to(dtype)
        values, scales = self.split(stored)
        return (values.float() * scales.float()).to(dtype)

    def split(self, stored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of stored rows' values `[..., head_dim]` (`value_dtype`) and scales
        `[..., 1]` (float16); no copy."""
        if stored.dtype != torch.uint8:
            raise ValueError(f"{self.name} rows are uint8, got {stored.dtype}")
        head_dim = stored.shape[-1] - SCALE_BYTES
        return stored[..., :head_dim].view(self.value_dtype), stored[..., head_dim:].view(
            torch.float16
        )

    def round_trip(self, rows: torch.Tensor) -> torch.Tensor:
        """What attention reads for `rows` once stored: `dequantize(quantize(rows))`."""
        return self.dequantize(self.quantize(rows), rows.dtype)
