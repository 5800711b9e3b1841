"""The bounded fuzz run of `make test`: every harness in this directory under
atheris for a fixed number of inputs from a fixed seed, so the run is the same
each time and takes seconds. A harness fails on any exception other than the
refusal it expects, or on a broken invariant; this test then fails with the
input that did it (libFuzzer's crash file and its output).

Each harness must also report that some input was accepted and some refused,
so a harness whose every input bounces off a first check cannot pass for
coverage. A longer run is README's "Fuzzing" command.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
# Inputs per harness: about 3-8 s each here.
RUNS = {
    "fuzz_block_codec.py": 20000,
    "fuzz_resp_reader.py": 20000,
    "fuzz_gguf.py": 3000,
    "fuzz_checkpoint.py": 3000,
    "fuzz_requests.py": 20000,
}
SEED = 1


def test_every_harness_is_run() -> None:
    assert sorted(RUNS) == sorted(p.name for p in HERE.glob("fuzz_*.py"))


@pytest.mark.parametrize("harness", sorted(RUNS))
def test_a_bounded_run_finds_nothing(harness: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / harness),
            f"-runs={RUNS[harness]}",
            f"-seed={SEED}",
            "-max_len=8192",
            # Linux keeps ru_maxrss across fork and exec, so a child of this pytest
            # process (gigabytes, after the model tests) would start "out of memory".
            "-rss_limit_mb=0",
            f"-artifact_prefix={tmp_path}/",
        ],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = proc.stdout + proc.stderr
    crashes = sorted(tmp_path.glob("crash-*"))
    assert proc.returncode == 0 and not crashes, (
        f"{harness} failed (exit {proc.returncode}); input: "
        f"{crashes[0].read_bytes()!r}\n{output[-4000:]}"
        if crashes
        else f"{harness} failed (exit {proc.returncode})\n{output[-4000:]}"
    )
    # libFuzzer checks its budget between batches of mutations, so a run may
    # overshoot by a few inputs; it must not stop short of the budget.
    done = re.search(r"^Done (\d+) runs", output, re.MULTILINE)
    assert done and int(done.group(1)) >= RUNS[harness], output[-2000:]
    assert "fuzz: first accepted input" in output, f"{harness} accepted no input"
    assert "fuzz: first refused input" in output, f"{harness} refused no input"
