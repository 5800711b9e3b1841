"""The processes a local Ray instance started under this one, read from `/proc`.

`kvrelay up` uses them to make its shutdown hold when Ray's own is not enough: a
SIGTERM sent to the whole process group (systemd, `timeout`, `kill -TERM -PGID`)
also reaches Ray's `gcs_server` and `raylet`, after which `ray.shutdown()` is slow
and may leave agents and workers behind. Linux only; elsewhere the lists are empty
and Ray's own shutdown is all there is.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

_PROC = Path("/proc")
# The processes without which a local Ray instance cannot answer anything.
RAY_CORE_PROCESS_NAMES = ("gcs_server", "raylet")


def _process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state letter, name) of every process."""
    table: dict[int, tuple[int, str, str]] = {}
    if not _PROC.is_dir():
        return table
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # "pid (name) state ppid ...": the name may hold spaces and parentheses.
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, ppid = stat[stat.rindex(")") + 1 :].split()[:2]
        table[int(entry.name)] = (int(ppid), state, name)
    return table


def _live_names() -> dict[int, str]:
    return {pid: name for pid, (_, state, name) in _process_table().items() if state != "Z"}


def live_descendants(root_pid: int | None = None) -> dict[int, str]:
    """pid -> name of the live (not zombie) processes below `root_pid` (this one)."""
    table = _process_table()
    root_pid = os.getpid() if root_pid is None else root_pid
    found: dict[int, str] = {}
    frontier = [root_pid]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, state, name) in table.items():
            if ppid == parent and pid not in found:
                frontier.append(pid)
                if state != "Z":
                    found[pid] = name
    return found


def is_local_ray_intact(processes: dict[int, str]) -> bool:
    """Whether every Ray core process among `processes` (a `live_descendants()`
    snapshot) still runs: if not, the instance cannot stop actors gracefully."""
    alive = _live_names()
    core = [pid for pid, name in processes.items() if name in RAY_CORE_PROCESS_NAMES]
    return bool(core) and all(alive.get(pid) == processes[pid] for pid in core)


def kill_leftovers(processes: dict[int, str]) -> list[str]:
    """SIGKILLs those of `processes` (pid -> name) that still run with the same
    name (so a reused pid is spared), wherever they were reparented to; returns
    their names."""
    alive = _live_names()
    killed = []
    for pid, name in processes.items():
        if alive.get(pid) == name:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(name)
    return killed
