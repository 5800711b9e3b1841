"""The error a CLI subcommand raises for a usage mistake (exit status 2)."""

from __future__ import annotations


class UsageError(Exception):
    """The command line asks for something invalid; the message says what to change."""
