"""Fuzzes reading a GGUF model file: the header walk (`model.gguf_layout`), the
`gguf` library's reader behind it, and everything kvrelay takes from the file
(config, tokenizer, chat template, tensors). Whatever the bytes, loading either
succeeds or raises `ModelLoadError` saying what is wrong: no other exception, no
hang, no allocation sized by a count the file states.

The seed is a complete tiny Llama file (`tests/model/gguf_files.py`'s, written
with `gguf.GGUFWriter`, llama.cpp's own writer).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import atheris
import harness  # sets sys.path: before any of the packages
import torch

from tests.model.gguf_files import write_tiny_llama_gguf

with atheris.instrument_imports(include=["model", "gguf"]):
    import gguf  # noqa: F401  (instrumented: the fuzzer follows its branches too)

    from model import gguf as model_gguf
    from model.errors import ModelLoadError
    from model.loader import load_model

_DIR = Path(tempfile.mkdtemp(prefix="kvrelay-fuzz-gguf-"))
PATH = _DIR / "model.gguf"


def seeds() -> list[bytes]:
    return [write_tiny_llama_gguf(_DIR / "seed.gguf")]


def load(spec: str) -> None:
    """What a worker and the router read from a GGUF file."""
    loaded = load_model(spec, dtype=torch.float32)
    model_gguf.gguf_chat_template(spec)
    if loaded.tokenizer is not None:
        loaded.tokenizer.decode(loaded.tokenizer.encode("ab a c"))


def test_one_input(data: bytes) -> None:
    PATH.write_bytes(data)
    model_gguf._reader.cache_clear()  # a new file under the same path
    try:
        load(str(PATH))
    except ModelLoadError:
        harness.refused()
        return
    harness.accepted()


if __name__ == "__main__":
    try:
        harness.run(test_one_input, seeds)
    finally:
        for file in _DIR.iterdir():
            os.unlink(file)
        _DIR.rmdir()
