"""`RespReader` over a real socket pair: framing, nulls, errors, truncation, timeouts."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
import redis

from kvstore.redis.resp_reader import RespReader


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(server end, client end) of a connected pair; the client end has a 1 s timeout."""
    server, client = socket.socketpair()
    client.settimeout(1.0)
    yield server, client
    server.close()
    client.close()


def read_value(reader: RespReader) -> bytes | None:
    value_len = reader.read_bulk_len()
    if value_len is None:
        return None
    value = bytearray(value_len)
    reader.read_into(memoryview(value))
    reader.read_bulk_end()
    return bytes(value)


def test_bulk_strings_and_nulls_in_one_stream(sockets: tuple[socket.socket, socket.socket]) -> None:
    server, client = sockets
    big = bytes(range(256)) * 40  # 10240 bytes: longer than the reader's buffer
    server.sendall(b"$5\r\nhello\r\n$-1\r\n_\r\n$0\r\n\r\n$10240\r\n" + big + b"\r\n$2\r\nok\r\n")
    reader = RespReader(client)
    assert [read_value(reader) for _ in range(6)] == [b"hello", None, None, b"", big, b"ok"]
    assert reader.num_buffered == 0


def test_replies_split_across_many_receives(sockets: tuple[socket.socket, socket.socket]) -> None:
    server, client = sockets
    stream = b"".join(b"$%d\r\n%s\r\n" % (n, bytes([n % 251]) * n) for n in (1, 4095, 4096, 9000))
    sender = threading.Thread(
        target=lambda: [server.sendall(stream[i : i + 7]) for i in range(0, len(stream), 7)]
    )
    sender.start()
    reader = RespReader(client)
    assert [read_value(reader) for _ in range(4)] == [
        bytes([n % 251]) * n for n in (1, 4095, 4096, 9000)
    ]
    sender.join()
    assert reader.num_buffered == 0


def test_bytes_after_the_last_reply_are_reported(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    server, client = sockets
    server.sendall(b"$1\r\na\r\n$1\r\nb\r\n")
    reader = RespReader(client)
    assert read_value(reader) == b"a"
    assert reader.num_buffered == 7


def test_skip_discards_exactly_one_value(sockets: tuple[socket.socket, socket.socket]) -> None:
    server, client = sockets
    server.sendall(b"$100000\r\n" + b"x" * 100_000 + b"\r\n$4\r\nnext\r\n")
    reader = RespReader(client)
    assert reader.read_bulk_len() == 100_000
    reader.skip(100_000)
    reader.read_bulk_end()
    assert read_value(reader) == b"next"
    assert reader.num_buffered == 0


def test_error_reply_raises_with_the_server_message(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    server, client = sockets
    server.sendall(b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n")
    with pytest.raises(redis.ResponseError, match=r"^WRONGTYPE Operation against a key"):
        RespReader(client).read_bulk_len()


@pytest.mark.parametrize(
    "reply",
    [
        *(b"+OK\r\n", b":1\r\n", b"*2\r\n", b"$-2\r\n", b"$abc\r\n", b"$\r\n", b"_x\r\n"),
        # Found by tests/fuzz/fuzz_resp_reader.py: `int()` took the first, hiredis
        # refuses the others.
        *(b"$--1\r\n", b"$-0\r\n", b"$+5\r\n", b"$05\r\n", b"$ 5\r\n"),
    ],
    ids=[
        *("simple", "integer", "array", "negative_len", "letters", "no_len", "bad_null"),
        *("double_minus", "minus_zero", "plus_sign", "leading_zero", "space"),
    ],
)
def test_replies_other_than_bulk_strings_are_invalid(
    sockets: tuple[socket.socket, socket.socket], reply: bytes
) -> None:
    server, client = sockets
    server.sendall(reply)
    with pytest.raises(redis.InvalidResponse):
        RespReader(client).read_bulk_len()


def test_bulk_without_crlf_is_invalid(sockets: tuple[socket.socket, socket.socket]) -> None:
    server, client = sockets
    server.sendall(b"$3\r\nabcXY")
    reader = RespReader(client)
    assert reader.read_bulk_len() == 3
    reader.read_into(memoryview(bytearray(3)))
    with pytest.raises(redis.InvalidResponse, match="not CRLF"):
        reader.read_bulk_end()


def test_endless_line_is_invalid(sockets: tuple[socket.socket, socket.socket]) -> None:
    server, client = sockets
    server.sendall(b"$" + b"9" * 5000)
    with pytest.raises(redis.InvalidResponse, match="longer than 4096"):
        RespReader(client).read_bulk_len()


@pytest.mark.parametrize(
    "stream",
    [b"", b"$10", b"$10\r\n", b"$10\r\nabcd", b"$10\r\n0123456789", b"$10\r\n0123456789\r"],
    ids=["nothing", "mid_line", "before_value", "mid_value", "before_crlf", "mid_crlf"],
)
def test_connection_closed_mid_reply(
    sockets: tuple[socket.socket, socket.socket], stream: bytes
) -> None:
    server, client = sockets
    server.sendall(stream)
    server.close()
    with pytest.raises(redis.ConnectionError, match="closed the connection"):
        read_value(RespReader(client))


def test_silent_server_times_out(sockets: tuple[socket.socket, socket.socket]) -> None:
    server, client = sockets
    client.settimeout(0.05)
    server.sendall(b"$10\r\nabc")
    with pytest.raises(TimeoutError):
        read_value(RespReader(client))
