"""A GGUF file is untrusted input: every count and offset its header states is
checked against its size before the `gguf` library reads it
(`model.gguf_layout`), and whatever kvrelay then takes from it is checked too.
Each case here is a file the fuzzer (`tests/fuzz/fuzz_gguf.py`) found to hang the
reader, crash the load with an error other than ModelLoadError, or build a model
from a file that lacks part of it."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from model import gguf as model_gguf
from model.errors import ModelLoadError
from model.gguf_layout import check_gguf_layout
from model.loader import load_model
from tests.model.gguf_files import write_tiny_llama_gguf

_STRING, _ARRAY, _UINT8, _UINT32 = 8, 9, 0, 4


def gguf_string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def gguf_header(fields: list[bytes], num_tensors: int = 0, tensors: bytes = b"") -> bytes:
    """A version-3 header with these raw key/value fields and tensor infos."""
    return b"GGUF" + struct.pack("<IQQ", 3, num_tensors, len(fields)) + b"".join(fields) + tensors


def field(key: bytes, value_type: int, value: bytes) -> bytes:
    return gguf_string(key) + struct.pack("<I", value_type) + value


def write(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    model_gguf._reader.cache_clear()
    return str(path)


def test_the_tiny_llama_passes_the_walk_and_loads(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path)
    check_gguf_layout(path)
    loaded = load_model(str(path))
    assert loaded.config.num_layers == 1 and loaded.config.vocab_size == 8


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # The gguf reader loops once per claimed element, reading nothing: hours.
        (
            gguf_header([field(b"k", _ARRAY, struct.pack("<IQ", _UINT8, 1 << 60))]),
            "an array of 1152921504606846976 values needs",
        ),
        (
            gguf_header([field(b"k", _ARRAY, struct.pack("<IQ", _STRING, 1 << 40))]),
            "cannot fit",
        ),
        (gguf_header([], num_tensors=0)[:-8] + struct.pack("<Q", 1 << 62), "a metadata key"),
        (gguf_header([field(b"k", 99, b"")]), "unknown metadata value type 99"),
        (
            gguf_header([field(b"general.alignment", _UINT32, struct.pack("<I", 3))]),
            "not a power of two",
        ),
        (
            gguf_header(
                [],
                num_tensors=1,
                tensors=gguf_string(b"t") + struct.pack("<IQQIQ", 2, 1024, 1024, 0, 0),
            ),
            "past the end of the file",
        ),
        (
            gguf_header(
                [], num_tensors=1, tensors=gguf_string(b"t") + struct.pack("<IIQ", 7, 0, 0)
            ),
            "7 dimensions",
        ),
        (b"GGUF" + struct.pack("<I", 9), "version 9"),
        (b"GGML" + bytes(20), "no GGUF magic"),
        (b"", "empty"),
    ],
    ids=[
        "huge_byte_array",
        "huge_string_array",
        "huge_field_count",
        "unknown_type",
        "bad_alignment",
        "tensor_past_the_end",
        "too_many_dims",
        "bad_version",
        "bad_magic",
        "empty",
    ],
)
def test_a_lying_header_is_refused_saying_what_and_where(
    tmp_path: Path, data: bytes, message: str
) -> None:
    spec = write(tmp_path, data)
    with pytest.raises(ModelLoadError, match=message):
        check_gguf_layout(Path(spec))
    with pytest.raises(ModelLoadError):  # and every reader of the file goes through it
        model_gguf.gguf_config(spec)


def test_metadata_that_is_not_utf8_is_a_load_error(tmp_path: Path) -> None:
    data = gguf_header([field(b"general.architecture", _STRING, gguf_string(b"\xc1lama"))])
    with pytest.raises(ModelLoadError, match=r"bad 'general\.architecture'"):
        model_gguf.gguf_config(write(tmp_path, data))


def test_a_count_of_the_wrong_type_is_a_load_error(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path, block_count=[1, 2])
    with pytest.raises(ModelLoadError, match="has a bad value"):
        model_gguf.gguf_config(str(path))


def test_a_file_without_one_of_the_models_tensors_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path, skip_tensors=("blk.0.attn_norm.weight",))
    with pytest.raises(ModelLoadError, match=r"lacks the tensor model\.layers\.0\.input_layernorm"):
        load_model(str(path))
