"""`benchmarks.gpu_check --cpu-smoke`: the GPU check's own code on tiny shapes on the
CPU (Triton interpreted), so that it cannot rot between the rare GPU runs; and its
promise to need torch alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_cpu_smoke_run_passes_every_part(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--cpu-smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    kernels = result["kernels"]
    # 3 K/V formats x 2 windows of attention, 3 formats of writes, all passing.
    assert len(kernels) == 9 and all(case["ok"] for case in kernels), kernels
    assert {c["kv_cache_dtype"] for c in kernels} == {"auto", "int8", "fp8_e4m3"}
    assert {c["window"] for c in kernels if c["kernel"] == "paged_attention"} == {None, 8}
    assert [(b["context"], b["batch"]) for b in result["bandwidth"]] == [(64, 1), (64, 2)]
    assert all(b["paged_gb_s"] > 0 and b["copy_gb_s"] > 0 for b in result["bandwidth"])
    decode = [e for e in result["engine"] if e["kind"] == "decode"]
    assert [e["batch"] for e in decode] == [1, 2]
    assert all(e["tokens_agree"] and e["kvrelay_tok_s"] > 0 for e in decode)
    assert all(e["eager_tokens_agree"] and e["eager_tok_s"] > 0 for e in decode)
    assert "kernels: 9/9 cases pass" in (tmp_path / "gpu_check.md").read_text()


def test_it_imports_no_rpc_store_or_tracing() -> None:
    code = (
        "import sys, benchmarks.gpu_check; "
        "print([m for m in ('grpc', 'redis', 'ray', 'opentelemetry') if m in sys.modules])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
