"""GGUF files the model tests write themselves, as llama.cpp's converter writes them.

`write_llama_gguf` turns a tiny HF Llama checkpoint into a GGUF file with
`gguf.GGUFWriter` (llama.cpp's own writer), with one of two vocabularies:
`gpt2_vocab`, a hand-made byte-level BPE, or `sentencepiece_vocab`, a SentencePiece
BPE model trained here on a small corpus (byte fallback on, the options Llama's
tokenizer was trained with), its pieces, scores and types written as
`convert_hf_to_gguf.py` writes them. Nothing is downloaded.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Llama's token ids for these, in both vocabularies.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# SentencePiece: control tokens (special), user-defined ones (matched whole, kept
# when decoding), after <unk> <s> </s> and before the 256 <0xNN> byte tokens.
CONTROL_SYMBOLS = ("<|im_start|>", "<|im_end|>")
USER_DEFINED_SYMBOLS = ("<think>", "</think>")

# What the SentencePiece model learns its pieces from: no CJK and no emoji, so
# those need the byte tokens; no newline or tab either (one line per sentence).
_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "def square(x):    return x ** 2  # the square of x",
    "Numbers like 3.14159 and 2026 appear in text: 1, 22, 333.",
    "naïve café résumé, the façade of the hôtel.",
    "    indented   lines   with   runs of spaces",
    "She sells sea shells by the sea shore; the shells she sells are sea shells.",
    "To be, or not to be, that is the question.",
    "What is the capital of France? The capital of France is Paris.",
)


@dataclass(frozen=True)
class GGUFVocab:
    """The `tokenizer.ggml.*` keys of one file; None leaves a key out."""

    model: str
    """`tokenizer.ggml.model`: "gpt2", "llama", or a kind kvrelay refuses."""
    tokens: list[str]
    types: list[int]
    """llama.cpp's token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte."""
    scores: list[float] | None = None
    merges: list[str] | None = None
    add_space_prefix: bool | None = None
    add_bos_token: bool | None = None

    def write(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges is not None:
            writer.add_token_merges(self.merges)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.add_bos_token is not None:
            writer.add_add_bos_token(self.add_bos_token)
        writer.add_unk_token_id(UNK_ID)
        writer.add_bos_token_id(BOS_ID)
        writer.add_eos_token_id(EOS_ID)


def gpt2_vocab(vocab_size: int) -> GGUFVocab:
    """A byte-level BPE of printable ASCII, two merges and user-defined fillers."""
    alphabet = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ", "Ċ"]
    tokens = ["<unk>", "<s>", "</s>", *alphabet, "th", "Ġt"]
    tokens += [f"<extra_{i}>" for i in range(vocab_size - len(tokens))]
    types = [3, 3, 3] + [1] * (len(alphabet) + 2) + [4] * (vocab_size - len(alphabet) - 5)
    return GGUFVocab("gpt2", tokens, types, merges=["t h", "Ġ t"])


def train_sentencepiece(vocab_size: int, *, add_dummy_prefix: bool = True) -> bytes:
    """A serialized SentencePiece BPE model of `vocab_size` pieces (deterministic:
    one thread, a fixed corpus), trained with the options of Llama's tokenizer:
    identity normalization, whitespace kept, digits split, byte fallback."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 4),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        control_symbols=list(CONTROL_SYMBOLS),
        user_defined_symbols=list(USER_DEFINED_SYMBOLS),
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def sentencepiece_vocab(model: bytes, *, add_bos_token: bool | None = None) -> GGUFVocab:
    """The GGUF keys of a SentencePiece model: pieces, scores and piece types as
    they are (SentencePiece's types are llama.cpp's), no merges, and
    `add_space_prefix` from the model's `add_dummy_prefix`."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    return GGUFVocab(
        "llama",
        [piece.piece for piece in proto.pieces],
        [int(piece.type) for piece in proto.pieces],
        scores=[piece.score for piece in proto.pieces],
        add_space_prefix=proto.normalizer_spec.add_dummy_prefix,
        add_bos_token=add_bos_token,
    )


