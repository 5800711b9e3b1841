"""Fuzzes `kvstore.codec.BlockCodec.decode`: whatever bytes a store hands back, the
reader either raises `BlockCodecError` (a counted miss) or returns exactly the
block that was written: re-encoding what it decoded gives back the same bytes,
and the block has the shape the reader asked for.

The input's first byte chooses the reader: with or without a KV secret, for a
full block or a tail, for rows in float32 or int8 rows with their scales, and whether the harness first rewrites the check field of
a header without a secret so that it matches the payload. Without that rewrite
the fuzzer would almost never get past the checksum to the header checks
behind it. A MAC cannot be fixed up without the secret, which is the point.
"""

from __future__ import annotations

import struct

import atheris
import harness  # sets sys.path: before any of the packages
import torch
import xxhash

with atheris.instrument_imports(include=["kvstore"]):
    from kvstore.codec import HEADER_LEN, BlockCodec, BlockCodecError
    from kvstore.spec import BlockSpec

SPEC = BlockSpec("fuzz:codec", num_layers=1, num_kv_heads=1, head_dim=2, block_size=4)
INT8_SPEC = BlockSpec(
    "fuzz:codec", num_layers=1, num_kv_heads=1, head_dim=2, block_size=4, kv_cache_dtype="int8"
)
KEY = bytes(range(16))
SECRET = b"fuzz-secret-0123456789"
# By mode bits 0 (a secret) and 3 (8-bit rows with their scales).
CODECS = (
    BlockCodec(SPEC),
    BlockCodec(SPEC, SECRET),
    BlockCodec(INT8_SPEC),
    BlockCodec(INT8_SPEC, SECRET),
)
_CHECK = struct.Struct("<Q")
_CHECK_AT = HEADER_LEN - 12


def codec_of(mode: int) -> BlockCodec:
    return CODECS[(mode & 1) | (mode >> 2 & 2)]


def seeds() -> list[bytes]:
    blocks = {
        SPEC: torch.arange(SPEC.nbytes // 4, dtype=torch.float32).reshape(SPEC.shape),
        INT8_SPEC: INT8_SPEC.kv_format.quantize(torch.randn(1, 2, 4, 1, 2)),
    }
    return [
        bytes([mode]) + codec.encode_bytes(KEY, block[:, :, :3].clone() if mode & 2 else block)
        for mode in range(16)
        for codec in (codec_of(mode),)
        for block in (blocks[codec.spec],)
    ]


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0], bytearray(data[1:])
    codec, is_tail, fix_check = codec_of(mode), bool(mode & 2), bool(mode & 4)
    if fix_check and not codec.is_authenticated and len(body) >= HEADER_LEN:
        _CHECK.pack_into(body, _CHECK_AT, xxhash.xxh3_64_intdigest(bytes(body[HEADER_LEN:])))
    try:
        block = codec.decode(bytes(body), KEY, is_tail=is_tail)
    except BlockCodecError:
        harness.refused()
        return
    harness.accepted()
    num_tokens = block.shape[2]
    assert block.dtype == codec.spec.payload_dtype
    assert tuple(block.shape) == codec.spec.tail_shape(num_tokens)
    assert is_tail or num_tokens == codec.spec.block_size
    assert codec.encode_bytes(KEY, block) == bytes(body), "a decoded block re-encodes differently"


if __name__ == "__main__":
    harness.run(test_one_input, seeds)
