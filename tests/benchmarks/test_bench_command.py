"""`kvrelay bench` usage errors (exit 2) and an unreachable router (exit 1)."""

from __future__ import annotations

import argparse
import os

import pytest

from benchmarks.serving.compare import COLOCATED_TOKEN_BUDGET, LayoutOptions
from benchmarks.serving.launcher import free_port
from deploy import bench_command
from deploy.cli import main

ALLOWED = sorted(os.sched_getaffinity(0))
CORES = f"{ALLOWED[0]},{ALLOWED[-1]}"  # the same core twice on a one-core machine
THREE_WAY = ["--compare", "colocated-disagg-conditional", "--cores", CORES]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--slo", "ttfb_ms=5"], "bad SLO 'ttfb_ms=5'"),
        (["--workload", "jsonl"], "--workload jsonl needs --dataset FILE"),
        (["--max-concurrency", "0"], "--max-concurrency must be >= 1, got 0"),
        (["--request-rate", "0"], "rate must be > 0 (or inf), got 0.0"),
        (["--num-prompts", "0"], "num_prompts must be >= 1, got 0"),
        (["--compare", "prefix-cache", "--cores", "a,b"], "--cores 'a,b': expected"),
        (
            ["--compare", "prefix-cache", "--cores", "0,4096"],
            "--cores: cores [4096] are not available",
        ),
        (
            ["--compare", "prefix-cache", "--cores", "0"],
            "--compare needs at least 2 cores, got [0]",
        ),
        ([*THREE_WAY, "--num-trials", "0"], "--num-trials must be >= 1, got 0"),
        ([*THREE_WAY, "--colocated-cores", "4096"], "--colocated-cores: cores [4096] are not"),
        ([*THREE_WAY, "--colocated-cores", "x"], "--colocated-cores 'x': expected core"),
        (
            [*THREE_WAY, "--colocated-token-budget", "0"],
            "--colocated-token-budget must be >= 1, got 0",
        ),
        ([*THREE_WAY, "--max-local-prefill-len", "0"], "--max-local-prefill-len must be >= 1"),
        (["--sweep-rate", "0.1,0.2", "--slo", "ttft_ms=1"], "--sweep-rate needs --compare"),
        ([*THREE_WAY, "--sweep-rate", "0.1,0.2"], "--sweep-rate needs --slo"),
        (
            [*THREE_WAY, "--sweep-rate", "0.2,0.1", "--slo", "itl_ms=300"],
            "sweep rates must increase, got [0.2, 0.1]",
        ),
        (
            [*THREE_WAY, "--sweep-rate", "0.1x0.5", "--slo", "itl_ms=300"],
            "--sweep-rate '0.1x0.5': the factor must be > 1",
        ),
    ],
)
def test_usage_errors_exit_2_with_one_line(argv: list[str], message: str, capsys) -> None:
    assert main(["bench", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvrelay bench: error: ")
    assert message in err
    assert err.count("\n") == 1


def test_unreachable_router_exits_1(capsys, tmp_path) -> None:
    target = f"127.0.0.1:{free_port()}"
    result = tmp_path / "r.json"
    argv = ["bench", "--target", target, "--no-progress", "--result-json", str(result)]
    assert main(argv) == 1
    assert "warm-up request failed: UNAVAILABLE" in capsys.readouterr().err
    assert not result.exists()


def test_the_colocated_budget_flag_defaults_to_the_measured_one() -> None:
    parser = argparse.ArgumentParser()
    bench_command.register(parser.add_subparsers())
    args = parser.parse_args(["bench"])
    assert args.colocated_token_budget == COLOCATED_TOKEN_BUDGET == 256
    assert LayoutOptions("dummy:tiny", (0, 1)).colocated_token_budget == 256
