"""Debian's `chromium`, headless: load a page, let its scripts run, save a screenshot
and return the DOM as rendered."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

# No sandbox (tests may run as root), no GPU, and nothing that calls home.
_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
)


def render(
    url: str,
    profile_dir: Path,
    screenshot: Path | None = None,
    window_size: tuple[int, int] = (1600, 1000),
    budget_ms: int = 20000,
) -> str:
    """The page's DOM after `budget_ms` of virtual time (scripts, fetches and timers
    run; the budget ends early once the page is idle); a screenshot if asked."""
    args = [
        CHROMIUM,
        *_FLAGS,
        f"--user-data-dir={profile_dir}",
        f"--window-size={window_size[0]},{window_size[1]}",
        f"--virtual-time-budget={budget_ms}",
    ]
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [*args, f"--screenshot={screenshot}", url],
            check=True,
            capture_output=True,
            timeout=120,
        )
    result = subprocess.run(
        [*args, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120
    )
    return result.stdout
