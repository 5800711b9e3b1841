"""`load_model`: a local HF directory or a `dummy:*` preset, ready to run.

Local files only: no network, no pickle, no remote code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import ModelConfig, load_config
from model.errors import ModelLoadError
from model.gguf import gguf_config, is_gguf_spec, load_gguf_tensors
from model.presets import is_preset, preset_config, preset_tensors
from model.tokenizer import Tokenizer, tokenizer_for_model
from model.transformer import Transformer, build_transformer, checkpoint_tensor_shapes
from model.weights import load_safetensors


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference (eval mode, no grad) and what goes with it."""

    name: str
    """The spec it was loaded from (a preset name or the directory as given)."""
    config: ModelConfig
    model: Transformer
    tokenizer: Tokenizer | None
    """None for a HF directory without `tokenizer.json` (token ids only)."""
    dtype: torch.dtype
    device: torch.device

    def __post_init__(self) -> None:
        if self.model.training:
            raise ValueError("LoadedModel.model must be in eval mode")


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""Run dtypes by the name flags and configs use."""


def parse_dtype(name: str | None) -> torch.dtype | None:
    """`None` or "auto" means the device's default; raises ValueError for an unknown name."""
    if name in (None, "auto"):
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), for sizing torch's thread pool."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are slow there); bfloat16 on CUDA."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def load_model(
    spec: str,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load `spec`: a local HF model directory, a `.gguf` file (or a directory holding
    one), `smollm2:135m-instruct`, or `dummy:tiny` / `dummy:135m`.

    Raises `ModelLoadError` (one-line message) for anything that cannot be loaded.
    """
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    if is_preset(spec):
        config = preset_config(spec)
        tensors = {
            name: t.to(device=device, dtype=dtype) for name, t in preset_tensors(spec).items()
        }
    elif is_gguf_spec(spec):
        config = gguf_config(spec)
        tensors = load_gguf_tensors(
            spec, config, checkpoint_tensor_shapes(config), dtype=dtype, device=device
        )
    else:
        model_dir = Path(spec)
        if not model_dir.is_dir():
            raise ModelLoadError(
                f"model {spec!r} is not a directory, a .gguf file or a preset "
                "(dummy:tiny, dummy:135m, dummy:gemma3-270m, smollm2:135m-instruct)"
            )
        config = load_config(model_dir)
        # Tied checkpoints sometimes still carry the (identical) output matrix.
        optional = frozenset({"lm_head.weight"}) if config.tie_word_embeddings else frozenset()
        tensors = load_safetensors(
            model_dir,
            checkpoint_tensor_shapes(config),
            dtype=dtype,
            device=device,
            optional_names=optional,
            prefix=config.checkpoint_prefix,
            ignored_prefixes=config.ignored_checkpoint_prefixes,
        )
    model = build_transformer(config, tensors, dtype=dtype, device=device)
    tokenizer = tokenizer_for_model(spec)
    return LoadedModel(
        name=spec, config=config, model=model, tokenizer=tokenizer, dtype=dtype, device=device
    )
