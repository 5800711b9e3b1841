"""`ModelConfig`: the shape of a Llama-family decoder, parsed from a HF `config.json`.

Accepts Llama, Mistral, Qwen2 and Gemma 3 (text) configs as older (`rope_theta` + `rope_scaling`) and
current (`rope_parameters`) `transformers` versions write them. Anything this
model code would silently compute differently (another architecture, an unknown
rope type) is refused with a `ModelLoadError` rather than served wrong. Sliding
windows are read as `transformers` applies them: Mistral's `sliding_window` on
every layer, Qwen2's with `use_sliding_window` on the layers `layer_types` (or
`max_window_layers`) names.

This module does not import torch: the router reads configs too.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Gemma3ForCausalLM",
)
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
MAX_LAYERS = 1024
"""More layers than any model has (Llama 3.1 405B: 126); a bound on what a config may claim."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling; `None` in `ModelConfig` means plain RoPE."""

    rope_type: str
    """`linear` (positions divided by `factor`) or `llama3` (Llama 3.1 banded scaling)."""
    factor: float
    """How much longer the context is than at pretraining."""
    low_freq_factor: float = 1.0
    """llama3 only: wavelengths above `original_max_position_embeddings / low_freq_factor` are scaled fully."""
    high_freq_factor: float = 4.0
    """llama3 only: wavelengths below `original_max_position_embeddings / high_freq_factor` are kept."""
    original_max_position_embeddings: int = 8192
    """llama3 only: the pretraining context length."""

    def __post_init__(self) -> None:
        if self.rope_type not in ("linear", "llama3"):
            raise ModelLoadError(f"unsupported rope scaling type {self.rope_type!r}")
        if self.factor <= 0:
            raise ModelLoadError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and not (
            self.high_freq_factor > self.low_freq_factor > 0
            and self.original_max_position_embeddings > 0
        ):
            raise ModelLoadError(
                "llama3 rope scaling needs high_freq_factor > low_freq_factor > 0 "
                "and original_max_position_embeddings > 0"
            )


