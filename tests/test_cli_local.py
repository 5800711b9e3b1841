"""`kvrelay generate --local` run as a subprocess, as a user runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.cli import main
from model.generation import generate_stream
from model.loader import load_model
from model.sampling_params import SamplingParams

REPO_ROOT = Path(__file__).resolve().parents[1]


def kvrelay(*args: str) -> subprocess.CompletedProcess[str]:
    # Bytes, decoded by hand: text mode would turn a generated "\r" into "\n".
    result = subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args], capture_output=True, cwd=REPO_ROOT, timeout=120
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def _assert_one_line_error(
    result: subprocess.CompletedProcess[str], status: int, needle: str
) -> None:
    assert result.returncode == status, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_json_output_for_text_and_token_id_prompts(tmp_path) -> None:
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("Hello from kvrelay\n\n")
    result = kvrelay(
        "generate", "--local", "--json", "--max-tokens", "4", "--ignore-eos",
        "--prompts-file", str(prompts_file), "--prompt-token-ids", "256,72,101",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt_index"] for r in records] == [0, 1]
    assert records[0]["token_ids"] == [35, 23, 13, 199]
    assert records[0]["text"] == "#\x17\r\ufffd"
    assert all(r["finish_reason"] == "length" for r in records)
    assert len(records[1]["token_ids"]) == 4


def test_streamed_text_equals_json_text(capsys) -> None:
    args = ["generate", "--local", "--max-tokens", "6", "--ignore-eos", "Hello from kvrelay"]
    assert main(args) == 0
    streamed = capsys.readouterr().out
    assert main([*args, "--json"]) == 0
    assert streamed == json.loads(capsys.readouterr().out)["text"] + "\n"


@pytest.mark.slow
def test_hf_checkpoint_with_token_ids(hf_checkpoint) -> None:
    path = hf_checkpoint("llama_gqa")
    result = kvrelay(
        "generate", "--local", "--model", str(path), "--json", "--prompt-token-ids", "5,6,7"
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["text"] is None  # no tokenizer.json
    assert len(record["token_ids"]) == 16 or record["finish_reason"] == "stop"


def test_text_prompt_needs_a_tokenizer(hf_checkpoint, capsys) -> None:
    path = hf_checkpoint("llama_gqa")
    no_tokenizer = in_process(capsys, "generate", "--local", "--model", str(path), "some text")
    _assert_one_line_error(no_tokenizer, 2, "has no tokenizer.json")


@pytest.fixture
def broken_checkpoints(hf_checkpoint, tmp_path) -> dict[str, Path]:
    source = hf_checkpoint("llama_gqa")
    dirs = {}
    for name in ("missing_file", "architecture", "shape"):
        dirs[name] = tmp_path / name
        shutil.copytree(source, dirs[name])
    (dirs["missing_file"] / "model.safetensors").unlink()
    config_path = dirs["architecture"] / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "architectures": ["GPTNeoXForCausalLM"]}))
    config_path = dirs["shape"] / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "intermediate_size": 96}))
    return dirs


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing_file", "no *.safetensors weights in"),
        ("architecture", "unsupported architecture 'GPTNeoXForCausalLM'"),
        (
            "shape",
            "tensor model.layers.0.mlp.down_proj.weight in model.safetensors has shape (64, 128), expected (64, 96)",
        ),
    ],
)
def test_loader_errors_are_one_line(broken_checkpoints, case, needle) -> None:
    args = (
        "generate",
        "--local",
        "--model",
        str(broken_checkpoints[case]),
        "--prompt-token-ids",
        "1,2",
    )
    _assert_one_line_error(kvrelay(*args), 1, needle)


@pytest.mark.slow
def test_debug_shows_the_traceback(broken_checkpoints) -> None:
    model_dir = str(broken_checkpoints["shape"])
    args = ("generate", "--local", "--model", model_dir, "--prompt-token-ids", "1", "--debug")
    with_debug = kvrelay(*args)
    assert with_debug.returncode == 1
    assert "Traceback" in with_debug.stderr and "ModelLoadError" in with_debug.stderr


def in_process(capsys, *args: str) -> subprocess.CompletedProcess[str]:
    """`main()` in this process: for errors that need no fresh interpreter to check."""
    try:
        status = main(list(args))
    except SystemExit as exc:  # argparse exits on its own usage errors
        status = exc.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), status, captured.out, captured.err)


def test_missing_config_json(tmp_path, capsys) -> None:
    result = in_process(
        capsys, "generate", "--local", "--model", str(tmp_path), "--prompt-token-ids", "1"
    )
    _assert_one_line_error(result, 1, f"missing {tmp_path}/config.json")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--max-tokens", "0", "hi"), "max_tokens must be at least 1"),
        (("--top-p", "2", "hi"), "top_p must be in (0, 1]"),
        (("--prompt-token-ids", "1,x"), "is not a comma-separated list of integers"),
        (("--prompt-token-ids", "1,999"), "outside the vocab"),
        (("--max-tokens", "many", "hi"), "invalid int value: 'many'"),
        ((), "no prompt"),
        (("--prompts-file", "/nonexistent/prompts.txt"), "cannot read --prompts-file"),
        (("--chat", "hi"), "model dummy:tiny has no chat template"),
        (("--system", "be brief", "hi"), "--system goes with --chat"),
    ],
)
def test_usage_errors_exit_2(capsys, args, needle) -> None:
    _assert_one_line_error(in_process(capsys, "generate", "--local", *args), 2, needle)


def test_local_and_target_exclude_each_other(capsys) -> None:
    both = in_process(capsys, "generate", "--local", "--target", "localhost:50051", "hi")
    _assert_one_line_error(both, 2, "choose one of --local")


def test_several_prompts_run_as_one_batch_and_match_the_reference_loop(tmp_path, capsys) -> None:
    # Different lengths, so the engine's batch mixes prefill chunks and decodes.
    texts = ["Hello from kvrelay", "a", "The quick brown fox jumps over the lazy dog"]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(texts[1:]) + "\n")
    args = ["generate", "--local", "--json", "--max-tokens", "5", "--ignore-eos"]
    assert main([*args, texts[0], "--prompts-file", str(prompts_file)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    loaded = load_model("dummy:tiny")
    prompts = [loaded.tokenizer.encode(t) for t in texts]
    reference = [[] for _ in prompts]
    for event in generate_stream(loaded, prompts, SamplingParams(max_tokens=5, ignore_eos=True)):
        reference[event.seq_idx].append(event.token_id)
    assert [r["token_ids"] for r in records] == reference
    assert records[0]["token_ids"] == [35, 23, 13, 199, 94]
    assert [r["prompt_index"] for r in records] == [0, 1, 2]


def test_request_too_large_for_the_pool_is_a_usage_error(capsys) -> None:
    # dummy:tiny's 512 MiB pool holds 32768 blocks of 16 tokens: 600k tokens cannot fit.
    result = in_process(capsys, "generate", "--local", "--max-tokens", "600000", "hi")
    _assert_one_line_error(result, 2, "lower max_new_tokens or shorten the prompt")


def test_help_teaches_with_examples() -> None:
    result = kvrelay("generate", "--help")
    assert result.returncode == 0, result.stderr
    assert "examples:" in result.stdout
    assert "kvrelay generate --local" in result.stdout


def test_chat_renders_the_models_template_without_an_extra_bos(hf_checkpoint, tmp_path, capsys):
    from tests.cluster.local_cluster import byte_level_tokenizer

    path = tmp_path / "chat-model"
    shutil.copytree(hf_checkpoint("llama_gqa"), path)
    byte_level_tokenizer(path)
    (path / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    common = ("generate", "--local", "--model", str(path), "--json", "--max-tokens", "5")
    chat = in_process(capsys, *common, "--ignore-eos", "--system", "S", "--chat", "Hi")
    assert chat.returncode == 0, chat.stderr
    # The same text as --prompt-token-ids, tokenized without a BOS.
    from model.tokenizer import tokenizer_for_model

    tokens = tokenizer_for_model(str(path)).encode("[system]S[user]Hi[assistant]", add_bos=False)
    assert len(tokens) == len("[system]S[user]Hi[assistant]")
    ids = ",".join(map(str, tokens))
    plain = in_process(capsys, *common, "--ignore-eos", "--prompt-token-ids", ids)
    assert json.loads(chat.stdout)["token_ids"] == json.loads(plain.stdout)["token_ids"]
