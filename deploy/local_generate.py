"""`kvrelay generate --local`: load a model in this process and generate.

Runs the reference loop in `model.generation` (the decode engine replaces it later).
One prompt in text mode is streamed as it is generated; otherwise results are
printed per prompt, in prompt order, when all are done.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import TextIO

import torch

from deploy.cli_errors import UsageError
from model.generation import GenerationResult, generate_stream
from model.loader import LoadedModel, load_model
from model.sampling import SamplingParams
from model.tokenizer import IncrementalDetokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LocalGenerateRequest:
    """What `kvrelay generate --local` was asked to do."""

    model: str
    """HF model directory or dummy:* preset."""
    dtype: str
    """`auto` or a key of `_DTYPES`."""
    device: str
    text_prompts: tuple[str, ...]
    """Prompts as text (need a tokenizer); run before `token_id_prompts`."""
    token_id_prompts: tuple[tuple[int, ...], ...]
    params: SamplingParams
    is_json: bool
    """One JSON object per prompt per line instead of plain text."""

    def __post_init__(self) -> None:
        if not self.text_prompts and not self.token_id_prompts:
            raise UsageError("no prompt: give PROMPT text, --prompts-file or --prompt-token-ids")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise UsageError(f"unknown dtype {self.dtype!r}")
        if any(not ids for ids in self.token_id_prompts):
            raise UsageError("an empty --prompt-token-ids prompt")


def run_local_generate(request: LocalGenerateRequest, out: TextIO | None = None) -> int:
    """Generate and print to `out` (default: stdout); returns the exit status."""
    out = out or sys.stdout
    loaded = load_model(
        request.model,
        dtype=None if request.dtype == "auto" else _DTYPES[request.dtype],
        device=request.device,
    )
    prompts = _tokenize(loaded, request)
    for i, prompt in enumerate(prompts):
        if any(not 0 <= t < loaded.config.vocab_size for t in prompt):
            raise UsageError(
                f"prompt {i} has token ids outside the vocab [0, {loaded.config.vocab_size})"
            )
    if len(prompts) == 1 and not request.is_json:
        _stream_one(loaded, prompts[0], request.params, out)
        return 0
    results = [GenerationResult() for _ in prompts]
    for event in generate_stream(loaded, prompts, request.params):
        results[event.seq_idx].token_ids.append(event.token_id)
        results[event.seq_idx].finish_reason = event.finish_reason
    for i, result in enumerate(results):
        text = None if loaded.tokenizer is None else loaded.tokenizer.decode(result.token_ids)
        if request.is_json:
            record = {
                "prompt_index": i,
                "token_ids": result.token_ids,
                "text": text,
                "finish_reason": result.finish_reason.value if result.finish_reason else None,
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            out.write((text if text is not None else _ids_text(result.token_ids)) + "\n")
    out.flush()
    return 0


def _tokenize(loaded: LoadedModel, request: LocalGenerateRequest) -> list[list[int]]:
    if request.text_prompts and loaded.tokenizer is None:
        raise UsageError(
            f"model {request.model} has no tokenizer.json, so it cannot take text prompts; "
            "use --prompt-token-ids"
        )
    prompts = (
        [loaded.tokenizer.encode(text) for text in request.text_prompts] if loaded.tokenizer else []
    )
    return prompts + [list(ids) for ids in request.token_id_prompts]


def _stream_one(
    loaded: LoadedModel, prompt: list[int], params: SamplingParams, out: TextIO
) -> None:
    detokenizer = IncrementalDetokenizer(loaded.tokenizer) if loaded.tokenizer else None
    for event in generate_stream(loaded, [prompt], params):
        if detokenizer is None:
            out.write(f"{event.token_id} ")
        else:
            out.write(detokenizer.add([event.token_id]))
        out.flush()
    out.write((detokenizer.flush() if detokenizer else "") + "\n")
    out.flush()


def _ids_text(token_ids: list[int]) -> str:
    return " ".join(str(t) for t in token_ids)
