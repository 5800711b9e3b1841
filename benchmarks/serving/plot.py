"""The PNG: empirical CDFs of TTFT, TPOT, ITL and E2E latency, one line per run,
so two configurations of a comparison can be read off the same axes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.serving.metrics import RequestLatencies
from benchmarks.serving.result import RunResult

PANELS = (
    ("ttft_ms", "TTFT"),
    ("tpot_ms", "TPOT"),
    ("itl_ms", "ITL"),
    ("e2e_ms", "E2E latency"),
)


def latency_samples(run: RunResult) -> dict[str, list[float]]:
    """Per-request (per-gap for ITL) samples in ms, keyed like PANELS."""
    latencies = [RequestLatencies.of(r) for r in run.records if r.is_success]
    return {
        "ttft_ms": [lat.ttft_ms for lat in latencies],
        "tpot_ms": [lat.tpot_ms for lat in latencies if lat.tpot_ms is not None],
        "itl_ms": [itl for lat in latencies for itl in lat.itls_ms],
        "e2e_ms": [lat.e2e_ms for lat in latencies],
    }


def plot_latencies(runs: list[RunResult], path: Path, title: str) -> None:
    """Writes a 2x2 grid of CDFs (log x axis) to `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    samples = [latency_samples(run) for run in runs]
    for ax, (key, label) in zip(axes.flat, PANELS, strict=True):
        for i, (run, run_samples) in enumerate(zip(runs, samples, strict=True)):
            values = np.sort(np.asarray(run_samples[key]))
            if not len(values):
                continue
            # Zero ITLs (several tokens in one message) cannot sit on a log axis:
            # they are drawn at half the smallest positive sample.
            positive = values[values > 0]
            floor = positive[0] / 2 if len(positive) else 1e-3
            xs = np.concatenate([values[:1], values]).clip(min=floor)
            cdf = np.arange(len(values) + 1) / len(values)  # from 0, so one sample shows
            label_text = f"{run.name} (p50 {np.median(values):.1f})"
            # One colour per run in every panel, also where another run has no samples.
            ax.step(xs, cdf, where="post", color=f"C{i}", label=label_text)
        lows = [np.percentile(r[key], 1) for r in samples if len(r[key])]
        if lows and min(lows) > 0:
            # Left edge at half the lowest 1st percentile: a stray near-zero gap
            # would otherwise stretch the axis over decades of nothing.
            ax.set_xlim(left=min(lows) / 2)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel(f"{label} (ms)")
        ax.set_ylabel("fraction of samples")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
