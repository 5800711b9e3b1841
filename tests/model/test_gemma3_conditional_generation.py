"""The text model of a `Gemma3ForConditionalGeneration` checkpoint (its weights under
`language_model.`, beside a vision tower and a projector this model does not use)
loads and runs as `transformers` runs that checkpoint on text alone."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

from model.attention import ContiguousKVAttention
from model.errors import ModelLoadError
from model.loader import load_model
from model.sampling_params import SamplingParams
from tests.model.greedy import engine_greedy

TEXT = {
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "sliding_window": 16,
    "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
    "max_position_embeddings": 512,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
}
VISION = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 16,
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = Gemma3Config(
        text_config=TEXT,
        vision_config=VISION,
        mm_tokens_per_image=4,
        image_token_index=300,
        boi_token_index=301,
        eoi_token_index=302,
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.08)
    path = tmp_path_factory.mktemp("gemma3-conditional")
    model.save_pretrained(path)
    return path, model


@torch.inference_mode()
def test_its_text_model_gives_transformers_tokens_and_logits(checkpoint) -> None:
    path, reference = checkpoint
    ours = load_model(str(path))
    assert ours.config.architecture == "Gemma3ForCausalLM"
    assert ours.config.layer_windows == (16, 16, 0)
    generator = torch.Generator().manual_seed(1)
    for n in (5, 40):
        prompt = torch.randint(3, 300, (n,), generator=generator).tolist()
        expected = reference(torch.tensor([prompt])).logits[0, -1].float()
        hidden = ours.model(torch.tensor(prompt), torch.arange(n), ContiguousKVAttention([n]))
        logits = ours.model.compute_logits(hidden[-1:])[0]
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
        tokens = engine_greedy(ours, prompt, SamplingParams(max_tokens=16, ignore_eos=True))
        hf = reference.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=16, eos_token_id=None
        )[0, n:].tolist()
        assert tokens == hf


def test_a_conditional_generation_config_without_a_text_config_is_refused(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["Gemma3ForConditionalGeneration"]}')
    with pytest.raises(ModelLoadError, match="needs a text_config"):
        load_model(str(tmp_path))
