"""Metric names in Prometheus exposition text and in Grafana dashboards' PromQL."""

from __future__ import annotations

import json
import re
from pathlib import Path

_KVRELAY_NAME = re.compile(r"kvrelay:[A-Za-z0-9_:]+")


def exported_names(text: str) -> set[str]:
    """Sample names (with `_bucket`, `_total`, ... suffixes) in `/metrics` output."""
    return {
        re.split(r"[{ ]", line, maxsplit=1)[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def sample_value(text: str, name: str) -> float:
    """The value of the one sample `name{...}` in `/metrics` output."""
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if re.split(r"[{ ]", line, maxsplit=1)[0] == name
    ]
    assert len(values) == 1, f"{name}: {values}"
    return values[0]


def dashboard_queries(path: Path) -> list[str]:
    """Every PromQL expression of a dashboard: panel targets and template variables."""
    dashboard = json.loads(path.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def queried_names(queries: list[str]) -> set[str]:
    return {name for q in queries for name in _KVRELAY_NAME.findall(q)}
