"""Which model a spec names: its config and its identity, whatever its kind (a
`dummy:*` preset, a GGUF file or preset, a HF directory), without loading weights.

This module does not import torch.
"""

from __future__ import annotations

from pathlib import Path

from model.config import ModelConfig, load_config
from model.errors import ModelLoadError
from model.weight_files import checkpoint_files, files_digest


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
            "(dummy:tiny, dummy:135m, dummy:gemma3-270m, smollm2:135m-instruct)"
        )
    return load_config(spec)


def model_identity(spec: str) -> str:
    """What the KV fingerprint names for a model spec, computed once when a worker
    starts. A preset is its name (its weights are drawn from it). A GGUF file is its
    name, size and a digest of its bytes. A HF directory is the spec with a digest of
    its config.json and weight files' names and bytes: the same directory with
    rewritten weights (or a changed config) never shares blocks with the old ones.
    Raises ModelLoadError when the files cannot be read."""
    from model.gguf import gguf_identity, is_gguf_spec
    from model.presets import is_preset

    if is_preset(spec):
        return spec
    if is_gguf_spec(spec):
        return gguf_identity(spec)
    model_dir = Path(spec)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model {spec!r} is not a directory, a .gguf file or a preset")
    files = [model_dir / "config.json", *checkpoint_files(model_dir)]
    return f"{spec}:weights:{files_digest(files)}"
