"""`python -m benchmarks.gpu_check`: the GPU path proven in one prepared run.

    PYTHONPATH=. python -m benchmarks.gpu_check --out DIR            # full, < 8 min on an H100/H200
    PYTHONPATH=. python -m benchmarks.gpu_check --quick --out DIR    # < 3 min
    TRITON_INTERPRET=1 python -m benchmarks.gpu_check --cpu-smoke --out DIR   # tiny, on the CPU

Three parts, each next to its baseline in the same run:

1. `kernels`: the Triton paged-attention and KV-write kernels, compiled, against
   references that dequantize first: query dtypes float32, bfloat16 and float16; K/V
   stored as the model's dtype, int8 and fp8 e4m3; with and without a sliding
   window; head dims 64, 128 and 256; GQA 8:1 and MQA; contexts from 1 to 32k in
   one batch; block tables shuffled over the pool. The writes must be byte-exact.
2. `bandwidth`: paged decode attention (bfloat16, head dim 128, 32 query heads on 8
   KV heads) at contexts 1k/4k/16k/32k and batches 1/8/64: K/V bytes read per second,
   against the device's copy bandwidth (a large device-to-device copy) and against
   torch's `scaled_dot_product_attention` (flash) over the same K/V laid out
   contiguously. CUDA events after warm-up, the median of repeats.
3. `engine`: the decode engine end to end in bfloat16 on `dummy:1b` (Llama-3.2-1B's
   shape): decode tokens/s at batch 1, 16 and 64 against `transformers` `generate`
   with a static cache on the same weights (skipped, and said so, where
   `transformers` is not installed), and against our own engine with
   `enforce_eager` (no CUDA graphs), whose tokens must be the graphs' tokens; and
   prefill tokens/s for 1k and 8k prompts.

It needs only torch and Triton (no gRPC, Redis or network; it checks at import),
so it runs on a bare CUDA host from a copy of the working tree. Writes
`gpu_check.json` and `gpu_check.md` to `--out` and prints the table; exits 1 when a
kernel check fails. `--cpu-smoke` runs the same code on tiny shapes on the CPU
(Triton interpreted), so that `make test` keeps it from rotting between GPU runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from decode_worker.engine import DecodeEngine, EngineRequest
from decode_worker.engine_config import EngineConfig
from decode_worker.kernels.kv_cache_write import write_kv_cache_reference
from decode_worker.scheduler import SchedulerConfig
from kvstore.kv_quant import KVCacheFormat
from model.config import ModelConfig
from model.loader import LoadedModel, load_model
from model.sampling_params import SamplingParams

_FORBIDDEN = ("grpc", "redis", "ray", "opentelemetry")
_LOADED_FORBIDDEN = [name for name in _FORBIDDEN if name in sys.modules]
if _LOADED_FORBIDDEN and __name__ == "__main__":
    sys.exit(f"benchmarks.gpu_check imported {_LOADED_FORBIDDEN}: it must run on torch alone")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Tolerances of the interpreted kernel tests (tests/decode_worker/test_paged_attention.py).
TOLERANCES = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1e-2, 1e-2),
}
KV_FORMATS = ("auto", "int8", "fp8_e4m3")


@dataclass(frozen=True)
class Plan:
    """What one mode runs."""

    name: str
    device: str
    head_dims: tuple[int, ...]
    head_layouts: tuple[tuple[int, int], ...]
    """(query heads, KV heads)."""
    dtypes: tuple[str, ...]
    context_lens: tuple[int, ...]
    """One batch of sequences with these contexts per kernel case."""
    windows: tuple[int | None, ...]
    bandwidth_contexts: tuple[int, ...]
    bandwidth_batches: tuple[int, ...]
    bandwidth_heads: tuple[int, int, int]
    """(query heads, KV heads, head dim)."""
    engine_model: str
    engine_dtype: str
    engine_batches: tuple[int, ...]
    engine_prompt_len: int
    engine_new_tokens: int
    prefill_lens: tuple[int, ...]
    repeats: int
    block_size: int = 16


PLANS = {
    "full": Plan(
        "full", "cuda", (64, 128, 256), ((32, 4), (8, 1)), tuple(DTYPES),
        (1, 17, 1000, 4096, 32768), (None, 1024),
        (1024, 4096, 16384, 32768), (1, 8, 64), (32, 8, 128),
        "dummy:1b", "bfloat16", (1, 16, 64), 128, 64, (1024, 8192), 10,
    ),
    "quick": Plan(
        "quick", "cuda", (64, 128, 256), ((32, 4), (8, 1)), ("bfloat16", "float16"),
        (1, 17, 4096), (None, 1024),
        (4096, 32768), (8, 64), (32, 8, 128),
        "dummy:1b", "bfloat16", (1, 16), 128, 32, (1024,), 5,
    ),
    "cpu-smoke": Plan(
        "cpu-smoke", "cpu", (32,), ((8, 1),), ("float32",),
        (1, 17, 40), (None, 8),
        (64,), (1, 2), (4, 2, 32),
        "dummy:tiny", "float32", (1, 2), 8, 4, (32,), 2,
    ),
}  # fmt: skip


@dataclass
class Report:
    plan: str
    device: str
    kernels: list[dict] = field(default_factory=list)
    bandwidth: list[dict] = field(default_factory=list)
    engine: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def kernels_pass(self) -> bool:
        return all(case["ok"] for case in self.kernels)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Timer:
    """Median milliseconds of `fn` after warm-up: CUDA events on a GPU, else wall time."""

    def __init__(self, device: str, repeats: int) -> None:
        self.device, self.repeats = device, repeats

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(2):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.device == "cuda":
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                fn()
                times.append((time.perf_counter() - begin) * 1e3)
        return statistics.median(times)


# --- 1. kernels ----------------------------------------------------------------------


def paged_inputs(
    plan: Plan,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype,
    kv_cache_dtype: str,
    seed: int,
):
    """A batch with `plan.context_lens`, blocks shuffled over the pool; 8-bit caches
    quantized as `write_kv_cache` stores them."""
    generator = torch.Generator().manual_seed(seed)
    block = plan.block_size
    blocks_per_seq = [-(-n // block) for n in plan.context_lens]
    num_blocks = sum(blocks_per_seq) + 3
    shape = (num_blocks, block, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=generator) * 2
    value_cache = torch.randn(shape, generator=generator)
    kv_format = KVCacheFormat(kv_cache_dtype, dtype)
    if kv_format.is_quantized:
        key_cache, value_cache = kv_format.quantize(key_cache), kv_format.quantize(value_cache)
    else:
        key_cache, value_cache = key_cache.to(dtype), value_cache.to(dtype)
    query = torch.randn(len(plan.context_lens), num_heads, head_dim, generator=generator).to(dtype)
    physical = torch.randperm(num_blocks, generator=generator).tolist()
    tables = torch.zeros(len(plan.context_lens), max(blocks_per_seq), dtype=torch.int32)
    for seq, n in enumerate(blocks_per_seq):
        tables[seq, :n] = torch.tensor(physical[:n])
        physical = physical[n:]
    lens = torch.tensor(plan.context_lens, dtype=torch.int32)
    device = plan.device
    return tuple(t.to(device) for t in (query, key_cache, value_cache, tables, lens))


def dense_reference(query, key_cache, value_cache, tables, lens, scale, kv_cache_dtype, window):
    """Attention per sequence over its gathered, dequantized K/V in float32: the
    per-token reference's definition, vectorized (it loops over 32k positions)."""
    kv_format = KVCacheFormat(kv_cache_dtype, torch.float32)
    block = key_cache.shape[1]
    out = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    group = query.shape[1] // key_cache.shape[2]
    for seq, context_len in enumerate(lens.tolist()):
        ids = tables[seq, : -(-context_len // block)].long()
        k = key_cache[ids].flatten(0, 1)[:context_len]
        v = value_cache[ids].flatten(0, 1)[:context_len]
        if window:
            k, v = k[-window:], v[-window:]
        k = kv_format.dequantize(k, torch.float32).repeat_interleave(group, dim=1)
        v = kv_format.dequantize(v, torch.float32).repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,thd->ht", query[seq].float(), k) * scale
        out[seq] = torch.einsum("ht,thd->hd", torch.softmax(scores, dim=-1), v)
    return out


def kernels_part(plan: Plan, report: Report) -> None:
    from decode_worker.kernels.kv_cache_write_triton import write_kv_cache_triton
    from decode_worker.kernels.paged_attention_triton import paged_attention_triton

    seed = 0
    for head_dim in plan.head_dims:
        for num_heads, num_kv_heads in plan.head_layouts:
            for dtype_name in plan.dtypes:
                dtype = DTYPES[dtype_name]
                atol, rtol = TOLERANCES[dtype]
                for kv_cache_dtype in KV_FORMATS:
                    for window in plan.windows:
                        seed += 1
                        inputs = paged_inputs(
                            plan, num_heads, num_kv_heads, head_dim, dtype, kv_cache_dtype, seed
                        )
                        scale = head_dim**-0.5
                        actual = paged_attention_triton(
                            *inputs, scale, kv_cache_dtype=kv_cache_dtype, window=window
                        )
                        expected = dense_reference(*inputs, scale, kv_cache_dtype, window)
                        error = (actual.float() - expected).abs().max().item()
                        ok = bool(torch.allclose(actual.float(), expected, atol=atol, rtol=rtol))
                        report.kernels.append(
                            {
                                "kernel": "paged_attention", "head_dim": head_dim,
                                "heads": f"{num_heads}:{num_kv_heads}", "dtype": dtype_name,
                                "kv_cache_dtype": kv_cache_dtype, "window": window,
                                "max_abs_error": error, "ok": ok,
                            }
                        )  # fmt: skip
                for kv_cache_dtype in KV_FORMATS:
                    report.kernels.append(
                        write_case(plan, write_kv_cache_triton, head_dim, num_kv_heads, DTYPES[dtype_name], kv_cache_dtype)
                        | {"dtype": dtype_name, "heads": f"{num_heads}:{num_kv_heads}"}
                    )  # fmt: skip
    failed = [c for c in report.kernels if not c["ok"]]
    log(f"kernels: {len(report.kernels) - len(failed)}/{len(report.kernels)} cases pass")


def write_case(
    plan: Plan, write_triton, head_dim: int, num_kv_heads: int, dtype, kv_cache_dtype: str
) -> dict:
    """The Triton write against the per-token reference: byte-exact, skipped slots (-1) untouched."""
    generator = torch.Generator().manual_seed(head_dim + num_kv_heads)
    block, num_blocks = plan.block_size, 8
    num_tokens = 3 * block + 5
    slots = torch.randperm(num_blocks * block, generator=generator)[:num_tokens]
    slots[1] = -1
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator).to(dtype)
    kv_format = KVCacheFormat(kv_cache_dtype, dtype)
    width = kv_format.row_width(head_dim)
    cache = torch.zeros(num_blocks, block, num_kv_heads, width, dtype=kv_format.storage_dtype)
    expected_k, expected_v = cache.clone(), cache.clone()
    write_kv_cache_reference(key, value, expected_k, expected_v, slots, kv_cache_dtype)
    device = plan.device
    actual_k, actual_v = cache.clone().to(device), cache.clone().to(device)
    write_triton(
        key.to(device), value.to(device), actual_k, actual_v, slots.to(device), kv_cache_dtype
    )
    ok = torch.equal(actual_k.cpu(), expected_k) and torch.equal(actual_v.cpu(), expected_v)
    return {"kernel": "write_kv_cache", "head_dim": head_dim, "kv_cache_dtype": kv_cache_dtype, "window": None, "max_abs_error": 0.0 if ok else float("nan"), "ok": ok}  # fmt: skip


# --- 2. bandwidth --------------------------------------------------------------------


def copy_bandwidth(plan: Plan, timer: Timer) -> float:
    """Bytes moved per second (read plus written) by a large device-to-device copy."""
    num_bytes = (1 << 30) if plan.device == "cuda" else (1 << 24)
    src = torch.empty(num_bytes, dtype=torch.uint8, device=plan.device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * num_bytes / (ms / 1e3)


def bandwidth_part(plan: Plan, report: Report) -> None:
    from decode_worker.kernels.paged_attention_triton import paged_attention_triton

    timer = Timer(plan.device, plan.repeats)
    copy = copy_bandwidth(plan, timer)
    num_heads, num_kv_heads, head_dim = plan.bandwidth_heads
    dtype, block, device = torch.bfloat16, plan.block_size, plan.device
    if device == "cpu":
        dtype = torch.float32
    for context in plan.bandwidth_contexts:
        for batch in plan.bandwidth_batches:
            blocks_per_seq = context // block
            shape = (batch * blocks_per_seq, block, num_kv_heads, head_dim)
            key_cache = torch.randn(shape, device=device, dtype=dtype)
            value_cache = torch.randn(shape, device=device, dtype=dtype)
            order = torch.randperm(batch * blocks_per_seq, device=device).to(torch.int32)
            tables = order.view(batch, blocks_per_seq)
            lens = torch.full((batch,), context, dtype=torch.int32, device=device)
            query = torch.randn(batch, num_heads, head_dim, device=device, dtype=dtype)
            scale = head_dim**-0.5
            paged = functools.partial(
                paged_attention_triton, query, key_cache, value_cache, tables, lens, scale
            )
            paged_ms = timer(paged)
            kv_bytes = 2 * batch * context * num_kv_heads * head_dim * key_cache.element_size()
            sdpa_ms, backend = sdpa_time(query, key_cache, value_cache, tables, timer)
            report.bandwidth.append(
                {
                    "context": context, "batch": batch, "paged_ms": paged_ms,
                    "paged_gb_s": kv_bytes / (paged_ms / 1e3) / 1e9,
                    "copy_gb_s": copy / 1e9,
                    "of_copy": kv_bytes / (paged_ms / 1e3) / copy,
                    "sdpa_ms": sdpa_ms, "sdpa_backend": backend,
                    "vs_sdpa": sdpa_ms / paged_ms,
                }
            )  # fmt: skip
    log(f"bandwidth: {len(report.bandwidth)} points")


def sdpa_time(query, key_cache, value_cache, tables, timer: Timer) -> tuple[float, str]:
    """torch SDPA (flash where the device has it) over the same K/V, contiguous."""
    _batch, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    k = key_cache[tables.long()].flatten(1, 2).transpose(1, 2).contiguous()  # [b, kvh, t, d]
    v = value_cache[tables.long()].flatten(1, 2).transpose(1, 2).contiguous()
    q = query[:, :, None, :]
    scale = head_dim**-0.5
    if query.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                run = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                    q, k, v, scale=scale, enable_gqa=True
                )
                return timer(run), "flash (enable_gqa)"
        except RuntimeError:
            pass
    group = num_heads // num_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    run = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)  # noqa: E731
    return timer(run), "default (K/V repeated per query head)"


# --- 3. engine ------------------------------------------------------------------------


def engine_part(plan: Plan, report: Report) -> None:
    dtype = DTYPES[plan.engine_dtype]
    log(f"engine: loading {plan.engine_model} ({plan.engine_dtype}, {plan.device})")
    loaded = load_model(plan.engine_model, dtype=dtype, device=plan.device)
    reference = hf_reference(loaded, report)
    for batch in plan.engine_batches:
        prompts = [
            random_prompt(loaded.config, plan.engine_prompt_len, seed=i) for i in range(batch)
        ]
        ours, our_tokens = our_decode_rate(loaded, prompts, plan.engine_new_tokens)
        eager, eager_tokens = our_decode_rate(
            loaded, prompts, plan.engine_new_tokens, enforce_eager=True
        )
        # On CUDA `ours` replays CUDA graphs; on the CPU both runs are eager.
        entry = {"kind": "decode", "batch": batch, "kvrelay_tok_s": ours,
                 "eager_tok_s": eager, "graphs_vs_eager": ours / eager,
                 "eager_tokens_agree": our_tokens == eager_tokens}  # fmt: skip
        if reference is not None:
            theirs, their_tokens = hf_decode_rate(reference, prompts, plan.engine_new_tokens)
            entry |= {"transformers_tok_s": theirs, "ratio": ours / theirs,
                      "tokens_agree": our_tokens == their_tokens}  # fmt: skip
        report.engine.append(entry)
        log(f"engine decode batch {batch}: {entry}")
    for length in plan.prefill_lens:
        prompt = random_prompt(loaded.config, length, seed=100)
        report.engine.append(
            {
                "kind": "prefill",
                "prompt_len": length,
                "kvrelay_tok_s": our_prefill_rate(loaded, prompt),
            }
        )


def random_prompt(config: ModelConfig, length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, min(config.vocab_size, 30000), (length,), generator=generator).tolist()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def our_engine(
    loaded: LoadedModel,
    prompts: list[list[int]],
    max_tokens: int,
    batched_tokens: int = 512,
    enforce_eager: bool = False,
) -> DecodeEngine:
    """An engine with the prompts queued; on CUDA it captures its decode graphs here,
    before any clock starts (unless `enforce_eager`)."""
    block = 16
    num_blocks = sum(-(-(len(p) + max_tokens) // block) for p in prompts) + 8
    config = EngineConfig(
        num_blocks=num_blocks,
        scheduler=SchedulerConfig(max_num_seqs=max(len(prompts), 1), max_num_batched_tokens=max(batched_tokens, len(prompts))),
        enforce_eager=enforce_eager,
    )  # fmt: skip
    engine = DecodeEngine(loaded, config, b"gpu-check")
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineRequest(str(i), prompt, params))
    return engine


def our_decode_rate(
    loaded: LoadedModel, prompts: list[list[int]], new_tokens: int, enforce_eager: bool = False
) -> tuple[float, list[list[int]]]:
    """Tokens/s of the steps after every prompt has its first token (prefill excluded)."""
    engine = our_engine(loaded, prompts, new_tokens, enforce_eager=enforce_eager)
    tokens: list[list[int]] = [[] for _ in prompts]
    while any(not t for t in tokens):
        for out in engine.step():
            tokens[int(out.request_id)].append(out.token_id)
    synchronize(loaded.device)
    start, num_decoded = time.perf_counter(), 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens[int(out.request_id)].append(out.token_id)
            num_decoded += 1
    synchronize(loaded.device)
    return num_decoded / (time.perf_counter() - start), tokens


def our_prefill_rate(loaded: LoadedModel, prompt: list[int]) -> float:
    engine = our_engine(loaded, [prompt], 1, batched_tokens=len(prompt))
    synchronize(loaded.device)
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    synchronize(loaded.device)
    return len(prompt) / (time.perf_counter() - start)


def hf_reference(loaded: LoadedModel, report: Report):
    """`transformers` Llama with the same tensors, or None (noted) without transformers."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        report.notes.append(
            "transformers is not installed: the engine part ran without its baseline"
        )
        return None
    config = loaded.config
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope = {"rope_type": s.rope_type, "rope_theta": config.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}  # fmt: skip
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps, rope_parameters=rope,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
    )  # fmt: skip
    model = LlamaForCausalLM(hf_config).eval()
    missing, unexpected = model.load_state_dict(hf_state_dict(loaded), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.to(device=loaded.device, dtype=loaded.dtype)


def hf_state_dict(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    """Our fused tensors back under HF's names."""
    model, config = loaded.model, loaded.config
    q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    state = {
        "model.embed_tokens.weight": model.embed_tokens.weight,
        "model.norm.weight": model.norm.weight,
    }
    if model.lm_head is not None:
        state["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        q, k, v = layer.self_attn.qkv_proj.weight.split([q_size, kv_size, kv_size])
        gate, up = layer.mlp.gate_up_proj.weight.split(config.intermediate_size)
        state |= {
            f"{prefix}self_attn.q_proj.weight": q, f"{prefix}self_attn.k_proj.weight": k,
            f"{prefix}self_attn.v_proj.weight": v,
            f"{prefix}self_attn.o_proj.weight": layer.self_attn.o_proj.weight,
            f"{prefix}mlp.gate_proj.weight": gate, f"{prefix}mlp.up_proj.weight": up,
            f"{prefix}mlp.down_proj.weight": layer.mlp.down_proj.weight,
            f"{prefix}input_layernorm.weight": layer.input_layernorm.weight,
            f"{prefix}post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
        }  # fmt: skip
    return {name: t.detach().float().cpu() for name, t in state.items()}


@torch.inference_mode()
def hf_decode_rate(
    model, prompts: list[list[int]], new_tokens: int
) -> tuple[float, list[list[int]]]:
    """Greedy `generate` with a static cache; tokens/s of the steps after the first
    token, from a run of one token and one of `new_tokens` (same-length prompts)."""
    device = next(model.parameters()).device
    ids = torch.tensor(prompts, device=device)

    def run(n: int) -> tuple[float, torch.Tensor]:
        synchronize(device)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             cache_implementation="static", pad_token_id=0)  # fmt: skip
        synchronize(device)
        return time.perf_counter() - start, out

    run(2)  # warm-up (the static cache and its kernels)
    first, _ = run(1)
    total, out = run(new_tokens)
    tokens = out[:, ids.shape[1] :].tolist()
    return len(prompts) * (new_tokens - 1) / max(total - first, 1e-9), tokens


# --- the report --------------------------------------------------------------------------


def markdown(report: Report) -> str:
    lines = [f"# gpu_check ({report.plan}) on {report.device}", ""]
    failed = [c for c in report.kernels if not c["ok"]]
    lines += [f"kernels: {len(report.kernels) - len(failed)}/{len(report.kernels)} cases pass", ""]
    for case in failed:
        lines.append(f"- FAILED {case}")
    if report.bandwidth:
        lines += [
            "",
            "| context | batch | paged GB/s | of copy | vs SDPA (time ratio) | SDPA backend |",
            "|---|---|---|---|---|---|",
        ]
        for b in report.bandwidth:
            lines.append(
                f"| {b['context']} | {b['batch']} | {b['paged_gb_s']:.1f} | {b['of_copy']:.3g} | {b['vs_sdpa']:.3g} | {b['sdpa_backend']} |"
            )
        lines.append(
            f"\ncopy bandwidth (read + write): {report.bandwidth[0]['copy_gb_s']:.1f} GB/s"
        )
    if report.engine:
        lines += [
            "",
            "| engine | size | kvrelay tok/s | transformers tok/s | ratio | tokens agree "
            "| eager tok/s | graphs / eager | eager tokens agree |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for e in report.engine:
            size = f"batch {e['batch']}" if e["kind"] == "decode" else f"prompt {e['prompt_len']}"
            theirs = f"{e['transformers_tok_s']:.1f}" if "transformers_tok_s" in e else "-"
            ratio = f"{e['ratio']:.2f}" if "ratio" in e else "-"
            agree = str(e.get("tokens_agree", "-"))
            eager = f"{e['eager_tok_s']:.1f}" if "eager_tok_s" in e else "-"
            speedup = f"{e['graphs_vs_eager']:.2f}" if "graphs_vs_eager" in e else "-"
            eager_agree = str(e.get("eager_tokens_agree", "-"))
            lines.append(
                f"| {e['kind']} | {size} | {e['kvrelay_tok_s']:.1f} | {theirs} | {ratio} | {agree} "
                f"| {eager} | {speedup} | {eager_agree} |"
            )
    lines += [f"- {note}" for note in report.notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("`", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer cases and sizes (< 3 min)")
    mode.add_argument(
        "--cpu-smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md"
    )
    parser.add_argument(
        "--parts", default="kernels,bandwidth,engine", help="comma-separated subset"
    )
    args = parser.parse_args()
    plan = PLANS["cpu-smoke" if args.cpu_smoke else "quick" if args.quick else "full"]
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not set(parts) <= {"kernels", "bandwidth", "engine"}:
        parser.error("--parts takes kernels, bandwidth and engine")
    if plan.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: use --cpu-smoke (with TRITON_INTERPRET=1)")
    device_name = (
        torch.cuda.get_device_name() if plan.device == "cuda" else "CPU (Triton interpreted)"
    )
    report = Report(plan.name, device_name)
    started = time.perf_counter()
    for part in parts:
        {"kernels": kernels_part, "bandwidth": bandwidth_part, "engine": engine_part}[part](
            plan, report
        )
        log(f"{part} done at {time.perf_counter() - started:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(
        json.dumps({"plan": asdict(plan), **asdict(report)}, indent=1)
    )
    text = markdown(report)
    (args.out / "gpu_check.md").write_text(text)
    print(text)
    sys.exit(0 if report.kernels_pass else 1)


if __name__ == "__main__":
    main()
