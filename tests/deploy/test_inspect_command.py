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


def test_a_windowed_model_shows_its_window_and_the_bounded_kv(capsys, hf_checkpoint) -> None:
    facts = inspect_json(capsys, "dummy:gemma3-270m", "--dtype", "bfloat16")
    # Gemma-3-270M: 2 x 18 layers x 1 KV head x 256 x 2 B; a 2,048-token cache ~36 MB.
    assert facts["kv_bytes_per_token"] == 18432 and 18432 * 2048 == 37_748_736
    assert (facts["sliding_window"], facts["num_windowed_layers"]) == (512, 15)
    per_layer_token = 18432 // 18
    # 3 global layers keep the whole 32,768-token context, 15 keep (512/16 + 1) blocks.
    assert facts["kv_bytes_per_full_context_windowed"] == per_layer_token * (
        3 * 32768 + 15 * 33 * 16
    )
    assert facts["pool_frees_behind_window"] is False
    mistral = hf_checkpoint("mistral", sliding_window=32)
    assert main(["inspect", str(mistral)]) == 0
    out = capsys.readouterr().out
    assert "sliding window 32 on 2 of 2 layers" in out
    assert "the decode pool frees blocks behind the window" in out
