"""The SentencePiece ("llama") GGUF tokenizer against two references no one here wrote.

The files hold a SentencePiece BPE model trained in the test (`gguf_files.py`):
pieces, scores and types, byte fallback, no merges. `transformers` reading the same
file is the reference for everything; SentencePiece itself, running the model the
file came from, checks the merges on the text where the two agree by design (no
leading space, no special token: see `model.gguf_tokenizer._sentencepiece_bpe`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.errors import ModelLoadError
from model.gguf_tokenizer import gguf_rust_tokenizer
from model.loader import load_model
from model.sampling_params import SamplingParams
from model.tokenizer import IncrementalDetokenizer, tokenizer_for_model
from tests.model.gguf_files import (
    BOS_ID,
    CONTROL_SYMBOLS,
    USER_DEFINED_SYMBOLS,
    GGUFVocab,
    sentencepiece_vocab,
    train_sentencepiece,
    write_llama_gguf,
    write_tokenizer_gguf,
)
from tests.model.greedy import engine_greedy, hf_greedy

gguf = pytest.importorskip("gguf")
sentencepiece = pytest.importorskip("sentencepiece")
pytestmark = pytest.mark.slow

VOCAB_SIZE = 400  # 7 special pieces, 256 bytes, the corpus's characters and merges
SPECIALS = ("<s>", "</s>", "<unk>", *CONTROL_SYMBOLS, *USER_DEFINED_SYMBOLS)
STRINGS = [
    "",
    " ",
    "   ",
    "hello world",
    " the sea shells",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\n\n\n",
    "digits 0 12 345 6789 3.14159 2026-12-02",
    "naïve café résumé Ångström façade",
    "日本語のテキスト 中文 한국어",
    "emoji 🙂🚀👩‍👩‍👧",
    "<s>hi</s> <unk>",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    " <think>so</think> Paris",
    "a ▁ literal ▁▁ space mark▁",
    "def square(x):\n    return x ** 2  # the square",
]


def varied_strings() -> list[str]:
    """A few hundred strings: the fixed ones, and seeded random mixes of corpus
    words, digits, unicode the vocabulary lacks, whitespace runs and special tokens."""
    rng = np.random.default_rng(7)
    pieces = [
        "the", "The", " quick", "shells", " sea", "capital", "42", "007", " ", "  ", "   ",
        "\n", "\t", "é", "ß", "日本", "🙂", "▁", ",", ".", "!?", "'s", "don't", "x" * 12,
        "1234567890", *SPECIALS,
    ]  # fmt: skip
    out = list(STRINGS)
    for _ in range(300):
        out.append("".join(rng.choice(pieces, size=rng.integers(1, 12))))
    return out


def plain(text: str, *, add_space_prefix: bool) -> bool:
    """Text SentencePiece and transformers tokenize alike: no special token, and,
    when a space is prepended, no leading space (or `▁`): they differ on how many
    `▁` that makes."""
    if any(special in text for special in SPECIALS):
        return False
    return not (add_space_prefix and text.startswith((" ", "\u2581")))


@pytest.fixture(scope="module")
def spm_model() -> bytes:
    return train_sentencepiece(VOCAB_SIZE)


@pytest.fixture(scope="module")
def spm_file(hf_checkpoint, spm_model: bytes, tmp_path_factory) -> Path:
    """A Llama with the SentencePiece vocabulary, F16, alone in its directory."""
    hf_dir = hf_checkpoint("llama_gqa", vocab_size=VOCAB_SIZE)
    out = tmp_path_factory.mktemp("spm") / "llama-spm.gguf"
    return write_llama_gguf(hf_dir, out, "F16", sentencepiece_vocab(spm_model))


def hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_the_vocabulary_needs_byte_fallback_and_merges(spm_file: Path) -> None:
    """The strings exercise what the tokenizer must get right: characters only the
    `<0xNN>` tokens spell, and merges recovered from the scores."""
    ours = tokenizer_for_model(str(spm_file))
    pieces = gguf_rust_tokenizer(str(spm_file))
    assert pieces.encode("日本🙂").tokens[1:] == [
        "<0xE6>", "<0x97>", "<0xA5>", "<0xE6>", "<0x9C>", "<0xAC>",
        "<0xF0>", "<0x9F>", "<0x99>", "<0x82>",
    ]  # fmt: skip
    assert pieces.encode("the sea shells").tokens == ["▁the", "▁sea", "▁shells"]
    assert ours.decode(ours.encode("日本🙂 the sea shells")) == "日本🙂 the sea shells"


def test_the_sentencepiece_gguf_tokenizer_encodes_and_decodes_like_transformers(
    spm_file: Path,
) -> None:
    reference = hf_tokenizer(spm_file)
    ours = tokenizer_for_model(str(spm_file))
    for text in varied_strings():
        ids = ours.encode(text, add_bos=False)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
        # The file says nothing of add_bos_token: a SentencePiece model's prompts
        # start with BOS (llama.cpp's default and transformers').
        assert ours.encode(text) == reference.encode(text) == [BOS_ID, *ids], text


@pytest.mark.parametrize("add_dummy_prefix", [True, False])
def test_plain_text_tokenizes_as_sentencepiece_itself_does(
    tmp_path: Path, add_dummy_prefix: bool
) -> None:
    """Against the SentencePiece model the file was written from, with and without
    its space prefix (`add_space_prefix`, which transformers ignores: it always
    prepends, so without one SentencePiece is the only reference)."""
    model = train_sentencepiece(VOCAB_SIZE, add_dummy_prefix=add_dummy_prefix)
    reference = sentencepiece.SentencePieceProcessor(model_proto=model)
    path = write_tokenizer_gguf(tmp_path / "spm.gguf", sentencepiece_vocab(model))
    ours = gguf_rust_tokenizer(str(path))
    texts = [t for t in varied_strings() if plain(t, add_space_prefix=add_dummy_prefix)]
    assert len(texts) > 50
    for text in texts:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == reference.encode(text), text
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids), text


@pytest.mark.parametrize("add_bos_token", [True, False])
def test_add_bos_token_is_honoured(
    spm_model: bytes, tmp_path: Path, hf_checkpoint, add_bos_token: bool
) -> None:
    hf_dir = hf_checkpoint("llama_gqa", vocab_size=VOCAB_SIZE)
    vocab = sentencepiece_vocab(spm_model, add_bos_token=add_bos_token)
    path = write_llama_gguf(hf_dir, tmp_path / "bos.gguf", "F16", vocab)
    reference, ours = hf_tokenizer(path), tokenizer_for_model(str(path))
    assert ours.bos_token_id == BOS_ID and ours.special_token_text(BOS_ID) == "<s>"
    bos = [BOS_ID] if add_bos_token else []
    for text in STRINGS:
        ids = ours.encode(text)
        assert ids == reference.encode(text) == bos + ours.encode(text, add_bos=False), text


def test_a_sentencepiece_gguf_loads_and_runs_like_transformers(spm_file: Path) -> None:
    """The whole model: the chat-like prompt's ids and text, the greedy tokens and
    theirs."""
    from transformers import AutoModelForCausalLM

    reference_model = AutoModelForCausalLM.from_pretrained(
        str(spm_file.parent), gguf_file=spm_file.name, dtype=torch.float32
    ).eval()
    reference = hf_tokenizer(spm_file)
    ours = load_model(str(spm_file))
    assert ours.config.vocab_size == VOCAB_SIZE and ours.config.bos_token_id == BOS_ID
    chat = (
        "<|im_start|>user\nWhat is the capital of France? 🙂<|im_end|>\n"
        "<|im_start|>assistant\n<think>The capital of France</think> is Paris."
    )
    prompt = ours.tokenizer.encode(chat)
    assert prompt == reference.encode(chat)
    # Control tokens are dropped in the text; user-defined ones stay.
    assert ours.tokenizer.decode(prompt) == (
        "user\nWhat is the capital of France? 🙂\nassistant\n"
        "<think>The capital of France</think> is Paris."
    )
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    answer = engine_greedy(ours, prompt, params)
    assert answer == hf_greedy(reference_model, prompt, 24)
    assert ours.tokenizer.decode(answer) == reference.decode(answer, skip_special_tokens=True)
    # Token by token, as the router streams: the emoji's four byte tokens wait for
    # each other, and no `▁` of a later token loses its space. (Random weights
    # answer in stray bytes, which are no UTF-8, so the prompt is what streams.)
    detokenizer = IncrementalDetokenizer(ours.tokenizer)
    streamed = "".join(detokenizer.add([token]) for token in prompt) + detokenizer.flush()
    assert streamed == ours.tokenizer.decode(prompt)


@pytest.mark.parametrize("kind", ["t5", "bert"])
def test_other_tokenizer_kinds_are_refused_by_name(tmp_path: Path, kind: str) -> None:
    path = write_tokenizer_gguf(tmp_path / f"{kind}.gguf", GGUFVocab(kind, ["<unk>"], [2]))
    with pytest.raises(
        ModelLoadError,
        match=rf"^GGUF tokenizer model '{kind}' is not supported \(only 'gpt2', 'llama'\)$",
    ):
        gguf_rust_tokenizer(str(path))


def test_a_llama_vocabulary_without_scores_is_refused(tmp_path: Path) -> None:
    path = write_tokenizer_gguf(tmp_path / "no-scores.gguf", GGUFVocab("llama", ["<unk>"], [2]))
    with pytest.raises(ModelLoadError, match=r"without 'tokenizer.ggml.scores'"):
        gguf_rust_tokenizer(str(path))
