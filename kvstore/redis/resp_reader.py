"""A RESP reply reader that receives bulk strings straight into the caller's memory.

redis-py with hiredis receives into a 64 KiB buffer, appends that to the hiredis
reader's buffer, then builds a fresh `bytes` per bulk reply: three copies of a
720 KiB block before the store has even looked at it. For the one hot read (a
pipeline of GETEX), `RespReader` reads the short reply framing through a small
buffer and `recv_into`s each value straight into memory the caller chose (a
scratch buffer, a new tensor), so the bytes leave the kernel exactly once.

It speaks only what GET-like commands answer: bulk strings, nulls (RESP2 `$-1`,
RESP3 `_`) and error replies. Anything else, a closed socket or a timeout raises
(`redis.RedisError` or `OSError`), and the caller must then drop the connection:
its byte stream is no longer in step with the commands it sent.
"""

from __future__ import annotations

import socket

import redis

# Framing lines (`$737360\r\n`, `-ERR ...\r\n`) are short; a small buffer also
# bounds how much of the next value is received twice (into it, then copied out).
_BUFFER_LEN = 4096


class RespReader:
    """Reads replies from one connected socket (any socket: plain or TLS).

    One reader per pipeline: it buffers bytes it has received but not returned,
    so the caller checks `num_buffered == 0` after the last reply it expects.
    Not thread-safe (neither is the connection it reads).
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray(_BUFFER_LEN)
        self._view = memoryview(self._buffer)
        self._start = 0
        """First received byte not yet returned."""
        self._end = 0
        """One past the last received byte."""

    @property
    def num_buffered(self) -> int:
        """Bytes received but not yet returned (more than 0 after the last reply: out of step)."""
        return self._end - self._start

    def read_bulk_len(self) -> int | None:
        """The length of the next reply, a bulk string; `None` for a null reply.

        Raises `redis.ResponseError` (with the server's message) for an error
        reply, and `redis.InvalidResponse` for any other kind of reply.
        """
        line = self._read_line()
        kind, body = line[:1], line[1:]
        if kind == b"$" and body == b"-1":
            return None
        if kind == b"$" and _is_length(body):
            return int(body)
        if kind == b"_" and not body:
            return None
        if kind == b"-":
            raise redis.ResponseError(body.decode("utf-8", errors="replace"))
        raise redis.InvalidResponse(f"expected a bulk string reply, got {line[:40]!r}")

    def read_into(self, dest: memoryview) -> None:
        """Fills `dest` (a writable byte buffer) with the next `dest.nbytes` bytes."""
        dest = dest.cast("B")
        num_copied = min(dest.nbytes, self.num_buffered)
        dest[:num_copied] = self._view[self._start : self._start + num_copied]
        self._start += num_copied
        while num_copied < dest.nbytes:
            num_received = self._sock.recv_into(dest[num_copied:])
            if num_received == 0:
                raise redis.ConnectionError("Redis closed the connection in the middle of a reply")
            num_copied += num_received

    def skip(self, num_bytes: int) -> None:
        """Discards the next `num_bytes` bytes (a value the caller will not use)."""
        scratch = bytearray(min(num_bytes, 1 << 16))
        while num_bytes > 0:
            chunk = memoryview(scratch)[: min(num_bytes, len(scratch))]
            self.read_into(chunk)
            num_bytes -= chunk.nbytes

    def read_bulk_end(self) -> None:
        """Consumes the CRLF that ends every bulk string."""
        end = bytearray(2)
        self.read_into(memoryview(end))
        if end != b"\r\n":
            raise redis.InvalidResponse(f"bulk string ends with {bytes(end)!r}, not CRLF")

    def _read_line(self) -> bytes:
        while True:
            newline = self._buffer.find(b"\r\n", self._start, self._end)
            if newline >= 0:
                line = bytes(self._view[self._start : newline])
                self._start = newline + 2
                return line
            if self.num_buffered == len(self._buffer):
                raise redis.InvalidResponse(f"reply line longer than {len(self._buffer)} bytes")
            self._receive()

    def _receive(self) -> None:
        """Receives more bytes into the buffer, moving what is left to its front first."""
        num_left = self.num_buffered
        self._view[:num_left] = self._view[self._start : self._end]
        self._start, self._end = 0, num_left
        num_received = self._sock.recv_into(self._view[self._end :])
        if num_received == 0:
            raise redis.ConnectionError("Redis closed the connection in the middle of a reply")
        self._end += num_received


def _is_length(text: bytes) -> bool:
    """Whether `text` is a length as Redis writes one: ASCII digits, no sign, no
    spaces, no leading zero (hiredis refuses those too)."""
    return text.isdigit() and (text == b"0" or not text.startswith(b"0"))
