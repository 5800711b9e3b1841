"""A bounded walk over a GGUF file's header, before the `gguf` library reads it.

`gguf.GGUFReader` trusts the counts a file states. Reading past the end of the
file gives it empty arrays rather than errors, so an array that claims 2^60
one-byte elements loops for hours, a huge count grows its index lists without
bound, and a tensor whose data lies past the end fails with a reshape error.
A model file is an input like any other (a downloaded checkpoint, a shared
directory), so `check_gguf_layout` walks the same structure first:

    magic "GGUF" | version u32 (2, 3) | tensor_count u64 | kv_count u64 |
    kv_count × (key string | type u32 | value) |
    tensor_count × (name string | n_dims u32 | n_dims × u64 | type u32 | offset u64) |
    padding to `general.alignment` | tensor data

It checks every count against the bytes left, so the walk is linear in the file
size and ends at the first lie, and it checks that every tensor's data lies
inside the file. Then the reader's own loops are bounded too. The walk reads
only the header (a few MB for a 49k-token vocabulary) and costs a few tens of
milliseconds on such a file.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from model.errors import ModelLoadError

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_STRING, _ARRAY = 8, 9
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
"""GGUF value type -> bytes (uint8 ... float64); 8 is a string, 9 an array."""
_UINT32 = 4
_MAX_DIMS = 4
"""GGML_MAX_DIMS."""
_MAX_ARRAY_DEPTH = 2
"""Arrays of arrays exist (nested token lists); deeper nesting is refused."""
_DEFAULT_ALIGNMENT = 32


class _Cursor:
    """Reads little- or big-endian values from a file's bytes, refusing any read past
    their end."""

    def __init__(self, data: mmap.mmap, path: Path) -> None:
        self.data = data
        self.size = len(data)
        self.offset = 0
        self.order = "<"
        self.path = path

    def fail(self, what: str) -> ModelLoadError:
        return ModelLoadError(
            f"GGUF file {self.path.name} is malformed at byte {self.offset}: {what}"
        )

    @property
    def num_left(self) -> int:
        return self.size - self.offset

    def skip(self, num_bytes: int, what: str) -> int:
        """Moves past `num_bytes` bytes; returns where they start."""
        if num_bytes > self.num_left:
            raise self.fail(f"{what} needs {num_bytes} bytes, the file has {self.num_left} left")
        start = self.offset
        self.offset += num_bytes
        return start

    def uint(self, size: int, what: str) -> int:
        code = {4: "I", 8: "Q"}[size]
        return struct.unpack_from(self.order + code, self.data, self.skip(size, what))[0]

    def string(self, what: str) -> bytes:
        num_bytes = self.uint(8, f"{what}'s length")
        start = self.skip(num_bytes, what)
        return self.data[start : start + num_bytes]


def check_gguf_layout(path: Path) -> None:
    """Raises ModelLoadError, saying where and what, unless every count and offset in
    `path`'s header is consistent with its size."""
    try:
        if path.stat().st_size == 0:
            raise ModelLoadError(f"GGUF file {path.name} is empty")
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _walk(_Cursor(data, path))
    except OSError as err:
        raise ModelLoadError(f"cannot read GGUF file {path}: {err}") from None


def _walk(cursor: _Cursor) -> None:
    cursor.skip(4, "the magic")
    if cursor.data[:4] != _MAGIC:
        raise cursor.fail("not a GGUF file (no GGUF magic)")
    version = cursor.uint(4, "the version")
    if version & 0xFFFF == 0:  # written on a machine of the other byte order
        cursor.order = ">"
        version = int.from_bytes(version.to_bytes(4, "little"), "big")
    if version not in _VERSIONS:
        raise cursor.fail(f"GGUF version {version} (kvrelay reads versions 2 and 3)")
    num_tensors = cursor.uint(8, "the tensor count")
    num_fields = cursor.uint(8, "the metadata count")
    alignment = _DEFAULT_ALIGNMENT
    for _ in range(num_fields):
        key = cursor.string("a metadata key")
        value_type = cursor.uint(4, "a metadata type")
        if key == b"general.alignment" and value_type == _UINT32:
            alignment = cursor.uint(4, "general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                raise cursor.fail(f"general.alignment is {alignment}, not a power of two")
        else:
            _skip_value(cursor, value_type, depth=0)
    tensors = []
    for _ in range(num_tensors):
        name = cursor.string("a tensor name")
        num_dims = cursor.uint(4, "a tensor's dimension count")
        if not 1 <= num_dims <= _MAX_DIMS:
            raise cursor.fail(f"tensor {name!r} has {num_dims} dimensions (1 to {_MAX_DIMS})")
        dims = [cursor.uint(8, "a tensor dimension") for _ in range(num_dims)]
        tensor_type = cursor.uint(4, "a tensor type")
        tensors.append((name, dims, tensor_type, cursor.uint(8, "a tensor offset")))
    data_start = -(-cursor.offset // alignment) * alignment
    for name, dims, tensor_type, offset in tensors:
        _check_tensor_data(cursor, name, dims, tensor_type, data_start + offset)


def _skip_value(cursor: _Cursor, value_type: int, depth: int) -> None:
    if value_type in _SCALAR_SIZES:
        cursor.skip(_SCALAR_SIZES[value_type], "a metadata value")
    elif value_type == _STRING:
        cursor.string("a metadata string")
    elif value_type == _ARRAY and depth < _MAX_ARRAY_DEPTH:
        item_type = cursor.uint(4, "an array's item type")
        num_items = cursor.uint(8, "an array's length")
        if item_type in _SCALAR_SIZES:
            cursor.skip(num_items * _SCALAR_SIZES[item_type], f"an array of {num_items} values")
            return
        min_item_bytes = 8 if item_type == _STRING else 12  # a length, or a type and a count
        if num_items * min_item_bytes > cursor.num_left:
            raise cursor.fail(
                f"an array of {num_items} items cannot fit in {cursor.num_left} bytes"
            )
        for _ in range(num_items):
            _skip_value(cursor, item_type, depth + 1)
    else:
        raise cursor.fail(f"unknown metadata value type {value_type}")


def _check_tensor_data(
    cursor: _Cursor, name: bytes, dims: list[int], tensor_type: int, start: int
) -> None:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(tensor_type)]
    except (ValueError, KeyError):
        raise cursor.fail(f"tensor {name!r} has unknown type {tensor_type}") from None
    num_elements = 1
    for dim in dims:
        num_elements *= dim
    if dims[0] % block_size:
        raise cursor.fail(f"tensor {name!r}'s rows of {dims[0]} are not whole {block_size}-blocks")
    end = start + num_elements // block_size * type_size
    if end > cursor.size:
        raise cursor.fail(
            f"tensor {name!r}'s data ends at byte {end}, past the end of the file "
            f"({cursor.size} bytes)"
        )
