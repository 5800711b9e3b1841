"""A RESP command packer that sends large values without copying them.

redis-py with hiredis packs every command into one fresh `bytes` (copying each
value, and first turning memoryviews into `bytes`: two copies of a 0.7 MiB
block). This packer instead returns the large pieces as they are, and
`Connection.send_packed_command` hands them to `sendall` one by one. A
`ScatterValue` lets one bulk string be sent from several buffers, so a block's
header and a view of its tensor go out as one Redis value with no copy at all.
"""

from __future__ import annotations

from collections.abc import Sequence

# Below this size, pieces are joined into one buffer (fewer syscalls); above it,
# they are sent as they are. 6000 is redis-py's own cutoff.
_JOIN_CUTOFF = 6000


class ScatterValue:
    """One Redis bulk-string value made of several buffers sent back to back."""

    __slots__ = ("nbytes", "parts")

    def __init__(self, parts: Sequence[bytes | memoryview]) -> None:
        self.parts = [memoryview(p).cast("B") for p in parts]
        self.nbytes = sum(p.nbytes for p in self.parts)


def _encode(arg: object) -> bytes | memoryview | ScatterValue:
    if isinstance(arg, bytes | ScatterValue):
        return arg
    if isinstance(arg, bytearray | memoryview):
        return memoryview(arg).cast("B")
    if isinstance(arg, str):
        return arg.encode("utf-8")
    if isinstance(arg, int | float) and not isinstance(arg, bool):
        return repr(arg).encode("ascii")
    raise TypeError(f"cannot send {type(arg).__name__} to Redis")


class ZeroCopyRespPacker:
    """Drop-in `command_packer` for redis-py connections (stateless, thread-safe)."""

    def pack(self, *args: object) -> list[bytes | memoryview]:
        # redis-py passes multi-word command names ("CLIENT SETINFO") as one
        # argument; the server wants the words as separate arguments.
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif isinstance(args[0], bytes) and b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        chunks: list[bytes | memoryview] = []
        buffer = bytearray(b"*%d\r\n" % len(args))
        for arg in map(_encode, args):
            parts = arg.parts if isinstance(arg, ScatterValue) else [arg]
            buffer += b"$%d\r\n" % (arg.nbytes if isinstance(arg, ScatterValue) else len(arg))
            for part in parts:
                if len(part) > _JOIN_CUTOFF:
                    chunks.append(bytes(buffer))
                    chunks.append(part)
                    buffer = bytearray()
                else:
                    buffer += part
            buffer += b"\r\n"
        chunks.append(bytes(buffer))
        return chunks
