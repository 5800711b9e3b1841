"""`kvrelay generate`: flags, and their mapping onto a local (in-process) or remote
(a router over gRPC) generation request."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from deploy.cli_errors import UsageError
from deploy.worker_flags import add_kv_cache_dtype_flag
from model.sampling_params import DEFAULT_MAX_TOKENS

EPILOG = """\
examples:
  kvrelay generate "Hello"                          # ask the router at localhost:50051
  kvrelay generate --target host:50051 --json "Hi" "Hello"
  kvrelay generate --local "Hello from kvrelay"      # no cluster: run the model here
  kvrelay generate --local --model dummy:135m --max-tokens 64 --temperature 0.8 --seed 7 "Once upon"
  kvrelay generate --local --model /models/SmolLM-135M --json "The capital of France is"
  kvrelay generate --local --model /models/tiny --prompt-token-ids 1,15043,29892
  kvrelay generate --local --prompts-file prompts.txt --json > out.jsonl
  kvrelay generate --chat "What is KV caching?" --system "Answer in one sentence."

--model takes a local Hugging Face directory (config.json, *.safetensors, optional
tokenizer.json) or a preset: dummy:tiny (tests) or dummy:135m (SmolLM-135M's shape),
both with seeded weights and a byte-level tokenizer. Nothing is downloaded.
With one prompt the text is streamed as it is generated; --json prints one object
per prompt per line: {"prompt_index", "token_ids", "text", "finish_reason"}.
"""

# A chat answer ends at the model's end-of-turn token, so its default only bounds it.
DEFAULT_CHAT_MAX_TOKENS = 256
# `model.loader.DTYPES` would import torch, which `kvrelay --help` must not.
DTYPES = ("auto", "float32", "bfloat16", "float16")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text from prompts",
        description="Generate text for one or more prompts.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_argument_group("where to run")
    where.add_argument("--local", action="store_true", help="run the model in this process")
    where.add_argument(
        "--target", metavar="HOST:PORT", help="a kvrelay router (default: localhost:50051)"
    )
    where.add_argument(
        "--api-key",
        default=os.environ.get("KVRELAY_API_KEY"),
        help="the router's API key (default: $KVRELAY_API_KEY)",
    )
    where.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="a router whose public port has TLS: the CA its certificate chains to (PEM)",
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default="dummy:tiny",
        help="HF directory or dummy:tiny / dummy:135m (default: %(default)s)",
    )
    model.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="auto = float32 on CPU, bfloat16 on CUDA"
    )
    model.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    add_kv_cache_dtype_flag(model)
    model.add_argument(
        "--enforce-eager",
        action="store_true",
        help="--local on CUDA: no CUDA graphs, every decode step run eagerly",
    )
    prompts = parser.add_argument_group("prompts")
    prompts.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt text")
    prompts.add_argument(
        "--prompt-token-ids",
        action="append",
        default=[],
        metavar="IDS",
        help="a prompt as comma-separated token ids, e.g. 1,2,3 (repeatable)",
    )
    prompts.add_argument("--prompts-file", type=Path, help="a text file with one prompt per line")
    prompts.add_argument(
        "--chat",
        action="append",
        default=[],
        metavar="TEXT",
        help="a user message, rendered with the model's chat template (repeatable: one "
        "conversation each)",
    )
    prompts.add_argument(
        "--system", metavar="TEXT", help="a system message before every --chat message"
    )
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument(
        "--max-tokens",
        type=int,
        help=f"default: {DEFAULT_MAX_TOKENS}, or {DEFAULT_CHAT_MAX_TOKENS} with --chat (an answer "
        "stops at its end-of-turn)",
    )
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    sampling.add_argument("--top-p", type=float, default=1.0, help="nucleus mass, (0, 1]")
    sampling.add_argument("--top-k", type=int, default=0, help="0 = off")
    sampling.add_argument("--seed", type=int, help="makes sampling reproducible")
    sampling.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS")
    sampling.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop string (repeatable; --target)",
    )
    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    output.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.local and args.target is not None:
        raise UsageError("choose one of --local (in this process) and --target (a router)")
    text_prompts = tuple(args.prompts) + _read_prompts_file(args.prompts_file)
    token_id_prompts = tuple(_parse_token_ids(s) for s in args.prompt_token_ids)
    if args.system is not None and not args.chat:
        raise UsageError("--system goes with --chat: give the user's message with --chat")
    conversations = tuple(_conversation(args.system, text) for text in args.chat)
    if args.max_tokens is None:
        args.max_tokens = DEFAULT_CHAT_MAX_TOKENS if conversations else DEFAULT_MAX_TOKENS
    if not args.local:
        return _run_remote(args, text_prompts, token_id_prompts, conversations)
    # Imported here so `kvrelay --help` does not pay for importing torch.
    from deploy.local_generate import LocalGenerateRequest, run_local_generate
    from model.sampling_params import SamplingParams

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            ignore_eos=args.ignore_eos,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    request = LocalGenerateRequest(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        kv_cache_dtype=args.kv_cache_dtype,
        enforce_eager=args.enforce_eager,
        text_prompts=text_prompts,
        token_id_prompts=token_id_prompts,
        conversations=conversations,
        params=params,
        is_json=args.json,
    )
    return run_local_generate(request)


def _run_remote(
    args: argparse.Namespace,
    text_prompts: tuple[str, ...],
    token_id_prompts: tuple[tuple[int, ...], ...],
    conversations: tuple[tuple[tuple[str, str], ...], ...],
) -> int:
    from deploy.remote_generate import RemoteGenerateRequest, run_remote_generate
    from protos import generator_pb2 as pb

    if not text_prompts and not token_id_prompts and not conversations:
        raise UsageError(
            "no prompt: give PROMPT text, --prompts-file, --prompt-token-ids or --chat"
        )
    sampling = pb.SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )
    if args.seed is not None:
        sampling.seed = args.seed
    requests = [pb.GenerateRequest(prompt=p, sampling=sampling) for p in text_prompts]
    requests += [
        pb.GenerateRequest(prompt_token_ids=ids, sampling=sampling) for ids in token_id_prompts
    ]
    requests += [
        pb.GenerateRequest(
            messages=[pb.ChatMessage(role=role, content=text) for role, text in turns],
            sampling=sampling,
        )
        for turns in conversations
    ]
    try:
        tls_ca = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    except OSError as err:
        raise UsageError(f"--tls-ca {args.tls_ca}: {err.strerror}") from None
    return run_remote_generate(
        RemoteGenerateRequest(
            args.target or "localhost:50051", tuple(requests), args.json, args.api_key, tls_ca
        )
    )


def _conversation(system: str | None, user: str) -> tuple[tuple[str, str], ...]:
    """(role, content) turns: the system message, if any, then the user's."""
    return ((("system", system),) if system is not None else ()) + (("user", user),)


def _read_prompts_file(path: Path | None) -> tuple[str, ...]:
    if path is None:
        return ()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --prompts-file {path}: {exc.strerror or exc}") from None
    return tuple(line for line in lines if line.strip())


def _parse_token_ids(text: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(
            f"--prompt-token-ids {text!r} is not a comma-separated list of integers"
        ) from None
    if any(i < 0 for i in ids):
        raise UsageError(f"--prompt-token-ids {text!r} has a negative id")
    return ids
