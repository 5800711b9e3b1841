"""8-bit KV rows: the quantizer against plain definitions, and the spec and codec that
carry them."""

from __future__ import annotations

import pytest
import torch

from kvstore.codec import BlockCodec, BlockCodecError
from kvstore.kv_format import KV_CACHE_DTYPES, row_width
from kvstore.kv_quant import KVCacheFormat
from kvstore.spec import BlockSpec
from model import runtime

QUANTIZED = ["int8", "fp8_e4m3"]


def rows(seed: int = 0, shape: tuple[int, ...] = (5, 3, 64)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator)
    x[0, 0] *= 50  # an outlier row
    x[1, 1] = 0.0  # an all-zero row
    return x


def test_the_names_are_the_ones_the_runtime_accepts() -> None:
    assert KV_CACHE_DTYPES == runtime._KV_CACHE_DTYPES == ("auto", "int8", "fp8_e4m3")


def test_int8_is_absmax_over_127_per_row_rounded_to_nearest() -> None:
    x = rows()
    stored = KVCacheFormat("int8", torch.float32).quantize(x)
    assert stored.dtype == torch.uint8 and stored.shape == (5, 3, 66)
    scale = (x.abs().amax(-1, keepdim=True) / 127).clamp_min(2**-24).half()
    assert torch.equal(stored[..., 64:].view(torch.float16), scale)
    values = torch.round(x / scale.float()).clamp(-127, 127).to(torch.int8)
    assert torch.equal(stored[..., :64].view(torch.int8), values)


def test_fp8_is_absmax_over_448_per_row_cast_to_e4m3() -> None:
    x = rows(1)
    stored = KVCacheFormat("fp8_e4m3", torch.float32).quantize(x)
    scale = (x.abs().amax(-1, keepdim=True) / 448).clamp_min(2**-24).half()
    assert torch.equal(stored[..., 64:].view(torch.float16), scale)
    values = (x / scale.float()).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(stored[..., :64].view(torch.float8_e4m3fn).float(), values.float())


@pytest.mark.parametrize(("name", "max_relative_step"), [("int8", 0.5 / 127), ("fp8_e4m3", 1 / 16)])
def test_dequantized_rows_are_within_half_a_step(name: str, max_relative_step: float) -> None:
    x = rows(2)
    kv_format = KVCacheFormat(name, torch.float32)
    error = (kv_format.round_trip(x) - x).abs()
    amax = x.abs().amax(-1, keepdim=True)
    # int8: half a step of amax/127; e4m3: half a unit in the last of 3 mantissa bits.
    bound = (
        amax * max_relative_step
        if name == "int8"
        else x.abs() * max_relative_step + amax / 448 * 2**-9
    )
    assert (error <= bound * 1.01 + 1e-12).all()
    assert kv_format.round_trip(x)[1, 1].abs().max() == 0, "a zero row stays zero"


@pytest.mark.parametrize("name", QUANTIZED)
def test_rows_dequantize_from_any_strided_view(name: str) -> None:
    kv_format = KVCacheFormat(name, torch.float32)
    stored = kv_format.quantize(rows(3))
    pool = torch.zeros(2, 5, 3, 66, dtype=torch.uint8)
    pool[1] = stored
    assert torch.equal(
        kv_format.dequantize(pool[1].transpose(0, 1)), kv_format.dequantize(stored).transpose(0, 1)
    )


def test_auto_only_casts() -> None:
    x = rows(4)
    kv_format = KVCacheFormat("auto", torch.bfloat16)
    assert kv_format.quantize(x).dtype == torch.bfloat16
    assert torch.equal(kv_format.dequantize(kv_format.quantize(x)), x.to(torch.bfloat16))
    assert kv_format.row_width(64) == 64 and kv_format.storage_dtype == torch.bfloat16


def test_an_unknown_name_says_which_there_are() -> None:
    with pytest.raises(ValueError, match="not one of auto, int8, fp8_e4m3"):
        KVCacheFormat("int4", torch.float32)
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp8' is not one of"):
        runtime.ModelRuntime(kv_cache_dtype="fp8")


@pytest.mark.parametrize("name", QUANTIZED)
def test_a_quantized_spec_holds_rows_of_head_dim_plus_two_bytes(name: str) -> None:
    spec = BlockSpec("m", num_layers=30, num_kv_heads=3, head_dim=64, kv_cache_dtype=name)
    full = BlockSpec("m", num_layers=30, num_kv_heads=3, head_dim=64)
    assert spec.shape == (30, 2, 16, 3, 66) == (30, 2, 16, 3, row_width(name, 64))
    assert spec.payload_dtype == torch.uint8
    assert spec.nbytes == 30 * 2 * 16 * 3 * 66
    assert spec.nbytes / full.nbytes == pytest.approx(66 / 256)  # 0.258x of float32
    assert spec.fingerprint != full.fingerprint


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("secret", [None, b"s" * 32], ids=["xxh3", "mac"])
def test_the_codec_carries_quantized_blocks_and_tails_exactly(name: str, secret) -> None:
    spec = BlockSpec(
        "m", num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, kv_cache_dtype=name
    )
    codec = BlockCodec(spec, secret)
    kv_format = KVCacheFormat(name, torch.float32)
    block = kv_format.quantize(torch.randn(2, 2, 4, 2, 8))
    tail = block[:, :, :3].contiguous()
    assert torch.equal(codec.decode(codec.encode_bytes(b"k" * 16, block), b"k" * 16), block)
    decoded_tail = codec.decode(codec.encode_bytes(b"t" * 16, tail), b"t" * 16, is_tail=True)
    assert torch.equal(decoded_tail, tail)


def test_a_block_of_another_kv_format_is_refused() -> None:
    shape = {"model_id": "m", "num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "block_size": 4}
    int8, fp8 = (
        BlockSpec(**shape, kv_cache_dtype="int8"),
        BlockSpec(**shape, kv_cache_dtype="fp8_e4m3"),
    )
    block = KVCacheFormat("int8", torch.float32).quantize(torch.randn(2, 2, 4, 2, 8))
    data = BlockCodec(int8).encode_bytes(b"k" * 16, block)
    with pytest.raises(BlockCodecError, match="KV format code 1 with 2 scale bytes, expected 2"):
        BlockCodec(fp8).decode(data, b"k" * 16)
    full_precision = BlockSpec(**shape)
    with pytest.raises(BlockCodecError, match="KV format code 1"):
        BlockCodec(full_precision).decode(data, b"k" * 16)
