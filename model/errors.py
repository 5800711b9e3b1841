"""The one error type for a model that cannot be loaded.

Every way loading can fail (missing file, unsupported architecture, a tensor of the
wrong shape) raises `ModelLoadError` with a one-line message that names the
problem, so the CLI and the workers can report it without a traceback.
"""

from __future__ import annotations


class ModelLoadError(Exception):
    """A model (config, weights or tokenizer) cannot be loaded; the message is one line."""
