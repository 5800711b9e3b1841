"""Tokenizers (byte-level and HF `tokenizer.json`) and incremental detokenization.

This module must not import torch: the router tokenizes and detokenizes, and it
has to start fast and stay small.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

from model.errors import ModelLoadError

TOKENIZER_FILE_NAME = "tokenizer.json"
# What a decoder emits for bytes that are not (yet) a whole UTF-8 character.
_REPLACEMENT_CHAR = "\ufffd"


class Tokenizer(ABC):
    """Text <-> token ids.

    Contract: `decode` drops special tokens (BOS/EOS/pad) and turns invalid or
    incomplete UTF-8 into U+FFFD; it never raises on any id in `[0, vocab_size)`.
    """

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def bos_token_id(self) -> int | None: ...

    @property
    @abstractmethod
    def eos_token_id(self) -> int | None: ...

    @abstractmethod
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, with the BOS id first when `add_bos` and the model's
        prompts start with one (the tokenizer has a BOS and adds it)."""

    @abstractmethod
    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of `token_ids`, special tokens skipped."""

    def special_token_text(self, token_id: int | None) -> str:
        """The literal text of a (special) token, e.g. "<s>", as chat templates write
        it; "" when the tokenizer has no text for it (or `token_id` is None)."""
        return ""


class ByteTokenizer(Tokenizer):
    """Ids 0..255 are the UTF-8 bytes; then BOS, EOS and pad. The dummy presets use it."""

    NUM_BYTES = 256
    BOS_ID = 256
    EOS_ID = 257
    PAD_ID = 258
    VOCAB_SIZE = 259

    @property
    def vocab_size(self) -> int:
        return self.VOCAB_SIZE

    @property
    def bos_token_id(self) -> int:
        return self.BOS_ID

    @property
    def eos_token_id(self) -> int:
        return self.EOS_ID

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.BOS_ID, *ids] if add_bos else ids

    def decode(self, token_ids: Sequence[int]) -> str:
        data = bytes(t for t in token_ids if 0 <= t < self.NUM_BYTES)
        return data.decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A `tokenizer.json` run by the `tokenizers` library (no `transformers`, no remote code).

    `adds_bos` false: the model was trained without a BOS before its text (a GGUF
    file's `add_bos_token`), so `encode` never adds one; `bos_token_id` is still
    the BOS chat templates write.
    """

    def __init__(
        self,
        path: str | Path,
        bos_token_id: int | None,
        eos_token_id: int | None,
        *,
        adds_bos: bool = True,
    ) -> None:
        from tokenizers import Tokenizer as _RustTokenizer

        if isinstance(path, _RustTokenizer):  # built in memory (a GGUF file's)
            self._tokenizer = path
        else:
            try:
                self._tokenizer = _RustTokenizer.from_file(str(path))
            except Exception as exc:  # the Rust side raises a bare Exception
                raise ModelLoadError(f"cannot read tokenizer {path}: {exc}") from None
        self._bos_token_id = bos_token_id
        self._eos_token_id = eos_token_id
        self._adds_bos = adds_bos

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_id

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # The post-processor would add BOS on its own for some tokenizers and not for
        # others; adding it here, once, makes `add_bos` mean the same for all.
        # encode_batch, not encode: `tokenizers` releases the GIL only in the batch
        # call, so a long prompt tokenized in a thread (as the router does) leaves the
        # event loop running; encode holds the GIL for the whole text (~1.5 s a MB).
        ids = self._tokenizer.encode_batch([text], add_special_tokens=False)[0].ids
        if add_bos and self._adds_bos and self._bos_token_id is not None:
            return [self._bos_token_id, *ids]
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def special_token_text(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self._tokenizer.id_to_token(token_id) or ""


def load_tokenizer(
    model_dir: str | Path, bos_token_id: int | None, eos_token_id: int | None
) -> Tokenizer | None:
    """The `tokenizer.json` of a HF model directory, or None when it has none."""
    path = Path(model_dir) / TOKENIZER_FILE_NAME
    if not path.is_file():
        return None
    return HFTokenizer(path, bos_token_id, eos_token_id)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Invariant: a delta never ends in the middle of a character. Text whose decoding
    still ends in U+FFFD (an incomplete UTF-8 sequence, or a byte-fallback token
    waiting for its partners) is held back until more tokens complete it or
    `flush` is called; the concatenation of all deltas plus `flush()` equals
    `decode(all ids)`.

    Only the tokens since the last emitted delta are re-decoded (with the previous
    delta's tokens as left context, which keeps SentencePiece's leading-space rule
    right), so the cost per token stays constant.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._token_ids: list[int] = []
        self._prefix_offset = 0  # start of the context window re-decoded each time
        self._read_offset = 0  # tokens before this are already emitted as text

    def add(self, token_ids: Sequence[int]) -> str:
        """Append tokens; return the text that is now complete ("" if none)."""
        self._token_ids.extend(token_ids)
        prefix_text = self._tokenizer.decode(
            self._token_ids[self._prefix_offset : self._read_offset]
        )
        new_text = self._tokenizer.decode(self._token_ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """The held-back rest (possibly ending in U+FFFD); call once when the sequence ends."""
        prefix_text = self._tokenizer.decode(
            self._token_ids[self._prefix_offset : self._read_offset]
        )
        new_text = self._tokenizer.decode(self._token_ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._token_ids)
        return new_text[len(prefix_text) :]


def tokenizer_for_model(spec: str) -> Tokenizer | None:
    """The tokenizer of a model spec without loading weights (and without torch):
    the byte tokenizer for `dummy:*` presets, the metadata's for a GGUF file,
    `tokenizer.json` for a HF directory (None when it has none: such a model takes
    token ids only)."""
    from model.config import load_config
    from model.gguf import gguf_config, is_gguf_spec
    from model.gguf_tokenizer import gguf_adds_bos, gguf_rust_tokenizer

    if spec.startswith("dummy:"):
        return ByteTokenizer()
    if is_gguf_spec(spec):
        config = gguf_config(spec)
        eos = config.eos_token_ids[0] if config.eos_token_ids else None
        return HFTokenizer(
            gguf_rust_tokenizer(spec), config.bos_token_id, eos, adds_bos=gguf_adds_bos(spec)
        )
    config = load_config(Path(spec))
    eos = config.eos_token_ids[0] if config.eos_token_ids else None
    return load_tokenizer(spec, config.bos_token_id, eos)
