"""A real `redis-server` child process for the store tests (a plain module so test
files can import the class; the fixtures that own its lifetime are in conftest)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A `redis-server` child process on its own port, which tests may kill and restart."""

    def __init__(self, workdir: Path, *extra_args: str, is_tls: bool = False) -> None:
        self.port = free_port()
        self.is_tls = is_tls
        self.workdir = workdir
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"{'rediss' if self.is_tls else 'redis'}://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Starts (or restarts, on the same port) and waits until it accepts connections."""
        assert self.process is None, "already running"
        # With TLS the server listens on `port` for TLS only (plain port 0: none).
        ports = (
            ["--port", "0", "--tls-port", str(self.port)]
            if self.is_tls
            else ["--port", str(self.port)]
        )
        args = ["redis-server", *ports, "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        self.process = subprocess.Popen([*args, *self.extra_args], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def pause(self) -> None:
        """Freezes the server (SIGSTOP): connections stay open, replies never come."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)
