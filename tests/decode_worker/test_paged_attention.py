"""Paged attention: the Triton kernels and the batched torch path against the reference."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from decode_worker.kernels.paged_attention import (
    _FP8_AS_FLOAT16_SCALE,
    _fp8_e4m3_as_float16,
    gather_layout,
    paged_attention,
    paged_attention_reference,
    paged_attention_torch,
)
from kvstore.kv_quant import KVCacheFormat

triton_module = pytest.importorskip("decode_worker.kernels.paged_attention_triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Case:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    context_lens: tuple[int, ...]
    partition_size: int | None = None  # None: the launcher's default

    @property
    def id(self) -> str:
        split = f"-part{self.partition_size}" if self.partition_size else ""
        lens = "_".join(map(str, self.context_lens))
        return (
            f"h{self.num_heads}kv{self.num_kv_heads}-d{self.head_dim}-bs{self.block_size}"
            f"-ctx{lens}{split}"
        )


# Every value of every axis appears: GQA ratio 1 / 3 / MQA, head dim 32 / 64 / 128, block
# size 8 / 16 / 32, context 1, bs-1, bs, bs+1 and several hundred, one or many sequences,
# one partition or a split context (including a split that ends mid-block).
CASES = [
    Case(4, 4, 32, 8, (1,)),
    Case(4, 4, 64, 16, (15, 16, 17)),
    Case(6, 2, 32, 16, (1, 15, 16, 17, 300)),
    Case(6, 2, 128, 32, (31, 32, 33)),
    Case(8, 1, 64, 8, (7, 8, 9, 257)),
    Case(4, 1, 128, 16, (300,)),
    Case(6, 2, 64, 8, (1, 9, 333), partition_size=64),
    Case(4, 1, 32, 32, (33, 320), partition_size=64),
    Case(3, 3, 32, 16, (17, 200, 64), partition_size=16),
]


def make_inputs(case: Case, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Random query and caches, with each sequence's blocks scattered over a shuffled
    pool and the padding entries of the block table set to -1 (never read)."""
    generator = torch.Generator().manual_seed(seed)
    num_seqs = len(case.context_lens)
    blocks_per_seq = [-(-n // case.block_size) for n in case.context_lens]
    max_blocks = max(blocks_per_seq) + 1  # one spare column of padding for everyone
    num_blocks = sum(blocks_per_seq) + 5
    shape = (num_blocks, case.block_size, case.num_kv_heads, case.head_dim)
    key_cache = torch.randn(shape, generator=generator)
    value_cache = torch.randn(shape, generator=generator)
    query = torch.randn(num_seqs, case.num_heads, case.head_dim, generator=generator)
    physical = torch.randperm(num_blocks, generator=generator).tolist()
    block_tables = torch.full((num_seqs, max_blocks), -1, dtype=torch.int32)
    for seq, num_seq_blocks in enumerate(blocks_per_seq):
        block_tables[seq, :num_seq_blocks] = torch.tensor(physical[:num_seq_blocks])
        physical = physical[num_seq_blocks:]
    context_lens = torch.tensor(case.context_lens, dtype=torch.int32)
    tensors = (query, key_cache, value_cache)
    query, key_cache, value_cache = (t.to(DEVICE, dtype) for t in tensors)
    return query, key_cache, value_cache, block_tables.to(DEVICE), context_lens.to(DEVICE)


def assert_close(actual, expected, case_id: str, atol: float, rtol: float) -> None:
    error = (actual.float() - expected.float()).abs().max().item()
    assert torch.allclose(actual.float(), expected.float(), atol=atol, rtol=rtol), (
        f"case {case_id}: max abs error {error:.3g} exceeds atol={atol}, rtol={rtol}"
    )


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_triton_matches_reference(case: Case) -> None:
    inputs = make_inputs(case)
    scale = case.head_dim**-0.5
    expected = paged_attention_reference(*inputs, scale)
    actual = triton_module.paged_attention_triton(
        *inputs, scale, partition_size=case.partition_size
    )
    assert actual.shape == expected.shape
    assert_close(actual, expected, case.id, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_torch_path_matches_reference(case: Case) -> None:
    inputs = make_inputs(case)
    scale = case.head_dim**-0.5
    expected = paged_attention_reference(*inputs, scale)
    actual = paged_attention(*inputs, scale, backend="torch")
    assert_close(actual, expected, case.id, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_torch_path_half_precision(dtype: torch.dtype) -> None:
    case = CASES[2]
    inputs = make_inputs(case, dtype=dtype)
    expected = paged_attention_reference(*inputs, 0.2)
    actual = paged_attention_torch(*inputs, 0.2)
    assert actual.dtype == dtype
    assert_close(actual, expected, f"{case.id}-{dtype}", atol=1e-2, rtol=1e-2)


def test_triton_half_precision() -> None:
    case = CASES[6]
    inputs = make_inputs(case, dtype=torch.float16)
    expected = paged_attention_reference(*inputs, 0.2)
    actual = triton_module.paged_attention_triton(*inputs, 0.2, partition_size=64)
    assert actual.dtype == torch.float16
    assert_close(actual, expected, f"{case.id}-fp16", atol=2e-3, rtol=2e-3)


def test_strided_query_from_fused_qkv() -> None:
    """The model slices q out of a fused qkv projection: rows are not contiguous."""
    case = CASES[4]
    query, key_cache, value_cache, block_tables, context_lens = make_inputs(case)
    qkv = torch.cat([query, torch.zeros_like(query)], dim=1)
    strided_query = qkv[:, : case.num_heads]
    assert not strided_query.is_contiguous()
    expected = paged_attention_reference(
        query, key_cache, value_cache, block_tables, context_lens, 0.1
    )
    for backend in ("torch", "triton"):
        actual = paged_attention(
            strided_query, key_cache, value_cache, block_tables, context_lens, 0.1, backend=backend
        )
        assert_close(actual, expected, f"{case.id}-strided-{backend}", atol=1e-5, rtol=1e-4)


def test_single_token_context_returns_its_value() -> None:
    """With one cached token, softmax is 1 and the output is exactly that token's V."""
    case = Case(4, 2, 32, 8, (1, 1))
    query, key_cache, value_cache, block_tables, context_lens = make_inputs(case)
    for backend in ("torch", "triton"):
        out = paged_attention(
            query, key_cache, value_cache, block_tables, context_lens, 1.0, backend=backend
        )
        for seq in range(2):
            block = int(block_tables[seq, 0])
            expected = value_cache[block, 0].repeat_interleave(2, dim=0)
            assert torch.allclose(out[seq], expected, atol=1e-6), f"seq {seq} backend {backend}"


def test_default_backend_is_torch_on_cpu() -> None:
    inputs = make_inputs(CASES[1])
    if DEVICE == "cpu":
        assert torch.equal(paged_attention(*inputs, 0.5), paged_attention_torch(*inputs, 0.5))


def test_empty_batch() -> None:
    case = CASES[0]
    query, key_cache, value_cache, _, _ = make_inputs(case)
    empty_query = query[:0]
    tables = torch.zeros(0, 1, dtype=torch.int32, device=DEVICE)
    lens = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    for backend in ("torch", "triton"):
        out = paged_attention(
            empty_query, key_cache, value_cache, tables, lens, 1.0, backend=backend
        )
        assert out.shape == (0, case.num_heads, case.head_dim)


def _bad_inputs():
    query, key_cache, value_cache, tables, lens = make_inputs(Case(4, 2, 32, 8, (5, 9)))
    yield "query must be", (query[0], key_cache, value_cache, tables, lens)
    yield "value_cache shape", (query, key_cache, value_cache[:, :4], tables, lens)
    yield "head_dim", (query[..., :16], key_cache, value_cache, tables, lens)
    yield "multiple of num_kv_heads", (query[:, :3], key_cache, value_cache, tables, lens)
    yield "key_cache dtype", (query, key_cache.double(), value_cache, tables, lens)
    yield "block_tables must be int32", (query, key_cache, value_cache, tables.long(), lens)
    yield "context_lens must be int32", (query, key_cache, value_cache, tables, lens.long())
    yield "block_tables must be", (query, key_cache, value_cache, tables[:1], lens)
    yield "context_lens must be", (query, key_cache, value_cache, tables, lens[:1])
    transposed = key_cache.transpose(-1, -2).contiguous().transpose(-1, -2)
    yield (
        "key_cache must have a contiguous last dimension",
        (
            query,
            transposed,
            value_cache,
            tables,
            lens,
        ),
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_arguments_raise_value_error_naming_them(backend: str) -> None:
    for message, args in _bad_inputs():
        with pytest.raises(ValueError, match=message):
            paged_attention(*args, 1.0, backend=backend)


def test_triton_rejects_layouts_it_cannot_run() -> None:
    query, key_cache, value_cache, tables, lens = make_inputs(Case(2, 1, 32, 8, (5,)))
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        triton_module.paged_attention_triton(
            query[..., :24], key_cache[..., :24], value_cache[..., :24], tables, lens, 1.0
        )
    with pytest.raises(ValueError, match="power-of-two block_size"):
        triton_module.paged_attention_triton(
            query, key_cache[:, :6], value_cache[:, :6], tables, lens, 1.0
        )
    with pytest.raises(ValueError, match="multiple of block_size"):
        triton_module.paged_attention_triton(
            query, key_cache, value_cache, tables, lens, 1.0, partition_size=12
        )
    with pytest.raises(ValueError, match="backend must be"):
        paged_attention(query, key_cache, value_cache, tables, lens, 1.0, backend="cuda")


def test_gather_layout_is_built_once_and_reused_across_layers() -> None:
    # One layout, two layers' caches: the model runner builds it once per step.
    case = Case(6, 2, 32, 8, (7, 8, 9, 40))
    query, key_cache, _, block_tables, context_lens = make_inputs(case)
    layout = gather_layout(block_tables, context_lens, case.block_size)
    assert layout.padded_len == 40  # 5 blocks of 8
    assert layout.is_padding is not None
    assert layout.is_padding[:, 0, 0].sum(dim=1).tolist() == [33, 32, 31, 0]
    generator = torch.Generator().manual_seed(1)
    for layer in range(2):
        layer_query = torch.randn(query.shape, generator=generator).to(DEVICE)
        keys, values = (torch.randn(key_cache.shape, generator=generator).to(DEVICE) for _ in "kv")
        inputs = (layer_query, keys, values, block_tables, context_lens)
        expected = paged_attention_reference(*inputs, 0.3)
        actual = paged_attention_torch(*inputs, 0.3, layout)
        assert_close(actual, expected, f"{case.id}-layer{layer}", atol=1e-5, rtol=1e-5)


def test_gather_layout_without_padding_has_no_mask() -> None:
    case = Case(4, 2, 32, 8, (16, 16))
    *_, block_tables, context_lens = make_inputs(case)
    layout = gather_layout(block_tables, context_lens, case.block_size)
    assert layout.is_padding is None
    assert layout.padded_len == 16
    # The table's spare third column (-1) is never gathered.
    assert layout.block_indices.tolist() == block_tables[:, :2].reshape(-1).tolist()


# 8-bit caches: head dims 64 and 128 (and 32), MHA, GQA and MQA, one partition and split.
QUANTIZED_CASES = [CASES[1], CASES[3], CASES[4], CASES[6], CASES[7]]


def make_quantized_inputs(case: Case, kv_cache_dtype: str, dtype: torch.dtype = torch.float32):
    """`make_inputs`, with the caches quantized row by row as `write_kv_cache` stores
    them; the reference dequantizes them before attending."""
    query, key_cache, value_cache, block_tables, context_lens = make_inputs(case, dtype)
    kv_format = KVCacheFormat(kv_cache_dtype, dtype)
    # Larger K so that the scores, not only the values, feel the quantization.
    key_cache = kv_format.quantize(key_cache * 4)
    value_cache = kv_format.quantize(value_cache)
    return query, key_cache, value_cache, block_tables, context_lens


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", QUANTIZED_CASES, ids=[c.id for c in QUANTIZED_CASES])
def test_8bit_caches_match_the_reference_that_dequantizes_first(
    case: Case, backend: str, kv_cache_dtype: str
) -> None:
    inputs = make_quantized_inputs(case, kv_cache_dtype)
    scale = case.head_dim**-0.5
    expected = paged_attention_reference(*inputs, scale, kv_cache_dtype=kv_cache_dtype)
    if backend == "triton":
        actual = triton_module.paged_attention_triton(
            *inputs, scale, partition_size=case.partition_size, kv_cache_dtype=kv_cache_dtype
        )
    else:
        actual = paged_attention(*inputs, scale, backend="torch", kv_cache_dtype=kv_cache_dtype)
    # The same tolerance as full precision: only the order of float32 sums differs.
    assert_close(actual, expected, f"{case.id}-{kv_cache_dtype}", atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8_e4m3"])
def test_8bit_caches_stay_close_to_full_precision_attention(kv_cache_dtype: str) -> None:
    # Not a kernel check (that is above) but a sanity bound on what 8 bits cost.
    case = CASES[2]
    query, key_cache, value_cache, tables, lens = make_inputs(case)
    full = paged_attention_reference(query, key_cache, value_cache, tables, lens, 0.2)
    kv_format = KVCacheFormat(kv_cache_dtype, torch.float32)
    quantized = paged_attention(
        query, kv_format.quantize(key_cache), kv_format.quantize(value_cache), tables, lens, 0.2,
        kv_cache_dtype=kv_cache_dtype,
    )  # fmt: skip
    error = (quantized - full).abs().max().item()
    assert 0 < error < (0.02 if kv_cache_dtype == "int8" else 0.1), error


def test_8bit_half_precision_queries() -> None:
    case = CASES[6]
    inputs = make_quantized_inputs(case, "int8", dtype=torch.bfloat16)
    expected = paged_attention_reference(*inputs, 0.2, kv_cache_dtype="int8")
    for backend in ("torch", "triton"):
        actual = paged_attention(*inputs, 0.2, backend=backend, kv_cache_dtype="int8")
        assert actual.dtype == torch.bfloat16
        assert_close(actual, expected, f"{case.id}-bf16-{backend}", atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cache_dtype": torch.float32}, "must be uint8 rows for kv_cache_dtype int8"),
        ({"row_width": 64}, "int8 cache rows must be query head_dim 64 \\+ 2 scale bytes = 66"),
    ],
    ids=["full-precision-cache", "rows-without-scales"],
)
def test_8bit_cache_arguments_are_checked(change: dict, message: str) -> None:
    query = torch.randn(2, 4, 64)
    shape = (4, 16, 2, change.get("row_width", 66))
    cache = torch.zeros(shape, dtype=change.get("cache_dtype", torch.uint8))
    tables = torch.zeros(2, 1, dtype=torch.int32)
    lens = torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match=message):
        paged_attention(query, cache, cache.clone(), tables, lens, 0.1, kv_cache_dtype="int8")


def test_the_torch_paths_fp8_widening_is_exact_for_every_stored_byte() -> None:
    every_byte = torch.arange(256, dtype=torch.uint8)
    finite = every_byte[(every_byte & 0x7F) != 0x7F]  # 0x7F and 0xFF are NaN: never stored
    fp8 = finite.view(torch.float8_e4m3fn)
    widened = _fp8_e4m3_as_float16(fp8.reshape(2, 127)).reshape(-1).float()
    assert torch.equal(widened * _FP8_AS_FLOAT16_SCALE, fp8.float())
    assert fp8.float().abs().max() == 448 and (fp8.float() == 2.0**-9).any()  # max, subnormal


# Sliding windows: a window of one token, one block, one block plus one, past the
# context; head dims 64, 128 and 256; split contexts whose first partitions lie
# wholly before the window (their partials must weigh nothing).
WINDOW_CASES = [
    (Case(4, 2, 64, 16, (1, 15, 16, 17, 300)), 1),
    (Case(4, 2, 64, 16, (1, 15, 16, 17, 300)), 16),
    (Case(4, 2, 64, 16, (1, 15, 16, 17, 300)), 17),
    (Case(4, 2, 64, 16, (1, 15, 16, 17, 300)), 1000),
    (Case(8, 1, 128, 8, (9, 257, 333), partition_size=64), 50),
    (Case(2, 1, 256, 16, (33, 300), partition_size=64), 20),
    (Case(4, 1, 256, 16, (100, 40)), 32),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
@pytest.mark.parametrize(
    ("case", "window"), WINDOW_CASES, ids=[f"{c.id}-w{w}" for c, w in WINDOW_CASES]
)
def test_a_window_matches_the_reference(case, window, kv_cache_dtype, backend) -> None:
    if kv_cache_dtype == "auto":
        inputs = make_inputs(case)
    else:
        inputs = make_quantized_inputs(case, kv_cache_dtype)
    scale = case.head_dim**-0.5
    expected = paged_attention_reference(
        *inputs, scale, kv_cache_dtype=kv_cache_dtype, window=window
    )
    if backend == "triton":
        actual = triton_module.paged_attention_triton(
            *inputs, scale, case.partition_size, kv_cache_dtype, window
        )
    else:
        actual = paged_attention(
            *inputs, scale, backend="torch", kv_cache_dtype=kv_cache_dtype, window=window
        )
    assert_close(actual, expected, f"{case.id}-w{window}", atol=1e-5, rtol=1e-4)
    if window < max(case.context_lens):  # the window is applied, not ignored
        unwindowed = paged_attention_reference(*inputs, scale, kv_cache_dtype=kv_cache_dtype)
        assert not torch.allclose(actual, unwindowed, atol=1e-3)


def test_the_reference_window_is_attention_over_the_last_positions() -> None:
    # The reference's window, against attention written out for one sequence whose
    # last `window` tokens are laid out as a context of their own.
    case = Case(2, 1, 32, 8, (29,))
    query, key_cache, value_cache, block_tables, context_lens = make_inputs(case)
    window = 11
    windowed = paged_attention_reference(
        query, key_cache, value_cache, block_tables, context_lens, 0.3, window=window
    )
    rows = [(int(block_tables[0, p // 8]), p % 8) for p in range(29 - window, 29)]
    k = torch.stack([key_cache[b, t, 0] for b, t in rows])
    v = torch.stack([value_cache[b, t, 0] for b, t in rows])
    for head in range(2):
        probs = torch.softmax(k @ query[0, head] * 0.3, dim=0)
        torch.testing.assert_close(windowed[0, head], probs @ v)


def test_a_window_below_one_is_refused() -> None:
    inputs = make_inputs(CASES[1])
    with pytest.raises(ValueError, match="window must be None or >= 1 positions, got 0"):
        paged_attention(*inputs, 0.1, window=0)
