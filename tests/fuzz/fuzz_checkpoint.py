"""Fuzzes loading a Hugging Face checkpoint directory: `config.json`, a
`model.safetensors` file (its JSON header is parsed by the `safetensors`
library, its tensors checked by `model.weights`), or a sharded one's
`model.safetensors.index.json`. Whatever the bytes, `load_model` either loads or
raises `ModelLoadError` saying what is wrong: no other exception, and no shard
read from outside the directory.

The input's first byte chooses the file the rest of it replaces in an otherwise
valid tiny Llama checkpoint (0: config.json, 1: model.safetensors, 2: the shard
index of a checkpoint split in two).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import atheris
import harness  # sets sys.path: before any of the packages
import torch
from safetensors.torch import save_file

with atheris.instrument_imports(include=["model"]):
    from model.config import ModelConfig
    from model.errors import ModelLoadError
    from model.loader import load_model
    from model.transformer import checkpoint_tensor_shapes
    from model.weight_files import checkpoint_files

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 8,
    "hidden_size": 4,
    "intermediate_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
_ROOT = Path(tempfile.mkdtemp(prefix="kvrelay-fuzz-ckpt-"))
SINGLE, SHARDED = _ROOT / "single", _ROOT / "sharded"
_FILES = {0: "config.json", 1: "model.safetensors", 2: "model.safetensors.index.json"}
_SECRET = _ROOT / "outside.safetensors"
"""A valid shard outside both checkpoints: an index naming it must be refused."""


def _write_checkpoints() -> None:
    shapes = checkpoint_tensor_shapes(ModelConfig.from_hf_dict(CONFIG))
    gen = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
    for directory in (SINGLE, SHARDED):
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(CONFIG))
    save_file(tensors, str(SINGLE / "model.safetensors"))
    names = sorted(tensors)
    halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for file, part in halves.items():
        save_file({name: tensors[name] for name in part}, str(SHARDED / file))
    weight_map = {name: file for file, part in halves.items() for name in part}
    (SHARDED / _FILES[2]).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    save_file(tensors, str(_SECRET))


_write_checkpoints()
_ORIGINALS = {
    mode: ((SHARDED if mode == 2 else SINGLE) / name).read_bytes() for mode, name in _FILES.items()
}


def seeds() -> list[bytes]:
    escape = {"weight_map": {"model.norm.weight": "../outside.safetensors"}}
    # Configs whose windows and Gemma 3 fields the parser reads (their tensors do
    # not match the checkpoint's, so they end in a refusal once parsed).
    windowed = [
        {**CONFIG, "architectures": ["MistralForCausalLM"], "sliding_window": 4},
        {
            **CONFIG,
            "architectures": ["Qwen2ForCausalLM"],
            "use_sliding_window": True,
            "sliding_window": 4,
            "layer_types": ["sliding_attention"],
        },
        {
            **CONFIG,
            "architectures": ["Gemma3ForCausalLM"],
            "head_dim": 2,
            "sliding_window": 4,
            "sliding_window_pattern": 2,
            "final_logit_softcapping": 30.0,
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        },
    ]
    return (
        [bytes([mode]) + data for mode, data in _ORIGINALS.items()]
        + [b"\x02" + json.dumps(escape).encode()]
        + [b"\x00" + json.dumps(config).encode() for config in windowed]
    )


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode = data[0] % len(_FILES)
    directory = SHARDED if mode == 2 else SINGLE
    path = directory / _FILES[mode]
    path.write_bytes(data[1:])
    try:
        load_model(str(directory), dtype=torch.float32)
    except ModelLoadError:
        harness.refused()
        return
    else:
        harness.accepted()
        files = checkpoint_files(directory)
        assert all(file.parent == directory for file in files), f"read outside: {files}"
    finally:
        path.write_bytes(_ORIGINALS[mode])


if __name__ == "__main__":
    try:
        harness.run(test_one_input, seeds)
    finally:
        shutil.rmtree(_ROOT)
