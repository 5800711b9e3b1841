"""`kvrelay generate --local`: load a model in this process and generate.

Runs every prompt through one `DecodeEngine`, the continuous-batching engine the decode
workers serve with (colocated: it prefills the prompts itself), so all prompts share
each forward pass. One prompt in text mode is streamed as it is generated; otherwise
results are printed per prompt, in prompt order, when all are done.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

from decode_worker.batch_generate import generate_with_engine
from decode_worker.engine import TokenOutput
from decode_worker.scheduler import RequestTooLargeError
from deploy.cli_errors import UsageError
from model.chat_template import (
    ChatMessage,
    ChatTemplate,
    ChatTemplateError,
    chat_template_for_model,
)
from model.loader import LoadedModel, load_model, parse_dtype
from model.sampling_params import FinishReason, SamplingParams
from model.tokenizer import IncrementalDetokenizer


@dataclass(frozen=True)
class LocalGenerateRequest:
    """What `kvrelay generate --local` was asked to do."""

    model: str
    """HF model directory or dummy:* preset."""
    dtype: str
    """`auto` or a name `model.loader.parse_dtype` knows."""
    device: str
    text_prompts: tuple[str, ...]
    """Prompts as text (need a tokenizer); run before `token_id_prompts`."""
    token_id_prompts: tuple[tuple[int, ...], ...]
    params: SamplingParams
    is_json: bool
    """One JSON object per prompt per line instead of plain text."""
    conversations: tuple[tuple[tuple[str, str], ...], ...] = ()
    """(role, content) turns, rendered with the model's chat template; run last."""
    kv_cache_dtype: str = "auto"
    """How the engine's pool stores K/V (`kvstore.kv_format`)."""
    enforce_eager: bool = False
    """On CUDA: no CUDA graphs for decode steps."""

    def __post_init__(self) -> None:
        if not self.text_prompts and not self.token_id_prompts and not self.conversations:
            raise UsageError(
                "no prompt: give PROMPT text, --prompts-file, --prompt-token-ids or --chat"
            )
        try:
            parse_dtype(self.dtype)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if any(not ids for ids in self.token_id_prompts):
            raise UsageError("an empty --prompt-token-ids prompt")


def run_local_generate(request: LocalGenerateRequest, out: TextIO | None = None) -> int:
    """Generate and print to `out` (default: stdout); returns the exit status."""
    out = out or sys.stdout
    loaded = load_model(
        request.model,
        dtype=parse_dtype(request.dtype),
        device=request.device,
    )
    prompts = _tokenize(loaded, request)
    for i, prompt in enumerate(prompts):
        if any(not 0 <= t < loaded.config.vocab_size for t in prompt):
            raise UsageError(
                f"prompt {i} has token ids outside the vocab [0, {loaded.config.vocab_size})"
            )
    try:
        outputs = generate_with_engine(
            loaded, prompts, request.params, request.kv_cache_dtype, request.enforce_eager
        )
    except RequestTooLargeError as exc:
        raise UsageError(str(exc)) from None
    if len(prompts) == 1 and not request.is_json:
        _stream_one(loaded, outputs, out)
        return 0
    token_ids: list[list[int]] = [[] for _ in prompts]
    finish_reasons: list[FinishReason | None] = [None] * len(prompts)
    for prompt_idx, output in outputs:
        token_ids[prompt_idx].append(output.token_id)
        finish_reasons[prompt_idx] = output.finish_reason
    for i, (ids, reason) in enumerate(zip(token_ids, finish_reasons, strict=True)):
        text = None if loaded.tokenizer is None else loaded.tokenizer.decode(ids)
        if request.is_json:
            record = {
                "prompt_index": i,
                "token_ids": ids,
                "text": text,
                "finish_reason": reason.value if reason else None,
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            out.write((text if text is not None else _ids_text(ids)) + "\n")
    out.flush()
    return 0


def _tokenize(loaded: LoadedModel, request: LocalGenerateRequest) -> list[list[int]]:
    if (request.text_prompts or request.conversations) and loaded.tokenizer is None:
        raise UsageError(
            f"model {request.model} has no tokenizer.json, so it cannot take text prompts; "
            "use --prompt-token-ids"
        )
    prompts = (
        [loaded.tokenizer.encode(text) for text in request.text_prompts] if loaded.tokenizer else []
    )
    prompts += [list(ids) for ids in request.token_id_prompts]
    return prompts + _render_conversations(loaded, request)


def _render_conversations(loaded: LoadedModel, request: LocalGenerateRequest) -> list[list[int]]:
    """Each conversation rendered as the router renders it: the model's chat template,
    then the text tokenized without an extra BOS (the template writes its own)."""
    if not request.conversations:
        return []
    source = chat_template_for_model(request.model)
    if source is None:
        raise UsageError(
            f"model {request.model} has no chat template (chat_template.jinja or "
            "tokenizer_config.json's chat_template); give PROMPT text instead of --chat"
        )
    tokenizer = loaded.tokenizer
    assert tokenizer is not None  # checked by the caller
    try:
        template = ChatTemplate(
            source,
            bos_token=tokenizer.special_token_text(tokenizer.bos_token_id),
            eos_token=tokenizer.special_token_text(tokenizer.eos_token_id),
        )
        texts = [
            template.render([ChatMessage(role, text) for role, text in turns])
            for turns in request.conversations
        ]
    except ChatTemplateError as err:
        raise UsageError(str(err)) from None
    return [tokenizer.encode(text, add_bos=False) for text in texts]


def _stream_one(
    loaded: LoadedModel, outputs: Iterator[tuple[int, TokenOutput]], out: TextIO
) -> None:
    detokenizer = IncrementalDetokenizer(loaded.tokenizer) if loaded.tokenizer else None
    for _, output in outputs:
        if detokenizer is None:
            out.write(f"{output.token_id} ")
        else:
            out.write(detokenizer.add([output.token_id]))
        out.flush()
    out.write((detokenizer.flush() if detokenizer else "") + "\n")
    out.flush()


def _ids_text(token_ids: list[int]) -> str:
    return " ".join(str(t) for t in token_ids)
