"""The block codec: a fixed header, then the raw payload bytes.

Header (little-endian, 88 bytes so the payload that follows stays 8-byte aligned):

    magic "KVRB" | version u16 | dtype u8 | kv_format u8 | ndim u8 (=5) |
    scale_bytes u8 | 2 zero bytes | shape 5×u32 | fingerprint 16B | key 16B |
    payload_len u64 | 4 zero bytes | check 12B

`dtype` is the model's dtype, `kv_format` the KV cache dtype's code
(`kvstore.kv_format`: 0 for rows in `dtype`, else 8-bit rows) and `scale_bytes` the
bytes each row's scale takes after its values (2 for 8-bit formats, 0 otherwise);
the shape's last dimension is the row width, `head_dim + scale_bytes`. Every one is
checked against the reader's spec, so a block is never read in another format.

The check depends on the cluster's KV secret:

- without one (version 3): xxh3_64 of the payload, then 4 zero bytes (checked). It catches
  corruption, not forgery: anyone who can write to the store can plant K/V.
- with one (version 4): HMAC-SHA256 keyed by the secret over the first 76 header
  bytes and the payload, truncated to 96 bits (as HMAC-SHA-1-96 and others are).
  A block written by anyone without the secret fails it and is a counted miss,
  never fed to the model. SHA-256 runs at ~2 GB/s here (SHA extensions), keyed
  BLAKE2b at ~1 GB/s, so HMAC-SHA256 it is; xxh3 runs at ~60 GB/s.

A reader only accepts its own version: an authenticated cluster refuses
unauthenticated blocks, and the other way round. Versions 1 and 2 (an 80-byte
header without the format fields) are no longer read.

`key` is the block hash, or for a tail a digest of the request id and the hash
of the prompt it ends (`kvstore.hashing.hash_prompt`), so a payload can never be
read under another key, nor a tail for another prompt. The reader checks every field against what
it expects; any mismatch raises `BlockCodecError`, which stores turn into a miss.
The checksum covers the payload; the header needs none because every header
field is compared with an expected value (and, with a secret, is covered by the
MAC). xxh3_64 runs at tens of GB/s (zlib's crc32 at ~4 GB/s here), so without a
secret verification never bounds store throughput.

Nothing is pickled: a payload is the tensor's bytes, nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import numpy as np
import torch
import xxhash

from kvstore.hashing import BLOCK_HASH_LEN, BlockHash
from kvstore.kv_format import KV_FORMAT_CODES, SCALE_BYTES
from kvstore.spec import DTYPE_CODES, BlockSpec

MAGIC = b"KVRB"
CODEC_VERSION = 3
"""Blocks checked by xxh3 (no secret)."""
MAC_CODEC_VERSION = 4
"""Blocks authenticated by HMAC-SHA256 with the cluster's KV secret."""
MIN_SECRET_BYTES = 16
_MAC_BYTES = 12

_HEADER = struct.Struct("<4sHBBBB2s5I16s16sQ4sQ4s")
HEADER_LEN = _HEADER.size
assert HEADER_LEN == 88, HEADER_LEN
_MAC_START = HEADER_LEN - _MAC_BYTES  # the bytes the MAC covers come first
_RESERVED_SHORT, _RESERVED_LONG = bytes(2), bytes(4)
_PADDING = bytes(4)

Buffer = bytes | bytearray | memoryview

# Integer types of each element size: a payload is copied into a tensor as
# integers of its element's width, so that numpy (which has no bfloat16) can
# write any strided view of the tensor in one pass, bit for bit.
_INT_OF_SIZE = {1: (torch.uint8, np.uint8), 2: (torch.int16, np.int16), 4: (torch.int32, np.int32)}
assert all(dtype.itemsize in _INT_OF_SIZE for dtype in DTYPE_CODES), "a payload dtype has no int"


class BlockCodecError(ValueError):
    """A stored payload is not the block the reader asked for (corrupt, truncated,
    foreign). Callers treat it as a miss; it must never reach the model."""


def tail_key(request_id: str, prompt_hash: BlockHash) -> BlockHash:
    """The key a request's tail is encoded under: a digest of the request id and its
    prompt's hash, so reading the tail for another prompt fails the check."""
    digest = hashlib.blake2b(request_id.encode("utf-8"), digest_size=BLOCK_HASH_LEN)
    digest.update(b"kvrelay-tail")
    digest.update(prompt_hash)
    return digest.digest()


