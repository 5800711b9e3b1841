"""Which model a spec names: its config and its identity, whatever its kind (a
`dummy:*` preset, a GGUF file or preset, a HF directory), without loading weights.

This module does not import torch.
"""

from __future__ import annotations

from pathlib import Path

from model.config import ModelConfig, load_config
from model.errors import ModelLoadError


def config_for_model(spec: str) -> ModelConfig:
    """The config of any model spec, without loading weights: a `dummy:*` preset, a
    GGUF file (or preset), or a HF directory."""
    from model.gguf import gguf_config, is_gguf_spec
    from model.presets import is_preset, preset_config

    if is_preset(spec):
        return preset_config(spec)
    if is_gguf_spec(spec):
        return gguf_config(spec)
    if not Path(spec).is_dir():
        raise ModelLoadError(
            f"model {spec!r} is not a directory, a .gguf file or a preset "
            "(dummy:tiny, dummy:135m, smollm2:135m-instruct)"
        )
    return load_config(spec)


def model_identity(spec: str) -> str:
    """What the KV fingerprint names for a model spec: the spec itself, or for a GGUF
    file its name, size and a digest of its bytes, so another file never shares
    blocks with it."""
    from model.gguf import gguf_identity, is_gguf_spec

    return gguf_identity(spec) if is_gguf_spec(spec) else spec
