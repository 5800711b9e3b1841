"""The comparisons' cluster layouts: which worker runs on which core, which prompts
a decode worker prefills itself, and its chunked-prefill budget; and that every
comparison's goals name configurations it runs."""

from __future__ import annotations

import os

import pytest

from benchmarks.serving.compare import COMPARISONS, LayoutOptions
from benchmarks.serving.launcher import (
    DEFAULT_DECODE_TOKEN_BUDGET,
    LOCAL_PREFILL_ALL,
    colocated_layout,
    conditional_layout,
    disaggregated_layout,
)
from decode_worker.scheduler import SchedulerConfig

# Two cores this process may use (the same one twice on a one-core machine).
ALLOWED = sorted(os.sched_getaffinity(0))
A, B = ALLOWED[0], ALLOWED[-1]


def test_the_default_budget_is_the_decode_schedulers() -> None:
    assert DEFAULT_DECODE_TOKEN_BUDGET == SchedulerConfig().max_num_batched_tokens == 512


def test_three_layouts_on_the_same_cores() -> None:
    colocated = colocated_layout("dummy:tiny", (A, B), decode_token_budget=128)
    disaggregated = disaggregated_layout("dummy:tiny", (A, B))
    conditional = conditional_layout("dummy:tiny", (A, B), max_local_prefill_len=256)
    assert (colocated.prefill_cores, colocated.decode_cores) == ((), (A, B))
    assert (colocated.max_local_prefill_len, colocated.decode_token_budget) == (
        LOCAL_PREFILL_ALL,
        128,
    )
    assert (disaggregated.prefill_cores, disaggregated.decode_cores) == ((A,), (B,))
    assert disaggregated.max_local_prefill_len == 0
    assert (conditional.name, conditional.prefill_cores, conditional.decode_cores) == (
        "conditional",
        (A,),
        (B,),
    )
    assert conditional.max_local_prefill_len == 256
    assert disaggregated.decode_token_budget == conditional.decode_token_budget == 512


def test_summaries_say_who_prefills_and_the_budget() -> None:
    assert colocated_layout("dummy:tiny", (A, B)).summary() == (
        f"colocated: decode on cores {A},{B} (prefilling every prompt), token budget 512"
    )
    assert colocated_layout("dummy:tiny", (B,), decode_token_budget=64).summary() == (
        f"colocated: decode on core {B} (prefilling every prompt), token budget 64"
    )
    assert disaggregated_layout("dummy:tiny", (A, B)).summary() == (
        f"disaggregated: prefill on core {A}, decode on core {B}, token budget 512"
    )
    assert conditional_layout("dummy:tiny", (A, B), 256).summary() == (
        f"conditional: prefill on core {A}, decode on core {B} "
        "(prefilling prompts up to 256 tokens), token budget 512"
    )


def test_bad_layouts_are_refused() -> None:
    with pytest.raises(ValueError, match="max_local_prefill_len must be >= 1, got 0"):
        conditional_layout("dummy:tiny", (A, B), 0)
    with pytest.raises(ValueError, match="decode_token_budget must be >= 1, got 0"):
        colocated_layout("dummy:tiny", (A, B), decode_token_budget=0)


@pytest.mark.parametrize("kind", sorted(COMPARISONS))
def test_every_goal_names_configurations_its_comparison_runs(kind: str) -> None:
    spec = COMPARISONS[kind]
    names = [layout.name for layout in spec.layouts(LayoutOptions("dummy:tiny", (A, B)))]
    assert len(set(names)) == len(names)
    for goal in spec.goals:
        assert {goal.candidate, goal.baseline} - {None} <= set(names), goal.describe()


def test_the_three_way_comparison_and_its_options() -> None:
    options = LayoutOptions("dummy:tiny", (A, B), colocated_cores=(B,), colocated_token_budget=96)
    colocated, disaggregated, conditional = COMPARISONS["colocated-disagg-conditional"].layouts(
        options
    )
    assert (colocated.decode_cores, colocated.decode_token_budget) == ((B,), 96)
    assert (disaggregated.prefill_cores, disaggregated.decode_cores) == ((A,), (B,))
    assert (conditional.name, conditional.max_local_prefill_len) == ("conditional", 256)
    budgets = COMPARISONS["colocated-token-budget"].layouts(options)
    assert [(b.name, b.decode_token_budget, b.decode_cores) for b in budgets] == [
        ("colocated-512", 512, (B,)),
        ("colocated-1024", 1024, (B,)),
        ("colocated-256", 256, (B,)),
        ("colocated-128", 128, (B,)),
        ("colocated-64", 64, (B,)),
    ]
