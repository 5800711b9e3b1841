"""API keys on the public API: `--api-keys-file` (one key per line) or
`KVRELAY_API_KEYS` (comma- or newline-separated).

Every `Generate` call and every `/v1/*` HTTP request must carry
`authorization: Bearer KEY`; without a valid key it is refused before any work
(UNAUTHENTICATED, HTTP 401). Health and reflection stay open. Keys are compared as
SHA-256 digests with `hmac.compare_digest`, against every key, so neither a key's
content nor which key matched shows in the time an answer takes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
from pathlib import Path

ENV_VAR = "KVRELAY_API_KEYS"
MAX_KEY_BYTES = 512


class ApiKeyError(ValueError):
    """A keys file or variable that cannot be used; the message says what to change."""


class ApiKeys:
    """The keys a router accepts; empty: the API is open (a warning at start-up)."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._digests = [_digest(k) for k in dict.fromkeys(keys)]

    @classmethod
    def load(cls, keys_file: str | None, environ: dict[str, str] | None = None) -> ApiKeys:
        """The keys of `--api-keys-file`, else of `KVRELAY_API_KEYS`, else none."""
        if keys_file is not None:
            try:
                text = Path(keys_file).read_text()
            except OSError as err:
                raise ApiKeyError(f"--api-keys-file {keys_file}: {err.strerror}") from None
            source = f"--api-keys-file {keys_file}"
        else:
            text = (environ if environ is not None else os.environ).get(ENV_VAR, "")
            source = ENV_VAR
        keys = [k.strip() for k in text.replace(",", "\n").splitlines()]
        keys = [k for k in keys if k and not k.startswith("#")]
        for key in keys:
            if len(key.encode()) > MAX_KEY_BYTES or not key.isprintable() or " " in key:
                raise ApiKeyError(
                    f"{source}: a key is over {MAX_KEY_BYTES} bytes or holds spaces or "
                    "control characters; use printable keys, one per line"
                )
        if keys_file is not None and not keys:
            raise ApiKeyError(f"--api-keys-file {keys_file} holds no key")
        return cls(keys)

    @property
    def is_required(self) -> bool:
        return bool(self._digests)

    def salt_of(self, authorization: str | None) -> str | None:
        """The prefix-cache scope of the key in `authorization` (`--salt-per-key`):
        its digest, so requests under different keys never share a block; None
        without a key."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        return _digest(key.strip()).hex()

    def allows(self, authorization: str | None) -> bool:
        """Whether an `authorization` header value (`Bearer KEY`) carries a valid key;
        always True when no keys are set."""
        if not self._digests:
            return True
        scheme, _, key = (authorization or "").partition(" ")
        given = _digest(key.strip() if scheme.lower() == "bearer" else "")
        matched = False
        for digest in self._digests:  # every one, whatever matched
            matched |= hmac.compare_digest(digest, given)
        return matched


REFUSAL = "a valid API key is required: send the header `authorization: Bearer KEY`"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
