"""`python -m benchmarks.kvstore` runs end to end on a few MiB: every backend and baseline
reports, and every block it read back is checked against what it put."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.ray
def test_kvstore_benchmark_reports_every_backend_and_baseline() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    command = [
        *(sys.executable, "-m", "benchmarks.kvstore", "--backend", "all"),
        *("--mib", "8", "--batch", "4", "--repeats", "2", "--warmups", "1"),
    ]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0].startswith("11 blocks of 720 KiB"), lines[0]
    labels = [line.split(" ours ")[0].strip() for line in lines[1:6]]
    assert labels == ["memory", "redis", "ray", "ray", "ray"]
    assert [re.search(r"\| (\S+) put", line).group(1) for line in lines[2:6]] == [
        "raw",
        "raw",
        "raw+copy",
        "list+copy",
    ]
    assert lines[6].startswith("ray cold ours put")
    assert lines[7].startswith("per batch of 4: get ours")
    for line in lines[1:7]:
        assert all(float(gbps) > 0 for gbps in re.findall(r"([\d.]+) GB/s", line)), line
