"""`TokenTimer`: time to first token and inter-token latency of one request, the
same way in every service that streams tokens (the router, the decode worker)."""

from __future__ import annotations

import time

from telemetry.metrics import ServiceMetrics


class TokenTimer:
    """Observes a request's tokens as they arrive, into its service's histograms.

    A message may carry several tokens (a slow reader's backlog): each gets an equal
    share of the gap since the previous message, so the histogram counts tokens,
    not messages.
    """

    def __init__(self, metrics: ServiceMetrics, arrival: float | None = None) -> None:
        self.metrics = metrics
        self.arrival = time.monotonic() if arrival is None else arrival
        """`time.monotonic()` when the request arrived."""
        self.time_to_first_token_s: float | None = None
        self._last_token_at: float | None = None

    def observe(self, num_tokens: int) -> None:
        """`num_tokens` tokens arrived now (0 is a message without tokens: ignored)."""
        if num_tokens == 0:
            return
        now = time.monotonic()
        if self._last_token_at is None:
            self.time_to_first_token_s = now - self.arrival
            self.metrics.time_to_first_token.observe(self.time_to_first_token_s)
        else:
            gap = (now - self._last_token_at) / num_tokens
            for _ in range(num_tokens):
                self.metrics.inter_token_latency.observe(gap)
        self._last_token_at = now

    def finish(self) -> None:
        """The request ended normally: its end-to-end latency."""
        self.metrics.e2e_request_latency.observe(time.monotonic() - self.arrival)
