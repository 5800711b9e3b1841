"""The block codec: round trips, and one test per kind of bad payload."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
import torch
from tiny_blocks import TINY_SPEC, make_block

from kvstore.codec import HEADER_LEN, BlockCodec, BlockCodecError, tail_key
from kvstore.hashing import hash_token_blocks
from kvstore.spec import BlockSpec

HASH_A, HASH_B = hash_token_blocks(list(range(8)), 4, TINY_SPEC.fingerprint)
CODEC = BlockCodec(TINY_SPEC)


def encoded(seed: int = 1) -> bytes:
    return CODEC.encode_bytes(HASH_A, make_block(seed))


def test_round_trip_is_exact() -> None:
    block = make_block(7)
    data = CODEC.encode_bytes(HASH_A, block)
    assert len(data) == HEADER_LEN + TINY_SPEC.nbytes == 88 + 256
    assert data[:4] == b"KVRB"
    assert torch.equal(CODEC.decode(data, HASH_A), block)


def test_encode_does_not_copy_a_contiguous_block() -> None:
    block = make_block(1)
    _, payload = CODEC.encode(HASH_A, block)
    block[0, 0, 0, 0, 0] = -5.0  # the payload is a view of the tensor's memory
    assert struct.unpack_from("<f", payload, 0) == (-5.0,)


def test_decode_into_preallocated_tensor() -> None:
    out = torch.zeros(TINY_SPEC.shape)
    result = CODEC.decode(encoded(3), HASH_A, out=out)
    assert result is out
    assert torch.equal(out, make_block(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_into_a_blocks_slice_of_a_prompt(dtype: torch.dtype) -> None:
    """The prefill worker loads cached blocks straight into its `[L, 2, T, H, D]`
    prompt tensor: each block's destination is a strided view, not a tensor."""
    spec = BlockSpec(
        "test:views", num_layers=2, num_kv_heads=1, head_dim=4, block_size=4, dtype=dtype
    )
    codec = BlockCodec(spec)
    prompt = torch.full((2, 2, 11, 1, 4), -1.0, dtype=dtype)  # an 11-token prompt
    view = prompt[:, :, 4:8]
    assert not view.is_contiguous()
    block = make_block(6, spec)
    assert codec.decode(codec.encode_bytes(HASH_A, block), HASH_A, out=view) is view
    assert torch.equal(prompt[:, :, 4:8], block)
    assert bool((prompt[:, :, :4] == -1).all()) and bool((prompt[:, :, 8:] == -1).all())


def test_non_contiguous_block_is_encoded_by_value() -> None:
    block = make_block(2).transpose(2, 4).contiguous().transpose(2, 4)
    assert not block.is_contiguous()
    assert torch.equal(CODEC.decode(CODEC.encode_bytes(HASH_A, block), HASH_A), make_block(2))


def test_bfloat16_round_trip() -> None:
    spec = BlockSpec(
        "test:bf16", num_layers=2, num_kv_heads=1, head_dim=4, block_size=4, dtype=torch.bfloat16
    )
    codec = BlockCodec(spec)
    block = make_block(4, spec)
    assert torch.equal(codec.decode(codec.encode_bytes(HASH_A, block), HASH_A), block)


def test_tail_round_trip() -> None:
    tail = make_block(5, num_tokens=3)
    key = tail_key("req-1", HASH_B)  # bound to the prompt HASH_B names
    data = CODEC.encode_bytes(key, tail)
    assert torch.equal(CODEC.decode(data, key, is_tail=True), tail)
    with pytest.raises(BlockCodecError, match="shape"):
        CODEC.decode(data, key)  # a tail is not a full block
    with pytest.raises(BlockCodecError):
        CODEC.decode(data, tail_key("req-1", HASH_A), is_tail=True)  # another prompt's


def test_encode_rejects_wrong_shape_or_dtype() -> None:
    with pytest.raises(ValueError, match="shape"):
        CODEC.encode(HASH_A, torch.zeros(2, 2, 4, 1, 5))
    with pytest.raises(ValueError, match="dtype"):
        CODEC.encode(HASH_A, torch.zeros(TINY_SPEC.shape, dtype=torch.float16))


def _patch(offset: int, value: bytes) -> Callable[[bytes], bytes]:
    return lambda data: data[:offset] + value + data[offset + len(value) :]


