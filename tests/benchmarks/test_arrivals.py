"""Arrival offsets: all at once, or seeded gamma gaps with the asked-for mean."""

from __future__ import annotations

import itertools
import math

import pytest

from benchmarks.serving.arrivals import ArrivalProcess


def test_all_at_once_sends_everything_at_zero() -> None:
    arrivals = ArrivalProcess()
    assert arrivals.is_all_at_once
    assert arrivals.offsets(4) == [0.0, 0.0, 0.0, 0.0]
    assert arrivals.describe() == {"rate": "inf", "burstiness": 1.0, "seed": 0}


def test_poisson_offsets_are_seeded_increasing_and_have_the_rate() -> None:
    arrivals = ArrivalProcess(rate=4.0, seed=7)
    offsets = arrivals.offsets(4000)
    assert offsets[0] == 0.0
    assert all(b >= a for a, b in itertools.pairwise(offsets))
    assert offsets == ArrivalProcess(rate=4.0, seed=7).offsets(4000)
    assert offsets[:50] != ArrivalProcess(rate=4.0, seed=8).offsets(50)
    # 3999 gaps of mean 0.25 s: the total is within 5 % (about 3 standard errors).
    assert offsets[-1] == pytest.approx(3999 / 4.0, rel=0.05)


def test_burstiness_keeps_the_mean_but_widens_the_gaps() -> None:
    def gaps(burstiness: float) -> list[float]:
        offsets = ArrivalProcess(rate=2.0, burstiness=burstiness, seed=1).offsets(4000)
        return [b - a for a, b in itertools.pairwise(offsets)]

    def variance(values: list[float]) -> float:
        mean = sum(values) / len(values)
        return sum((v - mean) ** 2 for v in values) / len(values)

    bursty, poisson = gaps(0.25), gaps(1.0)
    assert sum(bursty) / len(bursty) == pytest.approx(0.5, rel=0.1)
    # Gamma gaps with mean m and shape k have variance m^2 / k: 1.0 vs 0.25.
    assert variance(bursty) == pytest.approx(1.0, rel=0.25)
    assert variance(poisson) == pytest.approx(0.25, rel=0.1)


@pytest.mark.parametrize(
    ("rate", "burstiness"), [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (1.0, math.inf)]
)
def test_bad_arrivals_are_refused(rate: float, burstiness: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        ArrivalProcess(rate, burstiness)