@dataclass(frozen=True)
class ModelConfig:
    """The shape and constants of one Llama-family decoder."""

    architecture: str
    """HF architecture name, one of `SUPPORTED_ARCHITECTURES`."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    num_layers: int
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads: equal to `num_heads` for MHA, fewer for GQA, 1 for MQA."""
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    """The output projection reuses the embedding matrix (no `lm_head.weight`)."""
    attention_bias: bool = False
    """q/k/v projections carry a bias (Qwen2); the output projection never does."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    """Any of these ends generation (unless the request ignores EOS)."""
    layer_windows: tuple[int, ...] = ()
    """Per layer, how many positions a token attends to, its own included (HF's
    `sliding_window`), or 0 for the whole context; empty: no layer has a window."""
    # Gemma 3's differences from the Llama block; the defaults are Llama's.
    hidden_act: str = "silu"
    """The gated MLP's activation: `silu` (SwiGLU) or `gelu_pytorch_tanh` (GeGLU)."""
    norm_weight_offset: float = 0.0
    """RMSNorm scales by `offset + weight` (Gemma: 1, its weights are stored less one)."""
    has_qk_norm: bool = False
    """RMSNorm over each head of q and k, before RoPE."""
    has_sandwich_norms: bool = False
    """Norms after attention and after the MLP too, before each residual add."""
    embedding_scale: float | None = None
    """Embeddings are multiplied by this (Gemma: sqrt(hidden_size))."""
    query_pre_attn_scalar: float | None = None
    """Attention scores are scaled by its inverse square root (None: head_dim's)."""
    local_rope_theta: float | None = None
    """RoPE base of the windowed layers (`layer_windows`), plain RoPE (None:
    `rope_theta` and `rope_scaling` everywhere)."""
    final_logit_softcapping: float | None = None
    """Logits become `cap * tanh(logits / cap)`."""
    checkpoint_prefix: str = ""
    """Where the checkpoint keeps this model's tensors: `language_model.` for the
    text model of a `Gemma3ForConditionalGeneration` checkpoint."""
    ignored_checkpoint_prefixes: tuple[str, ...] = ()
    """Tensors of the checkpoint this model does not use (a vision tower)."""

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported architecture {self.architecture!r} "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                raise ModelLoadError(f"config {name} must be > 0, got {getattr(self, name)}")
        if self.num_layers > MAX_LAYERS:  # it sizes the tensor list before any file is read
            raise ModelLoadError(f"config num_layers is {self.num_layers}; at most {MAX_LAYERS}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ModelLoadError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ModelLoadError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):  # NaN too
            raise ModelLoadError("config rms_norm_eps and rope_theta must be > 0")
        if self.layer_windows and (
            len(self.layer_windows) != self.num_layers or min(self.layer_windows) < 0
        ):
            raise ModelLoadError(
                f"layer_windows needs {self.num_layers} values >= 0, got {self.layer_windows}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ModelLoadError(
                f"unsupported activation {self.hidden_act!r} (supported: {', '.join(ACTIVATIONS)})"
            )
        for name in ("embedding_scale", "query_pre_attn_scalar", "local_rope_theta"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ModelLoadError(f"config {name} must be > 0, got {value}")
        cap = self.final_logit_softcapping
        if cap is not None and not cap > 0:
            raise ModelLoadError(f"config final_logit_softcapping must be > 0, got {cap}")
        for token_id in (*self.eos_token_ids, self.bos_token_id):
            if token_id is not None and not 0 <= token_id < self.vocab_size:
                raise ModelLoadError(
                    f"special token id {token_id} outside vocab of {self.vocab_size}"
                )

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def full_window(self) -> int | None:
        """The window when every layer has one (the largest), else None: how far back
        any layer can see, so K/V before it is never read again."""
        if self.layer_windows and min(self.layer_windows) > 0:
            return max(self.layer_windows)
        return None

    def window(self, layer_idx: int) -> int | None:
        """The positions layer `layer_idx` attends to, its own included; None: all."""
        return (self.layer_windows[layer_idx] or None) if self.layer_windows else None

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        """Parse a HF `config.json` dict; raises `ModelLoadError` for what is unsupported."""
        architectures = hf.get("architectures") or []
        if not (isinstance(architectures, list) and len(architectures) == 1):
            raise ModelLoadError(
                f"config.json must name exactly one architecture, got {architectures}"
            )
        architecture = architectures[0]
        if architecture == "Gemma3ForCausalLM":
            return _gemma3_from_hf_dict(cls, hf)
        if architecture == "Gemma3ForConditionalGeneration":
            # Its text model, served on its own: images are not supported.
            text = hf.get("text_config")
            if not isinstance(text, dict):
                raise ModelLoadError("a Gemma3ForConditionalGeneration config needs a text_config")
            tied = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
            config = _gemma3_from_hf_dict(cls, {**text, "tie_word_embeddings": tied})
            return dataclasses.replace(
                config,
                checkpoint_prefix="language_model.",
                ignored_checkpoint_prefixes=("vision_tower.", "multi_modal_projector."),
            )
        try:
            num_heads = int(hf["num_attention_heads"])
            hidden_size = int(hf["hidden_size"])
            max_position_embeddings = int(hf.get("max_position_embeddings", 2048))
            num_layers = int(hf["num_hidden_layers"])
            layer_windows = _parse_layer_windows(
                hf, architecture, num_layers, max_position_embeddings
            )
            _check_plain_llama_block(hf)
            rope_theta, rope_scaling = _parse_rope(hf, max_position_embeddings)
            return cls(
                architecture=architecture,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden_size,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=num_layers,
                num_heads=num_heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
                # `head_dim` is explicit in Mistral/Qwen3-style configs and may differ
                # from hidden_size / num_heads.
                head_dim=int(hf.get("head_dim") or hidden_size // num_heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=max_position_embeddings,
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                # Qwen2 always has q/k/v bias and its config has no flag for it.
                attention_bias=architecture == "Qwen2ForCausalLM"
                or bool(hf.get("attention_bias", False)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=_as_id_tuple(hf.get("eos_token_id")),
                layer_windows=layer_windows,
            )
        except KeyError as exc:
            raise ModelLoadError(f"config.json is missing {exc.args[0]!r}") from None
        except (TypeError, ValueError, OverflowError, ZeroDivisionError) as exc:
            raise ModelLoadError(f"config.json has a bad value: {exc}") from None


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read `model_dir/config.json` (and EOS ids from `generation_config.json`, if any)."""
    path = Path(model_dir) / "config.json"
    hf = _read_json(path)
    config = ModelConfig.from_hf_dict(hf)
    generation_path = Path(model_dir) / "generation_config.json"
    if generation_path.is_file():
        # Chat models list extra end-of-turn ids here (Llama 3's <|eot_id|>).
        extra_eos = _as_id_tuple(_read_json(generation_path).get("eos_token_id"))
        merged = tuple(dict.fromkeys((*config.eos_token_ids, *extra_eos)))
        if merged != config.eos_token_ids:
            config = ModelConfig(**{**config.__dict__, "eos_token_ids": merged})
    return config


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"missing {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return data


def _as_id_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


_LAYER_TYPES = ("sliding_attention", "full_attention")


def _parse_layer_windows(
    hf: dict[str, Any], architecture: str, num_layers: int, max_position_embeddings: int
) -> tuple[int, ...]:
    """`ModelConfig.layer_windows`, as `transformers` applies the config's window."""
    window = hf.get("sliding_window")
    if architecture == "Qwen2ForCausalLM" and not hf.get("use_sliding_window", False):
        window = None  # Qwen2 carries a window it applies only with use_sliding_window
    if window is None or int(window) >= max_position_embeddings:
        return ()  # no window, or one no context reaches past
    window = int(window)
    if window <= 0:
        raise ModelLoadError(f"sliding_window must be > 0, got {window}")
    if architecture == "MistralForCausalLM":
        return (window,) * num_layers  # transformers' Mistral ignores layer_types
    if architecture != "Qwen2ForCausalLM":
        raise ModelLoadError(
            f"unsupported sliding_window {window} for {architecture} "
            f"(shorter than its {max_position_embeddings}-position context)"
        )
    layer_types = hf.get("layer_types")
    if layer_types is None:
        first = int(hf.get("max_window_layers", 28))
        layer_types = [_LAYER_TYPES[i < first] for i in range(num_layers)]
    return _windows_of(layer_types, window, num_layers, max_position_embeddings)


def _gemma3_from_hf_dict(cls: type[ModelConfig], hf: dict[str, Any]) -> ModelConfig:
    """A `Gemma3ForCausalLM` config (Gemma3TextConfig), as transformers reads it."""
    try:
        num_heads = int(hf["num_attention_heads"])
        hidden_size = int(hf["hidden_size"])
        num_layers = int(hf["num_hidden_layers"])
        max_position_embeddings = int(hf.get("max_position_embeddings", 131072))
        activation = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if activation != "gelu_pytorch_tanh":
            raise ModelLoadError(f"unsupported Gemma 3 activation {activation!r}")
        for flag in ("attn_logit_softcapping",):
            if hf.get(flag) is not None:
                raise ModelLoadError(f"unsupported {flag}={hf[flag]} (attention soft-capping)")
        if hf.get("use_bidirectional_attention"):
            raise ModelLoadError("unsupported use_bidirectional_attention=true")
        if hf.get("attention_bias", False):
            raise ModelLoadError("unsupported attention_bias=true for Gemma 3")
        layer_types = hf.get("layer_types")
        if layer_types is None:
            pattern = int(hf.get("sliding_window_pattern", 6))
            layer_types = [_LAYER_TYPES[(i + 1) % pattern == 0] for i in range(num_layers)]
        window = int(hf.get("sliding_window") or 4096)
        global_rope, local_rope = _gemma3_rope(hf, max_position_embeddings)
        softcap = hf.get("final_logit_softcapping")
        return cls(
            architecture="Gemma3ForCausalLM",
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden_size,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or 256),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=global_rope[0],
            rope_scaling=global_rope[1],
            max_position_embeddings=max_position_embeddings,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_as_id_tuple(hf.get("eos_token_id")),
            layer_windows=_windows_of(layer_types, window, num_layers, None),
            hidden_act="gelu_pytorch_tanh",
            norm_weight_offset=1.0,
            has_qk_norm=True,
            has_sandwich_norms=True,
            embedding_scale=hidden_size**0.5,
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
            local_rope_theta=local_rope,
            final_logit_softcapping=None if softcap is None else float(softcap),
        )
    except KeyError as exc:
        raise ModelLoadError(f"config.json is missing {exc.args[0]!r}") from None
    except (TypeError, ValueError, OverflowError, ZeroDivisionError) as exc:
        raise ModelLoadError(f"config.json has a bad value: {exc}") from None


def _gemma3_rope(
    hf: dict[str, Any], max_position_embeddings: int
) -> tuple[tuple[float, RopeScaling | None], float]:
    """((global theta, global scaling), local theta): `rope_parameters` per layer type
    (transformers >= 5), or `rope_theta`, `rope_scaling` and `rope_local_base_freq`."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        full = params.get("full_attention") or {}
        sliding = params.get("sliding_attention") or {}
        if not (isinstance(full, dict) and isinstance(sliding, dict)):
            raise ModelLoadError(
                "rope_parameters' full_attention and sliding_attention must be objects"
            )
        if sliding.get("rope_type", "default") != "default":
            raise ModelLoadError("unsupported rope scaling on Gemma 3's sliding layers")
        global_rope = _parse_rope({"rope_parameters": full}, max_position_embeddings)
        return global_rope, float(sliding.get("rope_theta", 10000.0))
    older = {k: hf[k] for k in ("rope_scaling", "rope_parameters") if hf.get(k)}
    older["rope_theta"] = hf.get("rope_theta", 1_000_000.0)
    global_rope = _parse_rope(older, max_position_embeddings)
    return global_rope, float(hf.get("rope_local_base_freq", 10000.0))


def _windows_of(
    layer_types: Any, window: int, num_layers: int, max_position_embeddings: int | None
) -> tuple[int, ...]:
    """Per-layer windows from HF's `layer_types`, checked; with `max_position_embeddings`,
    none when the window reaches past it (None keeps them: Gemma 3's windowed layers
    differ in their RoPE too)."""
    if (
        not isinstance(layer_types, list)
        or len(layer_types) != num_layers
        or any(t not in _LAYER_TYPES for t in layer_types)
    ):
        raise ModelLoadError(
            f"layer_types must list {num_layers} of {' or '.join(_LAYER_TYPES)}, got {layer_types}"
        )
    if window <= 0:
        raise ModelLoadError(f"sliding_window must be > 0, got {window}")
    if max_position_embeddings is not None and window >= max_position_embeddings:
        return ()
    windows = tuple(window if t == "sliding_attention" else 0 for t in layer_types)
    return windows if any(windows) else ()


def _check_plain_llama_block(hf: dict[str, Any]) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"unsupported hidden_act {hf['hidden_act']!r} (only silu)")
    if hf.get("mlp_bias", False):
        raise ModelLoadError("unsupported mlp_bias=true")
    if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ModelLoadError("unsupported partial_rotary_factor != 1")


def _parse_rope(
    hf: dict[str, Any], max_position_embeddings: int
) -> tuple[float, RopeScaling | None]:
    """Both spellings: `rope_parameters` (transformers >= 5) holds theta and scaling in
    one dict; older configs have a top-level `rope_theta` and an optional `rope_scaling`."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ModelLoadError("rope_parameters must be a JSON object")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ModelLoadError("unsupported per-layer-type rope_parameters")
    rope_theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"unsupported rope type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return rope_theta, None
    return rope_theta, RopeScaling(
        rope_type=rope_type,
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", max_position_embeddings)
        ),
    )