class BlockCodec:
    """Encodes and decodes the payloads of one `BlockSpec`. Stateless, thread-safe."""

    def __init__(self, spec: BlockSpec, secret: bytes | None = None) -> None:
        if secret is not None and len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the KV secret must be at least {MIN_SECRET_BYTES} bytes")
        self.spec = spec
        self._secret = secret
        self._version = MAC_CODEC_VERSION if secret is not None else CODEC_VERSION
        self._fingerprint = spec.fingerprint
        self._dtype_code = DTYPE_CODES[spec.dtype]
        self._kv_format_code = KV_FORMAT_CODES[spec.kv_cache_dtype]
        self._scale_bytes = SCALE_BYTES if spec.kv_format.is_quantized else 0
        self._bytes_per_token = spec.bytes_per_token

    def encode(self, key: BlockHash, kv: torch.Tensor) -> tuple[bytes, memoryview]:
        """Header and a view of `kv`'s bytes, without copying the payload.

        The view aliases `kv` (made contiguous on the CPU first if it is not):
        the caller writes both pieces out before it mutates `kv`. A full block
        has `spec.shape`; a tail has fewer tokens on dim 2.
        """
        self.spec.check_payload(kv, is_tail=kv.dim() == 5 and kv.shape[2] != self.spec.block_size)
        cpu_kv = kv.detach().to("cpu").contiguous()
        payload = memoryview(cpu_kv.view(torch.uint8).reshape(-1).numpy())
        header = _HEADER.pack(
            MAGIC,
            self._version,
            self._dtype_code,
            self._kv_format_code,
            cpu_kv.dim(),
            self._scale_bytes,
            _RESERVED_SHORT,
            *cpu_kv.shape,
            self._fingerprint,
            key,
            payload.nbytes,
            _RESERVED_LONG,
            0 if self._secret is not None else xxhash.xxh3_64_intdigest(payload),
            _PADDING,
        )
        if self._secret is not None:
            header = header[:_MAC_START] + self._mac(header, payload)
        return header, payload

    @property
    def is_authenticated(self) -> bool:
        """Whether blocks carry a MAC (the cluster has a KV secret)."""
        return self._secret is not None

    def _mac(self, header: Buffer, payload: Buffer) -> bytes:
        mac = hmac.new(self._secret, memoryview(header)[:_MAC_START], hashlib.sha256)
        mac.update(payload)
        return mac.digest()[:_MAC_BYTES]

    def encode_bytes(self, key: BlockHash, kv: torch.Tensor) -> bytes:
        """Header and payload as one `bytes` (one copy), for writers that need one buffer."""
        header, payload = self.encode(key, kv)
        return header + payload

    def decode(
        self,
        data: Buffer,
        key: BlockHash,
        *,
        is_tail: bool = False,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Checks `data` (header then payload) and copies its payload into a tensor."""
        view = memoryview(data)
        if view.nbytes < HEADER_LEN:
            raise BlockCodecError(f"truncated header: {view.nbytes} < {HEADER_LEN} bytes")
        return self.decode_parts(
            view[:HEADER_LEN], view[HEADER_LEN:], key, is_tail=is_tail, out=out
        )

    def decode_parts(
        self,
        header: Buffer,
        payload: Buffer | np.ndarray,
        key: BlockHash,
        *,
        is_tail: bool = False,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Checks a header and its payload, then copies the payload out.

        Writes into `out` when given (it must have the payload's shape and the
        spec's payload dtype; it may live on any device) and returns it; otherwise returns
        a new CPU tensor. Raises `BlockCodecError` on any mismatch, before
        anything is written to `out`.
        """
        shape = self.verify(header, payload, key, is_tail=is_tail)
        payload_bytes = np.frombuffer(payload, dtype=np.uint8)
        if out is None:
            out = torch.empty(shape, dtype=self.spec.payload_dtype)
        elif tuple(out.shape) != shape or out.dtype != self.spec.payload_dtype:
            raise ValueError(f"out is {tuple(out.shape)} {out.dtype}, payload is {shape}")
        if out.device.type == "cpu":
            # One copy, also into a strided view (a block's slice of a prompt's K/V).
            torch_int, numpy_int = _INT_OF_SIZE[out.element_size()]
            np.copyto(out.view(torch_int).numpy(), payload_bytes.view(numpy_int).reshape(shape))
        else:
            staged = (
                torch.from_numpy(payload_bytes.copy()).view(self.spec.payload_dtype).view(shape)
            )
            out.copy_(staged)
        return out

    def verify(
        self, header: Buffer, payload: Buffer | np.ndarray, key: BlockHash, *, is_tail: bool = False
    ) -> tuple[int, ...]:
        """Checks a header and its payload in place (no copy); returns the payload shape.

        Readers that received the payload straight into its final memory (a new
        tensor) call this instead of `decode_parts`. Raises `BlockCodecError` on
        any mismatch.
        """
        shape, checksum = self._check_header(header, key, is_tail)
        try:
            payload_bytes = np.frombuffer(payload, dtype=np.uint8)
        except (TypeError, ValueError) as exc:
            raise BlockCodecError(f"payload is not a byte buffer: {exc}") from exc
        expected_len = shape[2] * self._bytes_per_token
        if payload_bytes.nbytes != expected_len:
            raise BlockCodecError(
                f"payload is {payload_bytes.nbytes} bytes, expected {expected_len}"
            )
        if self._secret is not None:
            stored_mac = bytes(memoryview(header)[_MAC_START:])
            if not hmac.compare_digest(stored_mac, self._mac(header, payload_bytes)):
                raise BlockCodecError("block MAC mismatch: not written with this cluster's secret")
        elif xxhash.xxh3_64_intdigest(payload_bytes) != checksum:
            raise BlockCodecError("payload checksum mismatch")
        return shape

    def _check_header(
        self, header: Buffer, key: BlockHash, is_tail: bool
    ) -> tuple[tuple[int, ...], int]:
        """The payload shape and checksum `header` announces, once every field checks out."""
        try:
            header_len = memoryview(header).nbytes
        except TypeError as exc:
            raise BlockCodecError(f"header is not a byte buffer: {exc}") from exc
        if header_len != HEADER_LEN:
            raise BlockCodecError(f"header is {header_len} bytes, not {HEADER_LEN}")
        (magic, version, dtype_code, kv_format_code, ndim, scale_bytes, reserved_short,
         *shape_list, fingerprint, stored_key, payload_len, reserved_long, checksum,
         padding) = _HEADER.unpack(header)  # fmt: skip
        shape = tuple(shape_list)
        if magic != MAGIC:
            raise BlockCodecError(f"bad magic {magic!r}")
        if version != self._version:
            if {version, self._version} == {CODEC_VERSION, MAC_CODEC_VERSION}:
                raise BlockCodecError(
                    "block written without the cluster's KV secret"
                    if self._secret is not None
                    else "block is authenticated with a KV secret this reader does not have"
                )
            raise BlockCodecError(f"codec version {version}, reader speaks {self._version}")
        if dtype_code != self._dtype_code:
            raise BlockCodecError(f"dtype code {dtype_code}, expected {self._dtype_code}")
        if kv_format_code != self._kv_format_code or scale_bytes != self._scale_bytes:
            raise BlockCodecError(
                f"KV format code {kv_format_code} with {scale_bytes} scale bytes, expected "
                f"{self._kv_format_code} ({self.spec.kv_cache_dtype}) with {self._scale_bytes}"
            )
        if reserved_short != _RESERVED_SHORT or reserved_long != _RESERVED_LONG:
            raise BlockCodecError("reserved header bytes are not zero")
        if fingerprint != self._fingerprint:
            raise BlockCodecError("block belongs to another model fingerprint")
        if stored_key != key:
            raise BlockCodecError("block was stored under another hash")
        num_tokens = shape[2]
        is_valid_len = (
            0 < num_tokens <= self.spec.block_size
            if is_tail
            else num_tokens == self.spec.block_size
        )
        if ndim != 5 or not is_valid_len or shape != self.spec.tail_shape(num_tokens):
            raise BlockCodecError(f"shape {shape} does not match {self.spec}")
        if payload_len != num_tokens * self._bytes_per_token:
            raise BlockCodecError(f"header says {payload_len} payload bytes, its shape {shape}")
        if self._secret is None and padding != _PADDING:
            raise BlockCodecError("header padding is not zero")
        return shape, checksum
