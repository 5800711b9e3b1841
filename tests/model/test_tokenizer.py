from __future__ import annotations

import subprocess
import sys

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from model.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDetokenizer

TEXT = "héllo 世界 🙂 done"


def test_byte_tokenizer_round_trip_and_specials() -> None:
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("hé")
    assert ids == [256, 104, 195, 169]
    assert tokenizer.encode("hé", add_bos=False) == [104, 195, 169]
    assert tokenizer.decode([*ids, 257, 258]) == "hé"
    assert tokenizer.decode([0xE4, 0xB8]) == "\ufffd"  # incomplete, never raises


def _deltas(tokenizer, ids: list[int]) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.add([token_id]) for token_id in ids]
    return [*deltas, detokenizer.flush()]


def test_incremental_detokenizer_never_splits_a_character() -> None:
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(TEXT, add_bos=False)
    deltas = _deltas(tokenizer, ids)
    assert "".join(deltas) == TEXT == tokenizer.decode(ids)
    assert all("\ufffd" not in d for d in deltas)
    # The 4 bytes of 🙂 come out as one delta, at the 4th byte.
    emoji_start = len("héllo 世界 ".encode())
    assert deltas[emoji_start : emoji_start + 4] == ["", "", "", "🙂"]


def test_incremental_detokenizer_flushes_a_truncated_character() -> None:
    tokenizer = ByteTokenizer()
    ids = [*b"ok ", 0xF0, 0x9F]  # the first half of an emoji, then the sequence ends
    deltas = _deltas(tokenizer, ids)
    assert deltas == ["o", "k", " ", "", "", "\ufffd"]
    assert "".join(deltas) == tokenizer.decode(ids)


@pytest.fixture(scope="module")
def bpe_tokenizer_path(tmp_path_factory):
    # A byte-level BPE like GPT-2's, trained on the spot: its tokens can end inside a
    # UTF-8 character, which is what the detokenizer has to cope with.
    tokenizer = RustTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(["hello world", "héllo 世界", "done and done"] * 5, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def test_hf_tokenizer_incremental_detokenization(bpe_tokenizer_path) -> None:
    tokenizer = HFTokenizer(bpe_tokenizer_path, bos_token_id=0, eos_token_id=1)
    ids = tokenizer.encode(TEXT)
    assert ids[0] == 0
    assert tokenizer.decode(ids) == TEXT
    deltas = _deltas(tokenizer, [*ids, 1])
    assert "".join(deltas) == TEXT
    assert all("\ufffd" not in d for d in deltas)


def test_tokenizer_module_does_not_import_torch() -> None:
    code = "import sys, model.tokenizer; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
