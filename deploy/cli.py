"""`kvrelay`: the command-line entry point.

Each subcommand lives in its own module, which exposes `register(subparsers)`: it
adds its parser and sets `run=<function(args) -> int>` as a default. Adding a
subcommand (`serve`, `up`, `status`, `bench`) is one module plus one line in
`SUBCOMMAND_MODULES`; this file does not change otherwise. Subcommand modules
import heavy things (torch, the model) inside `run`, so `--help` stays fast.

Exit status: 0 success, 1 runtime failure, 2 usage error. Errors are one line on
stderr; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from deploy.cli_errors import UsageError

SUBCOMMAND_MODULES = (
    "deploy.generate_command",
    "deploy.serve_command",
    "deploy.up_command",
    "deploy.status_command",
    "deploy.bench_command",
    "deploy.inspect_command",
    "deploy.certs_command",
)

EXIT_RUNTIME_ERROR = 1
EXIT_USAGE = 2


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (not the whole usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="kvrelay",
        description="kvrelay: disaggregated LLM serving (router, prefill and decode workers, KV store).",
        epilog="Run `kvrelay COMMAND --help` for a command's options and examples.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    debug = getattr(args, "debug", False)
    prog = f"kvrelay {args.command}"
    try:
        return args.run(args)
    except UsageError as exc:
        return _report(prog, exc, EXIT_USAGE, debug)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0  # `kvrelay generate ... | head` is not an error
    except Exception as exc:
        return _report(prog, exc, EXIT_RUNTIME_ERROR, debug)


def _report(prog: str, exc: Exception, status: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    # Our own error types carry a message written for the user; anything else is
    # prefixed with its type so it is still recognisable.
    from_us = type(exc).__name__ in (
        "UsageError",
        "ModelLoadError",
        "RouterUnreachable",
        "RouterError",
        "LaunchError",
        "DashboardError",
    )
    message = str(exc) if from_us else f"{type(exc).__name__}: {exc}"
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
