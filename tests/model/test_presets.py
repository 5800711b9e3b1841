from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from model.errors import ModelLoadError
from model.loader import load_model

DIGEST_SCRIPT = """
import hashlib, sys
from model.loader import load_model
loaded = load_model(sys.argv[1])
digest = hashlib.sha256()
for name, tensor in sorted(loaded.model.state_dict().items()):
    digest.update(name.encode())
    digest.update(tensor.numpy().tobytes())
print(sum(t.numel() for t in loaded.model.parameters()), digest.hexdigest())
"""


def _digest_in_subprocess(spec: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", DIGEST_SCRIPT, spec], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_tiny_preset_shape_and_determinism() -> None:
    a, b = load_model("dummy:tiny"), load_model("dummy:tiny")
    assert a.config.vocab_size == a.tokenizer.vocab_size == 259
    assert a.config.num_kv_heads < a.config.num_heads  # GQA
    for (name, x), (_, y) in zip(
        a.model.state_dict().items(), b.model.state_dict().items(), strict=True
    ):
        assert torch.equal(x, y), name
    weight = a.model.layers[0].self_attn.qkv_proj.weight
    assert abs(weight.std().item() - 0.02) < 0.002


def test_unknown_preset() -> None:
    with pytest.raises(ModelLoadError, match="unknown preset 'dummy:huge'"):
        load_model("dummy:huge")


@pytest.mark.slow
def test_135m_preset_identical_in_two_processes() -> None:
    first = _digest_in_subprocess("dummy:135m")
    second = _digest_in_subprocess("dummy:135m")
    num_params, _ = first.split()
    assert int(num_params) == 134_515_008  # SmolLM-135M's parameter count
    assert first == second


def test_the_gemma3_preset_has_gemma_3_270ms_shape() -> None:
    import math

    from model.presets import preset_config
    from model.transformer import checkpoint_tensor_shapes

    config = preset_config("dummy:gemma3-270m")
    shapes = checkpoint_tensor_shapes(config)
    # google/gemma-3-270m's parameter count, tied embeddings counted once.
    assert sum(math.prod(shape) for shape in shapes.values()) == 268_098_176
    assert (config.num_kv_heads, config.head_dim, config.attention_scale) == (1, 256, 256**-0.5)
    assert [config.window(i) for i in range(6)] == [512] * 5 + [None]
    assert config.layer_windows.count(0) == 3  # layers 5, 11 and 17 are global
