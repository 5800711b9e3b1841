"""The PNG: one figure for a benchmark invocation, a colour per configuration.

- Row 1: empirical CDFs of TTFT, TPOT and E2E latency (log x axis).
- Row 2: the ITL CDF (log x); the ITL tail, the fraction of gaps at least x on
  log-log axes, down to the largest gap (1/n), where interference shows first; and
  the same tail for the short requests' gaps during a long prefill (solid) and
  outside (dashed), the two halves of the interference ratio (`interference.py`).
- Then a timeline per configuration (`plot_timeline.py`): each short-request gap
  at the time it ended, with the long prompts' prefill intervals shaded.
- For a sweep, a last row (`plot_sweep.py`): goodput and SLO attainment against
  the arrival rate; the rows above then show the runs at the highest rate every
  configuration ran.

A configuration's trials are pooled in its distributions; the timeline shows its
first trial.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np

from benchmarks.serving.interference import prefill_intervals, split_short_gaps
from benchmarks.serving.metrics import RequestLatencies
from benchmarks.serving.plot_sweep import draw_sweep
from benchmarks.serving.plot_timeline import draw_timeline
from benchmarks.serving.result import RunResult, run_names
from benchmarks.serving.sweep import RateSweep

CDF_PANELS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("e2e_ms", "E2E latency"))


def latency_samples(
    runs: Sequence[RunResult], long_indices: Collection[int] = ()
) -> dict[str, list[float]]:
    """Per-request (per-gap for ITL) samples in ms of `runs` pooled, keyed like the
    panels, with the short requests' gaps during and outside long prefills."""
    samples: dict[str, list[float]] = {
        key: [] for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "during", "outside")
    }
    for run in runs:
        latencies = [RequestLatencies.of(r) for r in run.records if r.is_success]
        samples["ttft_ms"] += [lat.ttft_ms for lat in latencies]
        samples["tpot_ms"] += [lat.tpot_ms for lat in latencies if lat.tpot_ms is not None]
        samples["itl_ms"] += [itl for lat in latencies for itl in lat.itls_ms]
        samples["e2e_ms"] += [lat.e2e_ms for lat in latencies]
        intervals = prefill_intervals(run.records, long_indices)
        if intervals:
            during, outside = split_short_gaps(run.records, long_indices, intervals)
            samples["during"] += during
            samples["outside"] += outside
    return samples


def _log_axis(ax, label: str) -> None:
    from matplotlib import ticker

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel(f"{label} (ms)")
    ax.grid(True, which="both", alpha=0.3)


def _positive(values: np.ndarray) -> np.ndarray:
    """Zero gaps (several tokens in one message) cannot sit on a log axis: they are
    drawn at half the smallest positive sample."""
    positive = values[values > 0]
    floor = positive[0] / 2 if len(positive) else 1e-3
    return values.clip(min=floor)


def _draw_cdf(ax, values: list[float], color: str, label: str) -> None:
    xs = np.sort(np.asarray(values, dtype=np.float64))
    cdf = np.arange(len(xs) + 1) / len(xs)  # from 0, so one sample shows
    xs = _positive(np.concatenate([xs[:1], xs]))
    ax.step(xs, cdf, where="post", color=color, label=f"{label} (p50 {np.median(values):.1f})")


def _draw_tail(ax, values: list[float], color: str, label: str, style: str = "-") -> None:
    """Fraction of samples >= x, from 1 at the smallest to 1/n at the largest."""
    xs = _positive(np.sort(np.asarray(values, dtype=np.float64)))
    tail = 1.0 - np.arange(len(xs)) / len(xs)
    ax.step(xs, tail, where="post", color=color, linestyle=style, label=label)


def plot_latencies(
    runs: list[RunResult],
    path: Path,
    title: str,
    *,
    long_indices: Collection[int] = (),
    sweep: RateSweep | None = None,
    itl_slo_ms: float | None = None,
) -> None:
    """Writes the figure (see the module docstring) to `path`; `long_indices` are
    the workload positions of the long prompts."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    if sweep is not None:
        runs, rate = _runs_at_common_rate(runs, sweep)
        title = f"{title} (distributions at {rate:g} req/s)"
    names = run_names(runs)
    pooled = {
        name: latency_samples([r for r in runs if r.name == name], long_indices) for name in names
    }
    timelines = [
        next(r for r in runs if r.name == name)
        for name in names
        if any(pooled[name][key] for key in ("during", "outside"))
    ]
    num_rows = 2 + len(timelines) + (sweep is not None)
    height_in = 4.2 * num_rows
    figure = plt.figure(figsize=(15, height_in))
    grid = figure.add_gridspec(num_rows, 6)
    colors = {name: f"C{i}" for i, name in enumerate(names)}

    for col, (key, label) in enumerate(CDF_PANELS):
        ax = figure.add_subplot(grid[0, 2 * col : 2 * col + 2])
        for name in names:
            if pooled[name][key]:
                _draw_cdf(ax, pooled[name][key], colors[name], name)
        _log_axis(ax, label)
        ax.set_ylabel("fraction of samples")
        ax.legend(fontsize=8, loc="lower right")

    cdf, tail, split = (figure.add_subplot(grid[1, 2 * c : 2 * c + 2]) for c in range(3))
    for name in names:
        itls = pooled[name]["itl_ms"]
        if itls:
            _draw_cdf(cdf, itls, colors[name], name)
            _draw_tail(tail, itls, colors[name], f"{name} (max {max(itls):.0f})")
        for key, style in (("during", "-"), ("outside", "--")):
            if pooled[name][key]:
                label = f"{name}, {'during' if key == 'during' else 'no'} long prefill"
                _draw_tail(split, pooled[name][key], colors[name], label, style)
    for ax, label in ((cdf, "ITL"), (tail, "ITL"), (split, "short requests' ITL")):
        _log_axis(ax, label)
        if itl_slo_ms is not None:
            ax.axvline(itl_slo_ms, color="grey", linestyle=":", label=f"SLO {itl_slo_ms:g} ms")
    cdf.set_ylabel("fraction of gaps")
    for ax in (tail, split):
        ax.set_yscale("log")
        ax.set_ylabel("fraction of gaps >= x")
    for ax in (cdf, tail, split):
        if ax.has_data():
            ax.legend(fontsize=8, loc="lower right" if ax is cdf else "lower left")

    for row, run in enumerate(timelines, start=2):
        ax = figure.add_subplot(grid[row, :])
        draw_timeline(ax, run, long_indices, colors[run.name], itl_slo_ms)

    if sweep is not None:
        goodput = figure.add_subplot(grid[num_rows - 1, :3])
        attainment = figure.add_subplot(grid[num_rows - 1, 3:])
        draw_sweep(
            goodput, attainment, sweep, {name.split("@")[0]: c for name, c in colors.items()}
        )

    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.4 / height_in))  # 0.4 in for the title
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _runs_at_common_rate(runs: list[RunResult], sweep: RateSweep) -> tuple[list[RunResult], float]:
    """The runs at the highest rate every configuration of the sweep ran."""
    names = list(sweep.highest_rates)
    ran = {name: {p.rate for p in sweep.points if p.name == name} for name in names}
    common = set.intersection(*ran.values()) if ran else set()
    rate = max(common) if common else sweep.rates[0]
    suffix = f"@{rate:g}"
    return [r for r in runs if r.name.endswith(suffix)], rate
