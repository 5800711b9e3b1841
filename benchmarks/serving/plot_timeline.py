"""The interference timeline of one run: every short-request gap drawn at the time
it ended (seconds after the run's first send, log y), with the long prompts'
prefill intervals shaded, so a gap inside a shaded band is one the interference
ratio counts as "during a prefill" (`interference.py`)."""

from __future__ import annotations

import itertools
from collections.abc import Collection

from benchmarks.serving.interference import prefill_intervals
from benchmarks.serving.result import RunResult


def draw_timeline(
    ax,
    run: RunResult,
    long_indices: Collection[int],
    color: str,
    itl_slo_ms: float | None = None,
) -> None:
    """Draws `run`'s timeline on the matplotlib axes `ax`."""
    from matplotlib import ticker

    start = min(r.send_time for r in run.records)
    for i, (begin, end) in enumerate(prefill_intervals(run.records, long_indices)):
        label = "long prompt: send to first token" if i == 0 else None
        ax.axvspan(begin - start, end - start, color="grey", alpha=0.2, label=label)
    ends, gaps = [], []
    for record in run.records:
        if record.index in long_indices or not record.is_success:
            continue
        for a, b in itertools.pairwise(record.token_times):
            ends.append(b - start)
            gaps.append((b - a) * 1e3)
    # Zero gaps (several tokens in one message) cannot sit on a log axis: they are
    # drawn at half the smallest positive gap.
    floor = min((g for g in gaps if g > 0), default=2e-3) / 2
    gaps = [max(g, floor) for g in gaps]
    ax.scatter(ends, gaps, s=6, color=color, label="short request's gap, at its end")
    if itl_slo_ms is not None:
        ax.axhline(itl_slo_ms, color="grey", linestyle=":", label=f"ITL SLO {itl_slo_ms:g} ms")
    ratio = run.metrics.interference.ratio
    ratio_text = "-" if ratio is None else f"{ratio:.2f}"
    ax.set_title(f"{run.name}, trial {run.trial + 1}: interference ratio {ratio_text}", fontsize=10)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("time since the first request (s)")
    ax.set_ylabel("ITL (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
