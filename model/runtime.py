"""`ModelRuntime`: which model a worker runs, and how (dtype, KV cache dtype, device,
threads).

Both worker roles share it, nested in their configs, so the flags that set it are
mapped in one place. This module does not import torch until `load` runs, so
configs can be built where torch is not wanted (the CLI's `--help`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.loader import LoadedModel

# `kvstore.kv_format.KV_CACHE_DTYPES`, which `model/` may not import; a test keeps
# the two equal.
_KV_CACHE_DTYPES = ("auto", "int8", "fp8_e4m3")


@dataclass(frozen=True)
class ModelRuntime:
    """A model to load, in a dtype, on a device, with a thread count."""

    model: str = "dummy:tiny"
    """Model name (`dummy:*`), local Hugging Face directory or GGUF file."""
    dtype: str | None = None
    """float32, bfloat16 or float16; None (or "auto"): float32 on CPU, bfloat16 on CUDA."""
    device: str = "cpu"
    """torch device the model and its KV live on."""
    kv_cache_dtype: str = "auto"
    """How K/V is stored in pools, the store and on the wire: auto (the model's
    dtype), int8 or fp8_e4m3 (`kvstore.kv_format`)."""
    num_threads: int | None = None
    """torch threads; None: the cores this process may run on."""

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must be a preset, a directory or a file")
        if self.kv_cache_dtype not in _KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype {self.kv_cache_dtype!r} is not one of {', '.join(_KV_CACHE_DTYPES)}"
            )
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")

    def load(self) -> LoadedModel:
        """Sizes torch's thread pool and loads the model (blocking; call it in a
        thread from an event loop). Raises ModelLoadError or ValueError."""
        import torch

        from model.loader import available_cores, load_model, parse_dtype

        torch.set_num_threads(self.num_threads or available_cores())
        return load_model(self.model, dtype=parse_dtype(self.dtype), device=self.device)
