"""Tokenizers from a GGUF file's `tokenizer.ggml.*` metadata, built with `tokenizers`.

A GGUF file has no `tokenizer.json`: it carries the vocabulary, the token types and
either merges or scores. Two kinds (`tokenizer.ggml.model`) are rebuilt here, each
the way `transformers` builds it from the same file, which the tests hold us to:

- "gpt2": byte-level BPE with the file's merges.
- "llama": SentencePiece-style BPE: spaces become `▁` (and one is prepended, unless
  `tokenizer.ggml.add_space_prefix` says not to), characters without a token fall
  back to the `<0xNN>` byte tokens, and the merges, which the file does not list,
  are recovered from the vocabulary and its scores.

Any other kind ("bert", "t5", ...) is refused by name. Like `model.gguf`, this never
imports torch: the router tokenizes.
"""

from __future__ import annotations

from model.errors import ModelLoadError
from model.gguf import GGUFMetadata, gguf_path

# Token types of `tokenizer.ggml.token_type`: llama.cpp's enum, which is also
# SentencePiece's piece type (normal 1, unknown 2, control 3, user-defined 4,
# unused 5, byte 6).
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4
# The tokens these ids name are special whatever their type, as in transformers
# (which registers them as its bos/eos/unk/pad tokens): text never splits them and
# decoding drops them.
_SPECIAL_TOKEN_IDS = (
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
)
_SPACE = "\u2581"  # SentencePiece's visible space


def gguf_rust_tokenizer(spec: str):
    """A `tokenizers.Tokenizer` from the file's metadata. Its control tokens (and
    the BOS/EOS/UNK/pad tokens) are added as special tokens and its user-defined
    ones as plain added tokens, so text never splits either and decoding keeps
    only the latter. Raises ModelLoadError for a tokenizer kind not built here, or
    metadata it cannot be built from."""
    meta = GGUFMetadata(gguf_path(spec))
    kind = meta.require("tokenizer.ggml.model")
    build = _BUILDERS.get(kind)
    if build is None:
        supported = ", ".join(repr(k) for k in _BUILDERS)
        raise ModelLoadError(f"GGUF tokenizer model {kind!r} is not supported (only {supported})")
    try:
        return _build(meta, build)
    except ModelLoadError:
        raise
    except Exception as err:  # `tokenizers` raises bare Exception
        # Lists of the wrong type or length, merges of unknown tokens.
        raise ModelLoadError(f"GGUF file {meta.path.name} has a bad tokenizer: {err}") from None


def _build(meta: GGUFMetadata, build):
    from tokenizers import AddedToken

    tokens = list(meta.require("tokenizer.ggml.tokens"))
    types = list(meta.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens)))
    tokenizer = build(meta, tokens)
    special_ids = {int(i) for key in _SPECIAL_TOKEN_IDS if (i := meta.get(key)) is not None}
    tokenizer.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for i, (token, token_type) in enumerate(zip(tokens, types, strict=True))
            if token_type == _CONTROL or i in special_ids
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(token, special=False, normalized=False)
            for i, (token, token_type) in enumerate(zip(tokens, types, strict=True))
            if token_type == _USER_DEFINED and i not in special_ids
        ]
    )
    return tokenizer


def gguf_adds_bos(spec: str) -> bool:
    """Whether the model's prompts start with BOS: `tokenizer.ggml.add_bos_token`,
    and when the file does not say, yes for a SentencePiece vocabulary (llama.cpp's
    and transformers' default for "llama") and no for any other."""
    meta = GGUFMetadata(gguf_path(spec))
    default = meta.get("tokenizer.ggml.model") == "llama"
    return bool(meta.get("tokenizer.ggml.add_bos_token", default))


def _byte_level_bpe(meta: GGUFMetadata, tokens: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    merges = [tuple(m.split(" ", 1)) for m in meta.require("tokenizer.ggml.merges")]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _sentencepiece_bpe(meta: GGUFMetadata, tokens: list[str]):
    """SentencePiece's BPE as `tokenizers` runs it (transformers' LlamaTokenizer).

    Where transformers and SentencePiece itself differ, this follows transformers:
    text that already starts with a space gets no second `▁` (" hi" is `▁hi`,
    SentencePiece makes it `▁▁hi`), text after a special token gets none either,
    and control tokens written in the text are matched (SentencePiece spells them
    out). `add_space_prefix` false is honoured as llama.cpp and SentencePiece do;
    transformers ignores that key and always prepends.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        raise ModelLoadError(
            f"GGUF file {meta.path.name} has a 'llama' tokenizer without "
            "'tokenizer.ggml.scores', from which its merges are recovered"
        )
    vocab = {token: i for i, token in enumerate(tokens)}
    unknown_id = meta.get("tokenizer.ggml.unknown_token_id")
    model = models.BPE(
        vocab=vocab,
        merges=sentencepiece_merges(tokens, [float(s) for s in scores]),
        # A character with no token is spelled in `<0xNN>` byte tokens; only with
        # one of those missing does it become the unknown token.
        byte_fallback=True,
        fuse_unk=True,
        unk_token=None if unknown_id is None else tokens[int(unknown_id)],
    )
    tokenizer = Tokenizer(model)
    add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # "first": the prefix goes on the text's first piece only, not after each
    # special token; split=False keeps the whole text one word for the merges.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_SPACE, prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:  # the prepended space is not the text's
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges, best first, recovered from a SentencePiece vocabulary.

    SentencePiece's BPE merges the adjacent pair whose concatenation is the token
    with the highest score; `tokenizers` merges by rank. So every split of a token
    into two tokens of the vocabulary is a merge, ranked by the merged token's
    score. Ties (bytes and control tokens all score 0) go to the longer left part,
    then the longer right part, then the merged token's and the parts' order in
    the vocabulary: transformers' `generate_merges` order, which decides the odd
    tie differently from SentencePiece's and is the one the parity tests hold.
    A token spelled twice counts at its last id and last score, as there.
    """
    ids = {token: i for i, token in enumerate(tokens)}
    token_scores = dict(zip(tokens, scores, strict=True))
    candidates = []
    for order, (merged, score) in enumerate(token_scores.items()):
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in ids and right in ids:
                key = (-score, -len(left), -len(right), order, ids[left], ids[right])
                candidates.append((key, left, right))
    candidates.sort(key=lambda candidate: candidate[0])
    return [(left, right) for _, left, right in candidates]


_BUILDERS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}
