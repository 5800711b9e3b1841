"""Workloads: exact lengths, shared prefixes where promised, same seed same prompts."""

from __future__ import annotations

import json

import pytest

from benchmarks.serving.workload import (
    TOKEN_ID_LIMIT,
    BenchRequest,
    jsonl_workload,
    mixed_workload,
    random_workload,
    shared_prefix_workload,
)


def test_random_workload_has_exact_lengths_and_is_seeded() -> None:
    workload = random_workload(num_prompts=5, input_len=37, output_len=9, seed=3)
    assert [r.prompt_len for r in workload.requests] == [37] * 5
    assert [r.output_len for r in workload.requests] == [9] * 5
    assert all(0 <= t < TOKEN_ID_LIMIT for r in workload.requests for t in r.prompt_token_ids)
    assert workload == random_workload(5, 37, 9, seed=3)
    assert workload.requests != random_workload(5, 37, 9, seed=4).requests
    assert workload.params == {"num_prompts": 5, "input_len": 37, "output_len": 9, "seed": 3}


def test_shared_prefix_workload_shares_exactly_the_prefix_within_a_group() -> None:
    workload = shared_prefix_workload(
        num_groups=3, prompts_per_group=4, prefix_len=32, question_len=8, output_len=5
    )
    requests = workload.requests
    assert len(requests) == 12
    assert [r.prompt_len for r in requests] == [40] * 12
    assert [r.group for r in requests] == [f"group-{g}" for g in range(3) for _ in range(4)]
    for g in range(3):
        group = requests[4 * g : 4 * g + 4]
        assert len({r.prompt_token_ids[:32] for r in group}) == 1
        assert len({r.prompt_token_ids[32:] for r in group}) == 4
    prefixes = {r.prompt_token_ids[:32] for r in requests}
    assert len(prefixes) == 3


def test_mixed_workload_puts_a_long_prompt_every_n_requests() -> None:
    workload = mixed_workload(
        num_prompts=9, short_len=8, long_len=100, long_every=4, output_len=3, seed=1
    )
    assert [r.prompt_len for r in workload.requests] == [100, 8, 8, 8, 100, 8, 8, 8, 100]
    assert [r.group for r in workload.requests][:2] == ["long", "short"]


def test_jsonl_workload_reads_text_ids_and_output_lengths(tmp_path) -> None:
    path = tmp_path / "prompts.jsonl"
    lines = [
        json.dumps({"prompt": "hello"}),
        "",
        json.dumps({"prompt_token_ids": [5, 6, 7], "output_len": 2}),
        json.dumps({"prompt": "third"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    workload = jsonl_workload(path, output_len=11, num_prompts=2)
    assert workload.requests == (
        BenchRequest(prompt="hello", output_len=11),
        BenchRequest((5, 6, 7), output_len=2),
    )
    assert workload.requests[0].prompt_len is None


def test_jsonl_workload_names_the_bad_line(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"output_len": 3}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: set exactly one of"):
        jsonl_workload(path, output_len=4)


@pytest.mark.parametrize(
    "make",
    [
        lambda: random_workload(0, 8, 8),
        lambda: random_workload(2, 0, 8),
        lambda: shared_prefix_workload(1, 1, 8, 8, 0),
        lambda: mixed_workload(4, 8, 16, 0, 4),
    ],
)
def test_workloads_refuse_non_positive_sizes(make) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        make()
