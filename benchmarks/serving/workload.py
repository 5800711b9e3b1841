"""What a benchmark sends: requests with exact prompt and output lengths.

Prompts are token ids, not text, so their lengths are exact whatever the tokenizer;
ids are drawn from the byte range [0, 256), which every model here accepts (the
dummy presets' byte-level tokenizer and any real vocabulary). Requests carry
`ignore_eos` and a fixed `max_tokens` (set by the client), so every request
generates exactly `output_len` tokens. The same seed gives the same workload.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

# Ids below this are plain bytes in the byte-level tokenizer (BOS/EOS/pad follow).
TOKEN_ID_LIMIT = 256
# The group of a mixed workload's long prompts (the short ones are "short").
LONG_GROUP = "long"


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload."""

    prompt_token_ids: tuple[int, ...] = ()
    """The prompt as token ids; empty when `prompt` is set."""
    prompt: str = ""
    """The prompt as text (JSONL workloads); the router tokenizes it."""
    output_len: int = 16
    """Tokens to generate (sent as max_tokens, EOS ignored)."""
    group: str = ""
    """Label for reports: the shared-prefix group, or "long"/"short" in mixed loads."""

    def __post_init__(self) -> None:
        if bool(self.prompt_token_ids) == bool(self.prompt):
            raise ValueError("set exactly one of prompt_token_ids and prompt")
        if self.output_len < 1:
            raise ValueError(f"output_len must be >= 1, got {self.output_len}")

    @property
    def prompt_len(self) -> int | None:
        """Prompt tokens, when known before sending (token-id prompts)."""
        return len(self.prompt_token_ids) if self.prompt_token_ids else None


@dataclass(frozen=True)
class Workload:
    """A named list of requests, in the order they are sent."""

    name: str
    requests: tuple[BenchRequest, ...]
    params: dict[str, object] = field(default_factory=dict)
    """The generator's parameters, recorded in the JSON result."""

    def __post_init__(self) -> None:
        if not self.requests:
            raise ValueError(f"workload {self.name!r} has no requests")

    @property
    def long_indices(self) -> frozenset[int]:
        """Positions of the long prompts of a mixed workload (group "long")."""
        return frozenset(i for i, r in enumerate(self.requests) if r.group == LONG_GROUP)


def _tokens(rng: random.Random, length: int) -> tuple[int, ...]:
    return tuple(rng.randrange(TOKEN_ID_LIMIT) for _ in range(length))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def random_workload(num_prompts: int, input_len: int, output_len: int, seed: int = 0) -> Workload:
    """`num_prompts` independent prompts of exactly `input_len` tokens."""
    _check_positive(num_prompts=num_prompts, input_len=input_len, output_len=output_len)
    rng = random.Random(seed)
    requests = tuple(
        BenchRequest(_tokens(rng, input_len), output_len=output_len) for _ in range(num_prompts)
    )
    params = {"num_prompts": num_prompts, "input_len": input_len, "output_len": output_len}
    return Workload("random", requests, {**params, "seed": seed})


def shared_prefix_workload(
    num_groups: int,
    prompts_per_group: int,
    prefix_len: int,
    question_len: int,
    output_len: int,
    seed: int = 0,
) -> Workload:
    """`num_groups` system prompts of `prefix_len` tokens, each followed by
    `prompts_per_group` different questions of `question_len` tokens.

    Requests are sent group after group (SGLang's `generated-shared-prefix` order),
    so the first request of a group computes the prefix and the rest can reuse it.
    """
    _check_positive(
        num_groups=num_groups,
        prompts_per_group=prompts_per_group,
        prefix_len=prefix_len,
        question_len=question_len,
        output_len=output_len,
    )
    rng = random.Random(seed)
    requests = []
    for g in range(num_groups):
        prefix = _tokens(rng, prefix_len)
        for _ in range(prompts_per_group):
            prompt = prefix + _tokens(rng, question_len)
            requests.append(BenchRequest(prompt, output_len=output_len, group=f"group-{g}"))
    params = {
        "num_groups": num_groups,
        "prompts_per_group": prompts_per_group,
        "prefix_len": prefix_len,
        "question_len": question_len,
        "output_len": output_len,
        "seed": seed,
    }
    return Workload("shared-prefix", tuple(requests), params)


def mixed_workload(
    num_prompts: int,
    short_len: int,
    long_len: int,
    long_every: int,
    output_len: int,
    seed: int = 0,
) -> Workload:
    """Short prompts with a long one every `long_every` requests (the 1st, then the
    `long_every + 1`-th, ...), so long prompts arrive while short ones decode."""
    _check_positive(
        num_prompts=num_prompts,
        short_len=short_len,
        long_len=long_len,
        long_every=long_every,
        output_len=output_len,
    )
    rng = random.Random(seed)
    requests = []
    for i in range(num_prompts):
        is_long = i % long_every == 0
        length, group = (long_len, LONG_GROUP) if is_long else (short_len, "short")
        requests.append(BenchRequest(_tokens(rng, length), output_len=output_len, group=group))
    params = {
        "num_prompts": num_prompts,
        "short_len": short_len,
        "long_len": long_len,
        "long_every": long_every,
        "output_len": output_len,
        "seed": seed,
    }
    return Workload("mixed", tuple(requests), params)


def jsonl_workload(path: Path, output_len: int, num_prompts: int | None = None) -> Workload:
    """Requests from a JSONL file, one object per line: `"prompt"` (text) or
    `"prompt_token_ids"` (list of ints), and optionally `"output_len"` (else
    `output_len`). Blank lines are skipped; the first `num_prompts` are used."""
    requests = []
    for line_no, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            request = BenchRequest(
                prompt_token_ids=tuple(item.get("prompt_token_ids", ())),
                prompt=item.get("prompt", ""),
                output_len=int(item.get("output_len", output_len)),
            )
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}:{line_no}: {exc}") from exc
        requests.append(request)
        if num_prompts is not None and len(requests) == num_prompts:
            break
    params = {"path": str(path), "output_len": output_len, "num_prompts": len(requests)}
    return Workload("jsonl", tuple(requests), params)
