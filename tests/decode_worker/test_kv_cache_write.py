"""write_kv_cache: the Triton kernel and the torch path against the per-token reference."""

from __future__ import annotations

import pytest
import torch

from decode_worker.kernels.kv_cache_write import write_kv_cache, write_kv_cache_reference

pytest.importorskip("decode_worker.kernels.kv_cache_write_triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (num_kv_heads, head_dim, block_size, slot dtype): every head dim, block size and slot
# dtype appears, with MQA (1 head) and a non-power-of-two head count (3).
CASES = [
    (1, 32, 8, torch.int64),
    (3, 64, 16, torch.int32),
    (2, 128, 32, torch.int64),
    (3, 32, 32, torch.int32),
]


def case_id(case) -> str:
    num_kv_heads, head_dim, block_size, dtype = case
    return f"kv{num_kv_heads}-d{head_dim}-bs{block_size}-{str(dtype).split('.')[-1]}"


def make_inputs(num_kv_heads: int, head_dim: int, block_size: int, slot_dtype: torch.dtype):
    """Tokens scattered over shuffled slots in several blocks, two of them skipped (-1)."""
    generator = torch.Generator().manual_seed(0)
    num_blocks, num_tokens = 6, 2 * block_size + 3
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:num_tokens]
    slots[1] = -1
    slots[-1] = -1
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(cache_shape, generator=generator)
    value_cache = torch.randn(cache_shape, generator=generator)
    tensors = (key, value, key_cache, value_cache, slots.to(slot_dtype))
    return tuple(t.to(DEVICE) for t in tensors)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_matches_reference_exactly(case, backend: str) -> None:
    key, value, key_cache, value_cache, slots = make_inputs(*case)
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    write_kv_cache_reference(key, value, expected_k, expected_v, slots)
    write_kv_cache(key, value, key_cache, value_cache, slots, backend=backend)
    # A copy is exact: any difference is a misplaced or missing token.
    assert torch.equal(key_cache, expected_k), f"case {case_id(case)} backend {backend}: K"
    assert torch.equal(value_cache, expected_v), f"case {case_id(case)} backend {backend}: V"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_token_lands_at_block_and_offset(backend: str) -> None:
    key_cache = torch.zeros(4, 8, 2, 32, device=DEVICE)
    value_cache = torch.zeros_like(key_cache)
    key = torch.ones(2, 2, 32, device=DEVICE)
    value = 2 * torch.ones(2, 2, 32, device=DEVICE)
    slots = torch.tensor([3 * 8 + 5, -1], device=DEVICE)  # block 3, offset 5; then skipped
    write_kv_cache(key, value, key_cache, value_cache, slots, backend=backend)
    assert key_cache[3, 5].eq(1).all() and value_cache[3, 5].eq(2).all()
    assert key_cache.sum().item() == 64 and value_cache.sum().item() == 128


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_slots_skipped_leaves_cache_untouched(backend: str) -> None:
    key, value, key_cache, value_cache, slots = make_inputs(*CASES[0])
    before = key_cache.clone()
    write_kv_cache(key, value, key_cache, value_cache, torch.full_like(slots, -1), backend=backend)
    assert torch.equal(key_cache, before)


def test_half_precision_triton() -> None:
    key, value, key_cache, value_cache, slots = (
        t.half() if t.is_floating_point() else t for t in make_inputs(*CASES[1])
    )
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    write_kv_cache_reference(key, value, expected_k, expected_v, slots)
    write_kv_cache(key, value, key_cache, value_cache, slots, backend="triton")
    assert torch.equal(key_cache, expected_k) and torch.equal(value_cache, expected_v)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_arguments_raise_value_error_naming_them(backend: str) -> None:
    key, value, key_cache, value_cache, slots = make_inputs(*CASES[1])
    bad = [
        ("key must be", (key[0], value[0], key_cache, value_cache, slots)),
        ("value shape", (key, value[:, :1], key_cache, value_cache, slots)),
        ("key_cache must be", (key, value, key_cache[..., :16], value_cache, slots)),
        ("slot_mapping must be \\[", (key, value, key_cache, value_cache, slots[:2])),
        ("int32 or int64", (key, value, key_cache, value_cache, slots.float())),
        ("key_cache dtype", (key, value, key_cache.double(), value_cache, slots)),
        (
            "value_cache must be contiguous",
            (
                key,
                value,
                key_cache,
                value_cache.transpose(0, 1).contiguous().transpose(0, 1),
                slots,
            ),
        ),
        ("holds slot 96", (key, value, key_cache, value_cache, torch.full_like(slots, 96))),
    ]
    for message, args in bad:
        with pytest.raises(ValueError, match=message):
            write_kv_cache(*args, backend=backend)


