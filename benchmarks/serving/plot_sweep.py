"""The sweep's panels: goodput and SLO attainment against the arrival rate, each
point the median over the trials with the range as an error bar, and each
configuration's highest rate meeting the SLO marked (`sweep.py`)."""

from __future__ import annotations

from benchmarks.serving.sweep import MIN_SLO_ATTAINMENT, RateSweep, SweepPoint
from benchmarks.serving.trials import Spread


def _bars(spreads: list[Spread]) -> tuple[list[float], list[list[float]]]:
    medians = [s.median or 0.0 for s in spreads]
    below = [m - (s.min if s.min is not None else m) for m, s in zip(medians, spreads, strict=True)]
    above = [(s.max if s.max is not None else m) - m for m, s in zip(medians, spreads, strict=True)]
    return medians, [below, above]


def draw_sweep(goodput_ax, attainment_ax, sweep: RateSweep, colors: dict[str, str]) -> None:
    """Draws goodput vs rate on `goodput_ax` and attainment vs rate on `attainment_ax`."""
    for i, name in enumerate(sweep.highest_rates):
        color = colors.get(name, f"C{i}")
        points: list[SweepPoint] = [p for p in sweep.points if p.name == name]
        rates = [p.rate for p in points]
        for ax, key in ((goodput_ax, "goodput"), (attainment_ax, "slo_attainment")):
            medians, bars = _bars([getattr(p, key) for p in points])
            ax.errorbar(rates, medians, yerr=bars, marker="o", color=color, capsize=3, label=name)
        highest = sweep.highest_rates[name].median
        if highest is not None:
            attainment_ax.axvline(highest, color=color, linestyle=":", alpha=0.7)
    attainment_ax.axhline(MIN_SLO_ATTAINMENT, color="grey", linestyle="--", label="90%")
    goodput_ax.set_ylabel("goodput (req/s meeting the SLO)")
    attainment_ax.set_ylabel("fraction of requests meeting the SLO")
    attainment_ax.set_ylim(0, 1.05)
    from matplotlib import ticker

    for ax in (goodput_ax, attainment_ax):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("arrival rate (req/s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
