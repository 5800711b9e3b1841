"""Reads spans back from Phoenix's REST API (`/v1/projects/{project}/spans`)."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request


def phoenix_spans(url: str, project: str = "default", **filters: str) -> list[dict]:
    """Every span of `project` matching `filters` (e.g. `trace_id=`), all pages."""
    spans: list[dict] = []
    params = {"limit": "1000", **filters}
    while True:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(
            f"{url}/v1/projects/{project}/spans?{query}", timeout=10
        ) as response:
            body = json.load(response)
        spans += body["data"]
        if not body.get("next_cursor"):
            return spans
        params["cursor"] = body["next_cursor"]


def wait_for_trace(
    url: str, request_id: str, span_names: set[str], timeout_s: float = 60.0
) -> list[dict]:
    """The spans of the trace whose root carries `kvrelay.request_id == request_id`,
    once all of `span_names` have arrived (export is batched, so they trickle in)."""
    deadline = time.monotonic() + timeout_s
    names: set[str] = set()
    while time.monotonic() < deadline:
        roots = [
            s
            for s in phoenix_spans(url, name="generate")
            if s["attributes"].get("kvrelay.request_id") == request_id
        ]
        if roots:
            trace = phoenix_spans(url, trace_id=roots[0]["context"]["trace_id"])
            names = {s["name"] for s in trace}
            if span_names <= names:
                return trace
        time.sleep(0.5)
    raise TimeoutError(f"trace of {request_id} incomplete in Phoenix: has {sorted(names)}")
