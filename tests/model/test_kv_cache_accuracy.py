"""The accuracy floor of the 8-bit KV cache, on the real SmolLM2-135M-Instruct
(random weights hide the outliers that make quantization hard): teacher-forced
next-token top-1 agreement with full-precision K/V, and perplexity, over 767
positions of standard-library docstrings (`benchmarks.kv_cache_dtype`'s
measure, on a shorter text than its 3,069 positions).

int8 is held to its goal, >= 98% (measured here: 98.83%). fp8 e4m3 misses its goal
of 99% (measured here: 96.48%; 95.8% over 3,069 positions; its three mantissa bits
are the bound, docs/benchmarks.md), so its floor is what it reaches less 1.5
points, to catch a regression, not to claim the goal. Both: perplexity <= 2% higher.
"""

from __future__ import annotations

import pytest

from benchmarks.kv_cache_dtype import MODEL, docstring_windows, measure_accuracy
from model.loader import load_model

pytest.importorskip("gguf")
pytestmark = pytest.mark.slow

FLOORS = {"int8": 0.98, "fp8_e4m3": 0.95}


@pytest.fixture(scope="module")
def measured():
    loaded = load_model(MODEL)
    return measure_accuracy(loaded, docstring_windows(loaded, num_windows=1, window_len=768))


@pytest.mark.parametrize("kv_cache_dtype", sorted(FLOORS))
def test_8bit_kv_keeps_its_agreement_floor_and_perplexity(measured, kv_cache_dtype) -> None:
    full, quantized = measured["auto"], measured[kv_cache_dtype]
    assert full.agreement == 1.0 and quantized.num_positions == 767
    assert quantized.agreement >= FLOORS[kv_cache_dtype], quantized
    assert quantized.perplexity <= 1.02 * full.perplexity, (quantized, full)
    # Quantization must have been applied: some position disagrees.
    assert quantized.agreement < 1.0
