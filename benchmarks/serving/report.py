"""The terminal table: one column per run, in `vllm bench serve`'s vocabulary."""

from __future__ import annotations

from benchmarks.serving.metrics import BenchMetrics, LatencyStats
from benchmarks.serving.result import Comparison, RunResult

LATENCIES = (
    ("ttft_ms", "TTFT (ms)"),
    ("tpot_ms", "TPOT (ms)"),
    ("itl_ms", "ITL (ms)"),
    ("e2e_ms", "E2E latency (ms)"),
)


def _number(value: float | int | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def _rows(metrics: BenchMetrics) -> list[tuple[str, str]]:
    rows = [
        ("Requests completed / failed", f"{metrics.num_completed} / {metrics.num_failed}"),
        ("Duration (s)", _number(metrics.duration_s)),
        ("Prompt tokens", _number(metrics.num_prompt_tokens)),
        ("Output tokens", _number(metrics.num_output_tokens)),
        ("Request throughput (req/s)", _number(metrics.request_throughput, 3)),
        ("Output throughput (tok/s)", _number(metrics.output_throughput)),
        ("Total token throughput (tok/s)", _number(metrics.total_token_throughput)),
        ("Goodput (req/s)", _number(metrics.goodput, 3)),
        (
            "Prefix-cache hit rate",
            "-"
            if metrics.prefix_cache_hit_rate is None
            else f"{metrics.prefix_cache_hit_rate:.1%}",
        ),
    ]
    for attr, label in LATENCIES:
        stats: LatencyStats = getattr(metrics, attr)
        for stat in ("mean", "p50", "p90", "p99"):
            rows.append((f"{label} {stat}", _number(getattr(stats, stat))))
    return rows


def format_table(runs: list[RunResult], comparison: Comparison | None = None) -> str:
    """A fixed-width table with a row per metric and a column per run."""
    columns = [dict(_rows(run.metrics)) for run in runs]
    labels = [label for label, _ in _rows(runs[0].metrics)]
    label_width = max(len(label) for label in labels)
    widths = [max(14, len(run.name)) for run in runs]
    header = " " * label_width + "".join(
        f"  {run.name:>{w}}" for run, w in zip(runs, widths, strict=True)
    )
    lines = [header, "-" * len(header)]
    for label in labels:
        cells = "".join(f"  {col[label]:>{w}}" for col, w in zip(columns, widths, strict=True))
        lines.append(f"{label:<{label_width}}{cells}")
    if comparison is not None:
        c = comparison
        verdict = "met" if c.is_met else "MISSED"
        lines += [
            "-" * len(header),
            f"{c.metric}: {c.candidate} {_number(c.candidate_value)} vs "
            f"{c.baseline} {_number(c.baseline_value)}: ratio {_number(c.ratio, 3)}, "
            f"difference {_number(c.difference)} (goal {c.goal}: {verdict})",
        ]
    return "\n".join(lines)
