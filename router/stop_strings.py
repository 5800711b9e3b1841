"""Stop-string matching on streamed text.

Text arrives in deltas; a stop string can straddle deltas. The matcher holds back
the shortest tail of the text that could still grow into a stop string, so that
neither the stop string nor anything after it is ever sent.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Feed text deltas; get back what is safe to send and whether a stop matched."""

    def __init__(self, stop: Sequence[str]) -> None:
        assert all(stop), "stop strings are validated non-empty"
        self._stop = tuple(stop)
        self._pending = ""  # text received but not yet released

    @property
    def is_active(self) -> bool:
        return bool(self._stop)

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text to send now, whether a stop string matched). After a
        match the caller must stop generation; later calls are not expected."""
        if not self._stop:
            return delta, False
        text = self._pending + delta
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            return text[:cut], True
        held = self._held_back_len(text)
        self._pending = text[len(text) - held :] if held else ""
        return text[: len(text) - held], False

    def flush(self) -> str:
        """At the end of generation: whatever was held back, since no stop matched."""
        text, self._pending = self._pending, ""
        return text

    def _held_back_len(self, text: str) -> int:
        # Longest suffix of `text` that is a proper prefix of some stop string.
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
