"""The KV cache formats by name, and how wide a stored row of each is. Torch-free,
so the CLI and the router can name and check them without importing torch.

- `auto`: K and V in the model's dtype, a row of `head_dim` elements;
- `int8`, `fp8_e4m3`: each row (one token, one KV head) holds `head_dim` 8-bit
  values and then its own scale, 2 bytes of float16: `head_dim + 2` bytes, read
  as `value * scale`. `kvstore.kv_quant` quantizes and dequantizes them.

The codes are part of the on-wire format (the codec's header, the fingerprint):
never renumber, only append.
"""

from __future__ import annotations

AUTO = "auto"
KV_FORMAT_CODES: dict[str, int] = {AUTO: 0, "int8": 1, "fp8_e4m3": 2}
KV_CACHE_DTYPES = tuple(KV_FORMAT_CODES)
"""The names `--kv-cache-dtype` accepts."""

SCALE_BYTES = 2
"""A quantized row's scale: one float16 after its values."""


def check_kv_cache_dtype(name: str) -> str:
    """`name`, or ValueError saying which names there are."""
    if name not in KV_FORMAT_CODES:
        raise ValueError(f"kv cache dtype {name!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
    return name


def is_quantized(name: str) -> bool:
    return check_kv_cache_dtype(name) != AUTO


def row_width(name: str, head_dim: int) -> int:
    """Elements of one stored row (one token, one KV head): `head_dim`, plus the
    scale's bytes for an 8-bit format (whose elements are bytes)."""
    return head_dim + SCALE_BYTES if is_quantized(name) else head_dim
