"""Fuzzes `kvstore.redis.resp_reader.RespReader` as the Redis store's GETEX pipeline
drives it: whatever bytes arrive on the socket, the reader returns bulk strings
and nulls, or raises a `redis.RedisError` (after which the store drops the
connection). It never hangs, never raises anything else, never allocates by a
length it was sent, and every reply it returns is the one hiredis (redis-py's
C parser, a reader no one here wrote) parses from the same bytes.

The input's first byte sets how many replies the pipeline expects (1-4); every
value of `VALUE_LEN` bytes is read into memory, any other is skipped, as the
store does with a block of the wrong size.
"""

from __future__ import annotations

import socket

import atheris
import harness  # sets sys.path: before any of the packages
import hiredis
import redis

with atheris.instrument_imports(include=["kvstore"]):
    from kvstore.redis.resp_reader import RespReader

VALUE_LEN = 8


def seeds() -> list[bytes]:
    value = b"\x00\r\n\x01\x02$-1"[:VALUE_LEN].ljust(VALUE_LEN, b"v")
    return [
        b"\x01$8\r\n" + value + b"\r\n",
        b"\x02$-1\r\n_\r\n",
        b"\x03$3\r\nabc\r\n$8\r\n" + value + b"\r\n-ERR no\r\n",
        b"\x01-WRONGTYPE Operation against a key\r\n",
        b"\x01:1\r\n",
        b"\x02$0\r\n\r\n$8\r\n" + value + b"\r\n",
    ]


def read_pipeline(sock: socket.socket, num_replies: int) -> list[bytes | None]:
    """The replies as the store reads them (`RedisStore._read_block`), or a RedisError."""
    reader = RespReader(sock)
    replies: list[bytes | None] = []
    for _ in range(num_replies):
        value_len = reader.read_bulk_len()
        if value_len is None:
            replies.append(None)
            continue
        if value_len != VALUE_LEN:
            reader.skip(value_len)
            reader.read_bulk_end()
            replies.append(b"<skipped %d>" % value_len)
            continue
        value = bytearray(VALUE_LEN)
        reader.read_into(memoryview(value))
        reader.read_bulk_end()
        replies.append(bytes(value))
    if reader.num_buffered:
        raise redis.InvalidResponse("more replies than commands")
    return replies


def hiredis_replies(data: bytes, num_replies: int) -> list[object] | None:
    """What hiredis parses from `data`: its first `num_replies` replies, or None
    when it finds the bytes malformed or incomplete."""
    parser = hiredis.Reader()
    parser.feed(data)
    replies = []
    try:
        for _ in range(num_replies):
            reply = parser.gets()
            if reply is False:
                return None
            replies.append(reply)
    except hiredis.ProtocolError:
        return None
    return replies


def test_one_input(data: bytes) -> None:
    if not data:
        return
    num_replies, body = 1 + data[0] % 4, data[1:]
    server, client = socket.socketpair()
    with server, client:
        client.settimeout(5.0)  # the peer has closed: a read that waits is a hang
        server.sendall(body)
        server.shutdown(socket.SHUT_WR)
        try:
            replies = read_pipeline(client, num_replies)
        except redis.RedisError:
            harness.refused()
            return
    harness.accepted()
    expected = hiredis_replies(body, num_replies)
    assert expected is not None, f"RespReader accepted {body!r}, which hiredis refuses"
    for ours, theirs in zip(replies, expected, strict=True):
        if ours is not None and ours.startswith(b"<skipped "):
            assert isinstance(theirs, bytes) and len(theirs) != VALUE_LEN, (ours, theirs)
        else:
            assert ours == theirs, (body, replies, expected)


if __name__ == "__main__":
    harness.run(test_one_input, seeds)
