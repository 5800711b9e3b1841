"""A local trace UI for machines without Docker: Arize Phoenix as a child process.

`kvrelay up --dashboard` calls `start_dashboard`, gives every process of the cluster
`dashboard.otel_env()` (so their OTLP export lands in Phoenix), prints
`dashboard.url`, and calls `dashboard.stop()` on the way out. Phoenix comes from
the optional extra `kvrelay[dashboard]`; it runs in its own process so its web
server and database never share an interpreter with a worker.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


class DashboardError(RuntimeError):
    """Phoenix is not installed, or did not come up."""


@dataclass(frozen=True)
class DashboardConfig:
    """Where Phoenix listens and keeps its data."""

    workdir: Path
    """Phoenix's working directory (its SQLite database and logs)."""
    host: str = "127.0.0.1"
    """Address Phoenix binds; `0.0.0.0` to reach it from other machines."""
    advertise_host: str | None = None
    """Address the cluster's processes export to (default: `host`, or this
    machine's name when `host` is `0.0.0.0`, so Ray workers on other nodes reach it)."""
    port: int = 6006
    """Web UI and REST API port (Phoenix also accepts OTLP/HTTP here)."""
    grpc_port: int = 4317
    """OTLP/gRPC receiver port, where the cluster's spans go."""
    startup_timeout_s: float = 120.0
    """How long to wait for the UI and the receiver to accept connections."""

    def __post_init__(self) -> None:
        for name in ("port", "grpc_port"):
            if not 0 < getattr(self, name) < 65536:
                raise ValueError(f"{name} must be in 1..65535, got {getattr(self, name)}")
        if self.port == self.grpc_port:
            raise ValueError(f"port and grpc_port must differ, both are {self.port}")
        if self.startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s must be positive, got {self.startup_timeout_s}")


class PhoenixDashboard:
    """A running Phoenix server; `stop()` ends it (and is safe to call twice)."""

    def __init__(self, config: DashboardConfig, process: subprocess.Popen) -> None:
        self.config = config
        self.process = process
        host = config.advertise_host or config.host
        if host == "0.0.0.0":
            host = socket.gethostname()
        self._host = host

    @property
    def url(self) -> str:
        """The UI (and REST API) address, as a person on this machine opens it."""
        ui_host = "127.0.0.1" if self.config.host == "0.0.0.0" else self.config.host
        return f"http://{ui_host}:{self.config.port}"

    @property
    def otlp_endpoint(self) -> str:
        return f"http://{self._host}:{self.config.grpc_port}"

    def otel_env(self) -> dict[str, str]:
        """The `OTEL_*` variables that point a cluster's span export at Phoenix."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.otlp_endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        }

    def log(self) -> str:
        path = self.config.workdir / "phoenix.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self, grace_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def is_phoenix_installed(python: str = sys.executable) -> bool:
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('phoenix') is None)"
    return subprocess.run([python, "-c", probe], check=False).returncode == 0


def start_dashboard(config: DashboardConfig, python: str = sys.executable) -> PhoenixDashboard:
    """Starts Phoenix with `python` and returns once its UI and OTLP receiver accept
    connections. Raises `DashboardError` (with Phoenix's log) if it cannot."""
    if not is_phoenix_installed(python):
        raise DashboardError("the dashboard needs Arize Phoenix: pip install 'kvrelay[dashboard]'")
    config.workdir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PHOENIX_HOST": config.host,
        "PHOENIX_PORT": str(config.port),
        "PHOENIX_GRPC_PORT": str(config.grpc_port),
        "PHOENIX_WORKING_DIR": str(config.workdir),
        # No calls home: the cluster may have no internet, and the operator did not ask.
        "PHOENIX_TELEMETRY_ENABLED": "false",
    }
    # Phoenix must not export its own spans into itself (or anywhere else).
    for key in [k for k in env if k.startswith("OTEL_")]:
        del env[key]
    with open(config.workdir / "phoenix.log", "wb") as log:
        process = subprocess.Popen(
            [python, "-m", "phoenix.server.main", "serve"],
            cwd=config.workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    dashboard = PhoenixDashboard(config, process)
    try:
        _wait_ready(dashboard)
    except BaseException:
        dashboard.stop()
        raise
    return dashboard


def _wait_ready(dashboard: PhoenixDashboard) -> None:
    config = dashboard.config
    connect_host = "127.0.0.1" if config.host == "0.0.0.0" else config.host
    deadline = time.monotonic() + config.startup_timeout_s
    while time.monotonic() < deadline:
        if dashboard.process.poll() is not None:
            raise DashboardError(f"Phoenix exited early:\n{dashboard.log()}")
        if _is_healthy(f"{dashboard.url}/healthz") and _accepts(connect_host, config.grpc_port):
            return
        time.sleep(0.5)
    raise DashboardError(
        f"Phoenix did not come up in {config.startup_timeout_s} s:\n{dashboard.log()}"
    )


def _is_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False
