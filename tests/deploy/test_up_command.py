"""`kvrelay up` as a user runs it: a subprocess that starts its own local Ray, serves
`kvrelay generate`, and on Ctrl-C (SIGINT to its process group) exits 0 leaving no
process behind; and its usage errors."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.cli import main

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, command line) of every live (non-zombie) process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # exited meanwhile
        # Fields after the parenthesised command name: state, ppid, pgrp, session.
        state, ppid, _, session = stat.rsplit(")", 1)[1].split()[:4]
        if state != "Z":
            table[int(entry.name)] = (int(ppid), int(session), cmdline.strip())
    return table


def started_by(root_pid: int) -> dict[int, str]:
    """Processes descending from `root_pid` or in its session: pid -> command line."""
    table = process_table()
    found = {pid: cmd for pid, (_, session, cmd) in table.items() if session == root_pid}
    frontier = [root_pid]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _, cmd) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = cmd
                frontier.append(pid)
    return found


class UpProcess:
    """`kvrelay up` (or `command`, which runs it) in its own session, its output
    collected line by line."""

    def __init__(self, *args: str, command: list[str] | None = None) -> None:
        self.process = subprocess.Popen(
            command or [sys.executable, "-m", "deploy.cli", "up", *args],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.spawned: dict[int, str] = {}

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in self.lines):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self._reader.join(2)
                raise AssertionError(f"no {text!r} from kvrelay up:\n" + "\n".join(self.lines))
            time.sleep(0.2)

    def kill(self) -> None:
        """The finalizer: whatever still runs of it goes, by pid."""
        for pid in [self.process.pid, *self.spawned]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def up_process() -> Iterator[list[UpProcess]]:
    started: list[UpProcess] = []
    yield started
    for up in started:
        up.kill()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize(
    "stop_signal",
    # SIGINT: Ctrl-C in its terminal. SIGTERM to the group (systemd, `timeout`)
    # also stops Ray's own gcs_server and raylet under it.
    [signal.SIGINT, signal.SIGTERM],
    ids=["ctrl-c", "sigterm-to-group"],
)
def test_up_serves_generate_and_stops_leaving_nothing_behind(
    stop_signal: signal.Signals,
    up_process: list[UpProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    port, http_port = free_port(), free_port()
    up = UpProcess(
        "--port", str(port), "--http-port", str(http_port),
        "--object-store-mb", "100", "--kv-cache-gb", "0.01",
    )  # fmt: skip
    up_process.append(up)
    up.wait_for("kvrelay is ready", timeout_s=150)
    assert up.lines[0] == "kvrelay up: starting Ray (local instance)..."
    assert any(line.endswith(f":{port}") and "router ready at" in line for line in up.lines)
    assert "kvrelay up: 2 workers registered" in up.lines
    assert any(f'generate --target localhost:{port} "hello"' in line for line in up.lines)

    up.spawned = started_by(up.process.pid)
    commands = " ".join(up.spawned.values())
    assert "raylet" in commands and "gcs_server" in commands
    assert "ray::PrefillActor" in commands and "ray::DecodeActor" in commands
    # Secure with no set-up: Ray's token auth, mTLS inside (the printed status
    # command carries the ephemeral certificates; plaintext is refused).
    gcs = next(pid for pid, cmd in up.spawned.items() if "gcs_server" in cmd)
    assert b"RAY_AUTH_MODE=token" in Path(f"/proc/{gcs}/environ").read_bytes().split(b"\0")
    status_line = next(line for line in up.lines if " status --router " in line)
    status_args = status_line.split(" status ", 1)[1].split()
    internal, tls_dir = status_args[1], status_args[3]
    assert internal == f"localhost:{port + 1}" and Path(tls_dir, "key.pem").is_file()
    assert main(["status", *status_args, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["workers"]) == 2
    import grpc

    from protos import workers_pb2 as wpb
    from protos import workers_pb2_grpc as wgrpc

    with grpc.insecure_channel(internal) as channel, pytest.raises(grpc.RpcError) as err:
        wgrpc.RegistryStub(channel).ListWorkers(wpb.ListWorkersRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    generate = ["generate", "--target", f"127.0.0.1:{port}", "--json", "--max-tokens", "8"]
    remote = subprocess.run(
        [sys.executable, "-m", "deploy.cli", *generate, "hello"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert remote.returncode == 0, remote.stderr
    assert main(["generate", "--local", "--json", "--max-tokens", "8", "hello"]) == 0
    local = json.loads(capsys.readouterr().out)
    result = json.loads(remote.stdout)
    assert result["token_ids"] == local["token_ids"] and len(result["token_ids"]) == 8
    # The router's OpenAI-compatible API is up beside it, naming the model.
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/models", timeout=10) as r:
        assert [m["id"] for m in json.load(r)["data"]] == ["dummy:tiny"]

    os.killpg(up.process.pid, stop_signal)
    assert up.process.wait(timeout=30) == 0
    up._reader.join(5)
    shutting_down = next(
        i for i, line in enumerate(up.lines) if line.startswith("kvrelay up: shutting down")
    )
    assert up.lines[shutting_down:][-1] == "kvrelay up: stopped"
    assert not Path(tls_dir).exists(), "the ephemeral certificates outlived the cluster"
    time.sleep(1)  # the last Ray children may need a moment after their parent
    alive = process_table()
    left = {pid: cmd for pid, cmd in up.spawned.items() if pid in alive and alive[pid][2] == cmd}
    assert left == {}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--decode-workers", "0"], "at least one decode worker"),
        (["--kv-store", "memory"], "--kv-store 'memory': use ray"),
        (["--port", "70000"], "--port 70000 is not a port number"),
        (["--http-port", "70000"], "--http-port 70000 is not a port number"),
    ],
)
def test_up_usage_errors_exit_2_with_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["up", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kvrelay up: error: ")
    assert message in err


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize(
    ("moment", "delay_s"),
    [
        ("kvrelay up: starting Ray (local instance)...", 0.5),
        ("router ready at", 0.0),
        ("decode workers (cpu)...", 0.3),
    ],
    ids=["starting-ray", "router-up", "starting-workers"],
)
def test_ctrl_c_during_start_up_exits_0_with_no_traceback_and_leaves_nothing(
    up_process: list[UpProcess], moment: str, delay_s: float
) -> None:
    up = UpProcess("--port", str(free_port()), "--http-port", "0")
    up_process.append(up)
    up.wait_for(moment, timeout_s=120)
    time.sleep(delay_s)
    up.spawned = started_by(up.process.pid)
    os.killpg(up.process.pid, signal.SIGINT)
    try:
        code = up.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("kvrelay up did not stop within 60 s:\n" + "\n".join(up.lines))
    up._reader.join(5)
    output = "\n".join(up.lines)
    assert code == 0, output
    assert "Traceback" not in output and "error:" not in output, output
    assert up.lines[-1] == "kvrelay up: stopped"
    time.sleep(1)
    alive = process_table()
    left = {pid: cmd for pid, cmd in up.spawned.items() if pid in alive and alive[pid][2] == cmd}
    assert left == {}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_make_run_answers_the_readme_chat_question_and_ctrl_c_stops_it(
    up_process: list[UpProcess],
) -> None:
    """`make run` (its default model, the smollm2:135m-instruct preset) then, in another
    shell, `kvrelay generate --chat "What is the capital of France?"`: a sentence naming
    Paris. The venv is this one, taken as set up (`-o` its stamp: no reinstall)."""
    venv = Path(sys.prefix)
    port = free_port()
    run_args = f"--port {port} --http-port {free_port()} --object-store-mb 200"
    up = UpProcess(
        command=[
            "make", "--no-print-directory", "run", f"VENV={venv}", f"RUN_ARGS={run_args}",
            "-o", f"{venv}/.kvrelay-installed",
        ]
    )  # fmt: skip
    up_process.append(up)
    up.wait_for("kvrelay is ready", timeout_s=300)
    assert any("smollm2:135m-instruct" in line for line in up.lines), up.lines
    up.spawned = started_by(up.process.pid)

    question = "What is the capital of France?"
    answer = subprocess.run(
        [str(venv / "bin" / "kvrelay"), "generate", "--target", f"127.0.0.1:{port}", "--chat",
         question],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stderr
    assert "Paris" in answer.stdout and answer.stdout.strip().endswith("."), answer.stdout

    os.killpg(up.process.pid, signal.SIGINT)
    up.process.wait(timeout=60)  # make itself exits on the signal
    up._reader.join(30)
    assert "kvrelay up: stopped" in up.lines, "\n".join(up.lines)
    deadline = time.monotonic() + 30
    while True:
        alive = process_table()
        left = {p: cmd for p, cmd in up.spawned.items() if p in alive and alive[p][2] == cmd}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert left == {}
