"""Reading checkpoint tensors from `*.safetensors` files, single or sharded.

safetensors only: no pickle, no remote code, no network. The caller says which
tensors it expects and their shapes; anything missing, unexpected or of the wrong
shape is a `ModelLoadError` that names it, before any tensor reaches a model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from model.errors import ModelLoadError
from model.weight_files import checkpoint_files

# Tensors some checkpoints carry that this model recomputes or shares: ignored, not
# "unexpected". (Tied checkpoints sometimes still store lm_head.weight.)
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


def load_safetensors(
    model_dir: str | Path,
    expected_shapes: dict[str, tuple[int, ...]],
    *,
    dtype: torch.dtype,
    device: torch.device,
    optional_names: frozenset[str] = frozenset(),
    prefix: str = "",
    ignored_prefixes: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """Read exactly the tensors of `expected_shapes` from `model_dir`, converted to `dtype`
    on `device`. Names in `optional_names` may be present (and are then dropped). The
    files name each tensor `prefix` + its name; tensors under `ignored_prefixes` (parts
    of the checkpoint this model does not use) are skipped unread."""
    model_dir = Path(model_dir)
    tensors: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for path in checkpoint_files(model_dir):
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for stored_name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                    if ignored_prefixes and stored_name.startswith(ignored_prefixes):
                        continue
                    name = stored_name.removeprefix(prefix) if prefix else stored_name
                    if name not in expected_shapes or not stored_name.startswith(prefix):
                        if name not in optional_names and not name.endswith(_IGNORABLE_SUFFIXES):
                            unexpected.append(stored_name)
                        continue
                    tensor = f.get_tensor(stored_name)
                    if tuple(tensor.shape) != expected_shapes[name]:
                        raise ModelLoadError(
                            f"tensor {name} in {path.name} has shape {tuple(tensor.shape)}, "
                            f"expected {expected_shapes[name]}"
                        )
                    tensors[name] = tensor.to(device=device, dtype=dtype)
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"cannot read {path}: {exc}") from None
    if unexpected:
        raise ModelLoadError(f"unexpected tensors in {model_dir}: {_name_list(unexpected)}")
    missing = [name for name in expected_shapes if name not in tensors]
    if missing:
        raise ModelLoadError(f"missing tensors in {model_dir}: {_name_list(missing)}")
    return tensors


def _name_list(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
