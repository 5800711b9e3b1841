"""A TCP proxy in front of a real server that can stop forwarding replies part-way.

Fault tests use it to cut a Redis reply in the middle of a value: after
`hold_after(n)`, the next `n` server-to-client bytes pass and then nothing more
on that connection (`held` is set). If the server then dies, the proxy closes
the client's side too, as the kernel would for a direct connection.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class HoldingProxy:
    """Forwards `127.0.0.1:port` to `127.0.0.1:upstream_port`, one thread per direction."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.held = threading.Event()
        self._lock = threading.Lock()
        self._num_bytes_to_hold: int | None = None
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept_loop, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def hold_after(self, num_bytes: int) -> None:
        """Lets the next `num_bytes` reply bytes through, then holds that connection."""
        with self._lock:
            self._num_bytes_to_hold = num_bytes
            self.held.clear()

    def close(self) -> None:
        with self._lock:
            for sock in self._sockets:
                sock.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, is_reply: bool) -> None:
        is_holding = False
        try:
            while data := source.recv(1 << 16):
                if is_reply:
                    if is_holding:
                        continue  # swallowed: the client never sees the rest
                    data, is_holding = self._take(data)
                if data:
                    sink.sendall(data)
        except OSError:
            pass
        # The source closed (or failed): so does the other side, like a dead server.
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _take(self, data: bytes) -> tuple[bytes, bool]:
        """The part of a reply chunk to forward, and whether the connection now holds."""
        with self._lock:
            if self._num_bytes_to_hold is None:
                return data, False
            if len(data) < self._num_bytes_to_hold:
                self._num_bytes_to_hold -= len(data)
                return data, False
            data = data[: self._num_bytes_to_hold]
            self._num_bytes_to_hold = None
            self.held.set()
            return data, True