def _permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter's `permute` (convert_hf_to_gguf.py, LlamaModel)."""
    rows = weights.shape[0]
    return (
        weights.reshape(num_heads, 2, rows // num_heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_llama_gguf(hf_dir: Path, out: Path, qtype: str, vocab: GGUFVocab | None = None) -> Path:
    """A GGUF of a HF Llama checkpoint, as llama.cpp's converter writes one, with
    `vocab` (by default `gpt2_vocab` of the model's vocabulary size)."""
    import gguf
    from safetensors.torch import load_file

    from model.config import load_config

    config = load_config(hf_dir)
    vocab = vocab or gpt2_vocab(config.vocab_size)
    assert len(vocab.tokens) == config.vocab_size, "the vocabulary must fill the embeddings"
    state = load_file(str(hf_dir / "model.safetensors"))
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    vocab.write(writer)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    for i in range(config.num_layers):
        layer = f"model.layers.{i}."
        for hf_name, gguf_name in (
            ("input_layernorm.weight", "attn_norm.weight"),
            ("post_attention_layernorm.weight", "ffn_norm.weight"),
            ("self_attn.q_proj.weight", "attn_q.weight"),
            ("self_attn.k_proj.weight", "attn_k.weight"),
            ("self_attn.v_proj.weight", "attn_v.weight"),
            ("self_attn.o_proj.weight", "attn_output.weight"),
            ("mlp.gate_proj.weight", "ffn_gate.weight"),
            ("mlp.up_proj.weight", "ffn_up.weight"),
            ("mlp.down_proj.weight", "ffn_down.weight"),
        ):
            names[layer + hf_name] = f"blk.{i}.{gguf_name}"
    for hf_name, tensor in state.items():
        values = tensor.to(torch.float32).numpy()
        if hf_name.endswith("q_proj.weight"):
            values = _permute(values, config.num_heads)
        elif hf_name.endswith("k_proj.weight"):
            values = _permute(values, config.num_kv_heads)
        if values.ndim == 1:  # norms stay F32, as llama.cpp keeps them
            writer.add_tensor(names[hf_name], values)
        elif qtype == "F16":
            writer.add_tensor(names[hf_name], values.astype(np.float16))
        else:
            qt = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(names[hf_name], gguf.quants.quantize(values, qt), raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def write_tokenizer_gguf(out: Path, vocab: GGUFVocab) -> Path:
    """A file with a vocabulary and nothing else: enough for the tokenizer alone."""
    import gguf

    writer = gguf.GGUFWriter(str(out), "llama")
    vocab.write(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


TINY_VOCAB = ("a", "b", "ab", "<s>", "</s>", "Ġ", "Ġa", "c")
TINY_LLAMA_TENSORS = {
    "token_embd.weight": (len(TINY_VOCAB), 4),
    "output_norm.weight": (4,),
    "blk.0.attn_norm.weight": (4,),
    "blk.0.ffn_norm.weight": (4,),
    "blk.0.attn_q.weight": (4, 4),
    "blk.0.attn_k.weight": (2, 4),
    "blk.0.attn_v.weight": (2, 4),
    "blk.0.attn_output.weight": (4, 4),
    "blk.0.ffn_gate.weight": (8, 4),
    "blk.0.ffn_up.weight": (8, 4),
    "blk.0.ffn_down.weight": (4, 8),
}
"""A whole Llama (1 layer, hidden 4, 2 heads of 2, 1 KV head, tied embeddings)."""


def write_tiny_llama_gguf(
    path: Path, *, skip_tensors: tuple[str, ...] = (), block_count: int | list[int] = 1
) -> bytes:
    """A complete 2 KB Llama GGUF (byte-level BPE vocabulary, chat template, F32
    norms, F16 matrices, random weights) with `gguf.GGUFWriter`; returns its bytes.
    A list `block_count` is written as an array (a value of the wrong type)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    if isinstance(block_count, list):
        writer.add_array("llama.block_count", block_count)
    else:
        writer.add_block_count(block_count)
    writer.add_context_length(64)
    writer.add_embedding_length(4)
    writer.add_feed_forward_length(8)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(TINY_VOCAB))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(list(TINY_VOCAB))
    writer.add_token_types([1, 1, 1, 3, 3, 1, 1, 1])
    writer.add_token_merges(["a b", "Ġ a"])
    writer.add_bos_token_id(3)
    writer.add_eos_token_id(4)
    writer.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    rng = np.random.default_rng(0)
    for name, shape in TINY_LLAMA_TENSORS.items():
        if name in skip_tensors:
            continue
        values = rng.standard_normal(shape).astype(np.float32)
        writer.add_tensor(name, values if len(shape) == 1 else values.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()
