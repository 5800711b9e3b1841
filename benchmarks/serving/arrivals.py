"""When requests are sent: all at once, or a Poisson (or gamma) process.

The same convention as `vllm bench serve`: gaps between arrivals are drawn from a
gamma distribution with shape `burstiness` and mean `1 / rate`. Burstiness 1 is a
Poisson process; below 1 arrivals come in bursts, above 1 they are more even. The
first request is sent at time 0; a rate of `inf` sends everything at time 0.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class ArrivalProcess:
    """How requests arrive."""

    rate: float = math.inf
    """Requests per second on average; `inf` sends all at once."""
    burstiness: float = 1.0
    """Gamma shape of the gaps: 1 is Poisson, lower is burstier."""
    seed: int = 0
    """Seed of the gaps, so runs compared against each other see the same arrivals."""

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0 (or inf), got {self.rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError(f"burstiness must be a positive number, got {self.burstiness}")

    @property
    def is_all_at_once(self) -> bool:
        return math.isinf(self.rate)

    def offsets(self, num_requests: int) -> list[float]:
        """Send time of each request in seconds after the start, non-decreasing."""
        if self.is_all_at_once:
            return [0.0] * num_requests
        rng = random.Random(self.seed)
        scale = 1.0 / (self.rate * self.burstiness)
        offsets, now = [], 0.0
        for i in range(num_requests):
            if i > 0:
                now += rng.gammavariate(self.burstiness, scale)
            offsets.append(now)
        return offsets

    def describe(self) -> dict[str, object]:
        """JSON-ready description (`inf` written as the string "inf")."""
        rate = "inf" if self.is_all_at_once else self.rate
        return {"rate": rate, "burstiness": self.burstiness, "seed": self.seed}