CORRUPTIONS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "empty": (lambda data: b"", "truncated header"),
    "truncated_header": (lambda data: data[:40], "truncated header"),
    "truncated_payload": (lambda data: data[:-1], "payload is 255 bytes"),
    "extra_bytes": (lambda data: data + b"\0", "payload is 257 bytes"),
    "bad_magic": (_patch(0, b"XXXX"), "magic"),
    "bad_version": (_patch(4, struct.pack("<H", 9)), "version"),
    "bad_dtype": (_patch(6, bytes([2])), "dtype"),
    "other_kv_format": (_patch(7, bytes([1])), "KV format code 1"),
    "bad_ndim": (_patch(8, bytes([4])), "shape"),
    "scale_bytes_on_full_precision_rows": (_patch(9, bytes([2])), "with 2 scale bytes"),
    "nonzero_reserved_short": (_patch(10, b"\x01"), "reserved"),
    "bad_shape": (_patch(12 + 4 * 3, struct.pack("<I", 2)), "shape"),
    "other_fingerprint": (_patch(32, bytes(16)), "fingerprint"),
    "other_hash": (_patch(48, HASH_B), "another hash"),
    "nonzero_reserved_long": (_patch(72, b"\x01"), "reserved"),
    "bad_checksum_field": (_patch(76, bytes(8)), "checksum"),
    # Found by tests/fuzz/fuzz_block_codec.py: fields no check read.
    "bad_payload_len": (_patch(64, struct.pack("<Q", 255)), "header says 255 payload bytes"),
    "nonzero_padding": (_patch(84, b"\x01"), "padding"),
    "flipped_payload_byte": (lambda data: data[:-1] + bytes([data[-1] ^ 1]), "checksum"),
    "garbage": (lambda data: bytes(range(256)) * 2, "magic"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_every_corruption_raises_block_codec_error(corruption: str) -> None:
    corrupt, message = CORRUPTIONS[corruption]
    out = torch.full(TINY_SPEC.shape, 9.0)
    with pytest.raises(BlockCodecError, match=message):
        CODEC.decode(corrupt(encoded()), HASH_A, out=out)
    assert torch.equal(out, torch.full(TINY_SPEC.shape, 9.0)), "out written before the check"


def test_block_of_another_model_is_rejected() -> None:
    other = BlockSpec("test:other", num_layers=2, num_kv_heads=1, head_dim=4, block_size=4)
    data = BlockCodec(other).encode_bytes(HASH_A, make_block(1))
    with pytest.raises(BlockCodecError, match="fingerprint"):
        CODEC.decode(data, HASH_A)


def test_non_buffer_parts_are_codec_errors() -> None:
    header, payload = CODEC.encode(HASH_A, make_block(1))
    with pytest.raises(BlockCodecError, match="header"):
        CODEC.decode_parts("not bytes", payload, HASH_A)  # type: ignore[arg-type]
    with pytest.raises(BlockCodecError, match="payload"):
        CODEC.decode_parts(header, 12345, HASH_A)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "corruption", [name for name in CORRUPTIONS if name not in ("empty", "truncated_header")]
)
def test_verify_in_place_rejects_what_decode_rejects(corruption: str) -> None:
    corrupt, message = CORRUPTIONS[corruption]
    data = corrupt(encoded())
    with pytest.raises(BlockCodecError, match=message):
        CODEC.verify(data[:HEADER_LEN], data[HEADER_LEN:], HASH_A)


def test_verify_returns_the_payload_shape() -> None:
    header, payload = CODEC.encode(HASH_A, make_block(4))
    assert CODEC.verify(header, payload, HASH_A) == TINY_SPEC.shape
    key = tail_key("req-v", HASH_B)
    header, payload = CODEC.encode(key, make_block(4, num_tokens=3))
    assert CODEC.verify(header, payload, key, is_tail=True) == (2, 2, 3, 1, 4)
    with pytest.raises(BlockCodecError, match="shape"):
        CODEC.verify(header, payload, key)  # a tail is not a full block


# With the cluster's KV secret, the check is a MAC: forging needs the secret.

SECRET = b"s" * 32
MAC_CODEC = BlockCodec(TINY_SPEC, SECRET)


def test_an_authenticated_block_round_trips_and_its_tail_too() -> None:
    block = make_block(4)
    data = MAC_CODEC.encode_bytes(HASH_A, block)
    assert len(data) == HEADER_LEN + TINY_SPEC.nbytes
    assert torch.equal(MAC_CODEC.decode(data, HASH_A), block)
    tail = make_block(5)[:, :, :2].contiguous()
    key = tail_key("r.p1", HASH_B)
    assert torch.equal(MAC_CODEC.decode(MAC_CODEC.encode_bytes(key, tail), key, is_tail=True), tail)


def test_a_block_written_without_the_secret_is_refused_even_with_a_valid_checksum() -> None:
    with pytest.raises(BlockCodecError, match="written without the cluster's KV secret"):
        MAC_CODEC.decode(encoded(1), HASH_A)


def test_a_block_forged_with_another_secret_is_refused() -> None:
    forged = BlockCodec(TINY_SPEC, b"x" * 32).encode_bytes(HASH_A, make_block(1))
    with pytest.raises(BlockCodecError, match="MAC mismatch"):
        MAC_CODEC.decode(forged, HASH_A)


@pytest.mark.parametrize(
    "offset", [7, 13, 50, HEADER_LEN + 3], ids=["kv_format", "shape", "key", "payload"]
)
def test_the_mac_covers_header_and_payload(offset: int) -> None:
    data = bytearray(MAC_CODEC.encode_bytes(HASH_A, make_block(2)))
    data[offset] ^= 0x01
    with pytest.raises(BlockCodecError):
        MAC_CODEC.decode(bytes(data), HASH_A)


def test_a_reader_without_the_secret_refuses_authenticated_blocks() -> None:
    data = MAC_CODEC.encode_bytes(HASH_A, make_block(1))
    with pytest.raises(BlockCodecError, match="KV secret this reader does not have"):
        CODEC.decode(data, HASH_A)


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        BlockCodec(TINY_SPEC, b"short")