def quantized_caches(num_kv_heads: int, head_dim: int, block_size: int, num_blocks: int = 6):
    shape = (num_blocks, block_size, num_kv_heads, head_dim + 2)
    return torch.zeros(shape, dtype=torch.uint8, device=DEVICE), torch.zeros(
        shape, dtype=torch.uint8, device=DEVICE
    )


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_8bit_writes_match_the_reference_byte_for_byte(
    case, backend: str, kv_cache_dtype: str
) -> None:
    key, value, _, _, slots = make_inputs(*case)
    key = key * 5  # K spans a wider range than V in real models
    num_kv_heads, head_dim, block_size, _ = case
    expected_k, expected_v = quantized_caches(num_kv_heads, head_dim, block_size)
    write_kv_cache_reference(key, value, expected_k, expected_v, slots, kv_cache_dtype)
    key_cache, value_cache = quantized_caches(num_kv_heads, head_dim, block_size)
    write_kv_cache(
        key, value, key_cache, value_cache, slots, backend=backend, kv_cache_dtype=kv_cache_dtype
    )
    # The kernel rounds as torch does (to nearest, ties to even), so bytes are equal.
    assert torch.equal(key_cache, expected_k), f"{case_id(case)} {backend} {kv_cache_dtype}: K"
    assert torch.equal(value_cache, expected_v), f"{case_id(case)} {backend} {kv_cache_dtype}: V"
    assert key_cache.any(), "nothing was written"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_8bit_rows_hold_their_values_then_a_float16_scale(backend: str) -> None:
    # One row by hand: absmax 2.54 -> scale fp16(2.54 / 127) = 0.020004, values round(x /
    # scale): 2.54 -> 127, -1.27 -> -63.49 -> -63, 0.01 -> 0.
    row = torch.zeros(1, 1, 64)
    row[0, 0, :3] = torch.tensor([2.54, -1.27, 0.01])
    key_cache, value_cache = quantized_caches(1, 64, 16, num_blocks=1)
    slots = torch.tensor([5], device=DEVICE)
    write_kv_cache(
        row.to(DEVICE), row.to(DEVICE), key_cache, value_cache, slots,
        backend=backend, kv_cache_dtype="int8",
    )  # fmt: skip
    stored = key_cache[0, 5, 0].cpu()
    scale = torch.tensor(2.54 / 127, dtype=torch.float16)
    assert stored[64:].view(torch.float16).item() == scale.item()
    expected = torch.round(row[0, 0, :3] / scale.float()).to(torch.int8)
    assert stored[:3].view(torch.int8).tolist() == expected.tolist() == [127, -63, 0]
    assert not stored[3:64].any()
    assert not key_cache[0, :5].any() and not key_cache[0, 6:].any(), "wrote outside slot 5"


def test_a_filling_block_keeps_the_bytes_of_the_tokens_already_in_it() -> None:
    # Tokens written one step at a time, the last with a 100x larger range, leave the
    # same bytes as all written at once: no row is ever re-quantized.
    generator = torch.Generator().manual_seed(1)
    key = torch.randn(16, 2, 64, generator=generator)
    key[-1] *= 100
    at_once_k, at_once_v = quantized_caches(2, 64, 16, num_blocks=1)
    write_kv_cache(key, key, at_once_k, at_once_v, torch.arange(16), kv_cache_dtype="int8")
    stepwise_k, stepwise_v = quantized_caches(2, 64, 16, num_blocks=1)
    for token in range(16):
        before = stepwise_k[0, :token].clone()
        write_kv_cache(
            key[token : token + 1], key[token : token + 1], stepwise_k, stepwise_v,
            torch.tensor([token]), kv_cache_dtype="int8",
        )  # fmt: skip
        assert torch.equal(stepwise_k[0, :token], before), f"token {token} changed earlier rows"
    assert torch.equal(stepwise_k, at_once_k)
