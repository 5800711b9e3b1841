"""`kvrelay inspect`: the KV arithmetic of a model, exact, for a preset and a GGUF."""

from __future__ import annotations

import json

from deploy.cli import main


def inspect_json(capsys, *argv: str) -> dict:
    assert main(["inspect", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_dummy_preset(capsys) -> None:
    facts = inspect_json(capsys, "dummy:tiny", "--kv-cache-gb", "0.001")
    # 2 (K and V) x 2 layers x 2 KV heads x 32 dims x 4 bytes (float32)
    assert facts["kv_bytes_per_token"] == 2 * 2 * 2 * 32 * 4 == 1024
    assert facts["kv_bytes_per_block"] == 1024 * 16
    assert facts["pool_blocks"] == int(0.001 * 1024**3) // (1024 * 16)
    assert facts["pool_tokens"] == facts["pool_blocks"] * 16


def test_the_smollm2_gguf_in_bfloat16(capsys) -> None:
    facts = inspect_json(capsys, "smollm2:135m-instruct", "--dtype", "bfloat16")
    assert (facts["num_layers"], facts["num_kv_heads"], facts["head_dim"]) == (30, 3, 64)
    assert facts["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 2 == 23040
    assert facts["max_context_len"] == 8192


def test_the_text_shows_the_formula_and_an_unknown_model_is_a_usage_error(capsys) -> None:
    assert main(["inspect", "dummy:135m"]) == 0
    out = capsys.readouterr().out
    assert "KV per token: 2 x 30 layers x 3 KV heads x 64 x 4 B (float32) = 46,080 B" in out
    assert main(["inspect", "/no/such/model"]) == 2
    assert "is not a directory, a .gguf file or a preset" in capsys.readouterr().err
