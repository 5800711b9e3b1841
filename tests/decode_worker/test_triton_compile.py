"""The Triton kernels compile for CUDA (sm_90) ahead of time, with no GPU present.

The interpreter that runs the correctness tests on CPU accepts some code that the real
compiler rejects; compiling to a cubin catches that without a GPU. Interpreter and
compiler do not mix in one process (the interpreter patches `triton.language`), so the
test runs this file as a script in a child process without TRITON_INTERPRET.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

NUM_KERNEL_VARIANTS = 15


@pytest.mark.slow
def test_kernels_compile_to_cubin_without_a_gpu() -> None:
    pytest.importorskip("triton")
    repo_root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo_root), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, __file__],
        env=env,
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kernel compilation failed:\n{result.stderr[-4000:]}"
    compiled = result.stdout.split()
    assert len(compiled) == NUM_KERNEL_VARIANTS, f"compiled variants: {compiled}"


def compile_to_cubin(kernel, pointer_types: dict[str, str], constexprs: dict[str, object]):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {
        name: "constexpr" if name in constexprs else pointer_types.get(name, "i32")
        for name in kernel.arg_names
    }
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    hopper = GPUTarget("cuda", 90, 32)
    return triton.compile(source, target=hopper, options={"num_warps": 4}).asm


def compile_partition_kernel(
    is_single_partition: bool, dtype: str, kv_cache_dtype: str = "auto"
) -> None:
    from decode_worker.kernels import paged_attention_triton
    from decode_worker.kernels.contracts import KV_FORMAT_IDS

    cache_type = f"*{dtype}" if kv_cache_dtype == "auto" else "*u8"
    pointer_types = {
        "query_ptr": f"*{dtype}",
        "key_cache_ptr": cache_type,
        "value_cache_ptr": cache_type,
        "block_tables_ptr": "*i32",
        "context_lens_ptr": "*i32",
        "out_ptr": f"*{dtype}",
        "partial_max_ptr": "*fp32",
        "partial_sum_ptr": "*fp32",
        "partial_out_ptr": "*fp32",
        "scale": "fp32",
    }
    constexprs = {
        "GROUP_SIZE": 3,
        "GROUP_PAD": 4,
        "HEAD_DIM": 128,
        "BLOCK_SIZE": 16,
        "BLOCKS_PER_PARTITION": 32,
        "IS_SINGLE_PARTITION": is_single_partition,
        "KV_FORMAT": KV_FORMAT_IDS[kv_cache_dtype],
    }
    asm = compile_to_cubin(
        paged_attention_triton._paged_attention_partition_kernel, pointer_types, constexprs
    )
    assert asm["cubin"], f"no cubin for {dtype} {kv_cache_dtype} single={is_single_partition}"
    print(f"partition-{dtype}-{kv_cache_dtype}-{'single' if is_single_partition else 'split'}")


def compile_reduce_kernel() -> None:
    from decode_worker.kernels import paged_attention_triton

    pointer_types = {
        "out_ptr": "*fp16",
        "partial_max_ptr": "*fp32",
        "partial_sum_ptr": "*fp32",
        "partial_out_ptr": "*fp32",
        "context_lens_ptr": "*i32",
    }
    constexprs = {"HEAD_DIM": 64, "PARTITION_SIZE": 512, "PARTITIONS_PAD": 8}
    asm = compile_to_cubin(
        paged_attention_triton._paged_attention_reduce_kernel, pointer_types, constexprs
    )
    assert asm["cubin"]
    print("reduce")


def compile_write_kernel(slot_type: str) -> None:
    from decode_worker.kernels import kv_cache_write_triton

    pointer_types = {
        "key_ptr": "*bf16",
        "value_ptr": "*bf16",
        "key_cache_ptr": "*bf16",
        "value_cache_ptr": "*bf16",
        "slot_mapping_ptr": slot_type,
    }
    constexprs = {"ROW_SIZE": 384, "ROW_PAD": 512}
    asm = compile_to_cubin(kv_cache_write_triton._write_kv_cache_kernel, pointer_types, constexprs)
    assert asm["cubin"]
    print(f"write-{slot_type[1:]}")


def compile_quantized_write_kernel(kv_cache_dtype: str) -> None:
    from decode_worker.kernels import kv_cache_write_triton
    from decode_worker.kernels.contracts import KV_FORMAT_IDS

    pointer_types = {
        "key_ptr": "*bf16",
        "value_ptr": "*bf16",
        "key_cache_ptr": "*u8",
        "value_cache_ptr": "*u8",
        "slot_mapping_ptr": "*i64",
    }
    constexprs = {
        "NUM_KV_HEADS": 8,
        "HEADS_PAD": 8,
        "HEAD_DIM": 128,
        "DIM_PAD": 128,
        "ROW_WIDTH": 130,
        "QMAX": 127.0 if kv_cache_dtype == "int8" else 448.0,
        "KV_FORMAT": KV_FORMAT_IDS[kv_cache_dtype],
    }
    asm = compile_to_cubin(
        kv_cache_write_triton._write_quantized_kv_cache_kernel, pointer_types, constexprs
    )
    assert asm["cubin"]
    print(f"write-{kv_cache_dtype}")


if __name__ == "__main__":
    for single in (True, False):
        for dtype in ("fp16", "bf16", "fp32"):
            compile_partition_kernel(single, dtype)
        for kv_cache_dtype in ("int8", "fp8_e4m3"):
            compile_partition_kernel(single, "bf16", kv_cache_dtype)
    compile_reduce_kernel()
    compile_write_kernel("*i32")
    compile_write_kernel("*i64")
    for kv_cache_dtype in ("int8", "fp8_e4m3"):
        compile_quantized_write_kernel(kv_cache_dtype)
