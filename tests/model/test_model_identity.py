"""The KV fingerprint's model identity covers the weights' bytes: a HF directory
whose files are rewritten in place gets a new identity (so its workers never read
the blocks the old weights computed), and one whose bytes are unchanged keeps it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from kvstore.spec import BlockSpec
from model.errors import ModelLoadError
from model.sources import config_for_model, model_identity
from model.weight_files import file_digest


def fingerprint(model_dir: Path) -> bytes:
    spec = str(model_dir)
    return BlockSpec.for_model(
        model_identity(spec), config_for_model(spec), torch.float32
    ).fingerprint


@pytest.fixture
def model_dir(hf_checkpoint, tmp_path: Path) -> Path:
    """A copy of a tiny checkpoint this test may rewrite."""
    return Path(shutil.copytree(hf_checkpoint("llama_gqa"), tmp_path / "model"))


def test_the_same_files_give_the_same_identity(model_dir: Path) -> None:
    before = model_identity(str(model_dir))
    # Rewritten with the same bytes (a new mtime): still the same weights.
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes())
    os.utime(weights, ns=(0, 0))
    assert model_identity(str(model_dir)) == before
    assert before.startswith(f"{model_dir}:weights:")


def test_weights_rewritten_in_place_give_another_identity_and_fingerprint(
    model_dir: Path, hf_checkpoint
) -> None:
    before_identity, before_fingerprint = model_identity(str(model_dir)), fingerprint(model_dir)
    other = hf_checkpoint("llama_gqa", seed=1) / "model.safetensors"
    weights = model_dir / "model.safetensors"
    assert weights.stat().st_size == other.stat().st_size  # same shapes, other values
    shutil.copyfile(other, weights)  # same path, same inode, same size
    assert model_identity(str(model_dir)) != before_identity
    assert fingerprint(model_dir) != before_fingerprint


def test_a_changed_config_gives_another_identity(model_dir: Path) -> None:
    before = model_identity(str(model_dir))
    config = model_dir / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e-06'))
    assert model_identity(str(model_dir)) != before


def test_every_shard_is_covered(hf_checkpoint, tmp_path: Path) -> None:
    sharded = Path(
        shutil.copytree(hf_checkpoint("llama_gqa", max_shard_size="100KB"), tmp_path / "m")
    )
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 1
    before = model_identity(str(sharded))
    last = bytearray(shards[-1].read_bytes())
    last[-1] ^= 1  # one bit of the last tensor of the last shard
    shards[-1].write_bytes(bytes(last))
    assert model_identity(str(sharded)) != before


def test_a_file_digest_is_of_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "w"
    path.write_bytes(b"a" * (1 << 25) + b"b")  # past one read chunk
    first = file_digest(path)
    path.write_bytes(b"a" * (1 << 25) + b"c")
    assert file_digest(path) != first
    path.write_bytes(b"a" * (1 << 25) + b"b")
    assert file_digest(path) == first


def test_a_directory_without_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weights"):
        model_identity(str(tmp_path))


@pytest.mark.parametrize(
    "shard",
    ["../outside.safetensors", "/tmp/outside.safetensors", "sub/a.safetensors", "a.bin", 7],
)
def test_a_shard_index_naming_a_file_outside_the_directory_is_refused(
    model_dir: Path, shard: object
) -> None:
    """Found by tests/fuzz/fuzz_checkpoint.py: an index could name any file."""
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": shard}})
    )
    with pytest.raises(ModelLoadError, match=r"a shard must be a \*\.safetensors file in the same"):
        model_identity(str(model_dir))
