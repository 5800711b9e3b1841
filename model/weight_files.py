"""Which files hold a model's weights, and a digest of their bytes.

The digest goes into the KV fingerprint (`model.sources.model_identity`): K/V is a
function of the weights, so a directory whose files were replaced in place (a
fine-tune saved over its base, a re-quantized GGUF) must never read the blocks the
old weights computed, even under the same path and config.

Bytes, not names or times: a copy keeps its blocks, a rewrite loses them. blake2b
reads at about 0.5-1 GB/s here, so a 540 MB checkpoint costs about a second, once,
when a worker starts. Nothing is cached: a digest cached by path (or by size and
mtime, whose granularity is a few milliseconds) could outlive a rewrite.

This module does not import torch: the router and the CLI read model identities.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from model.errors import ModelLoadError

SHARD_INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"

_CHUNK_BYTES = 1 << 24
"""Read size: large enough that the per-call overhead is nothing next to hashing."""


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of `model_dir`: the shards its index names, or the single file."""
    index_path = model_dir / SHARD_INDEX_NAME
    if index_path.is_file():
        files = [model_dir / name for name in _shard_names(index_path)]
    elif (model_dir / SINGLE_FILE_NAME).is_file():
        files = [model_dir / SINGLE_FILE_NAME]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {model_dir}")
    for path in files:
        if not path.is_file():
            raise ModelLoadError(f"missing weight file {path}")
    return files


def _shard_names(index_path: Path) -> list[str]:
    """The shard files an index names: plain `*.safetensors` names in its directory,
    never a path that leads out of it."""
    try:
        weight_map = json.loads(index_path.read_bytes())["weight_map"]
    except (OSError, KeyError, TypeError, ValueError) as exc:  # ValueError: bad JSON or UTF-8
        raise ModelLoadError(f"bad shard index {index_path}: {exc!r}") from None
    if not isinstance(weight_map, dict):
        raise ModelLoadError(f"bad shard index {index_path}: weight_map is not an object")
    for name in weight_map.values():
        if not (
            isinstance(name, str)
            and name.endswith(".safetensors")
            and Path(name).name == name
            and "\\" not in name
        ):
            raise ModelLoadError(
                f"shard index {index_path} names {name!r}: a shard must be a "
                "*.safetensors file in the same directory"
            )
    return sorted(set(weight_map.values()))


def files_digest(paths: Sequence[Path]) -> str:
    """Hex blake2b-128 of the files' names and bytes, in the order given."""
    digest = hashlib.blake2b(digest_size=16, person=b"kvrelay-weights")
    for path in paths:
        name = path.name.encode("utf-8")
        digest.update(len(name).to_bytes(8, "little") + name)
        digest.update(bytes.fromhex(file_digest(path)))
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """Hex blake2b-128 of one file's bytes, read in large chunks into one buffer."""
    digest = hashlib.blake2b(digest_size=16)
    buffer = bytearray(_CHUNK_BYTES)
    view = memoryview(buffer)
    try:
        with open(path, "rb", buffering=0) as file:
            while num_read := file.readinto(buffer):
                digest.update(view[:num_read])
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None
    return digest.hexdigest()
