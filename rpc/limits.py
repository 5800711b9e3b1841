"""Message size limits and channel options, the same on both ends of every call."""

from __future__ import annotations

# Requests and responses carry token ids, never KV (that goes through the store),
# so 4 MiB is ample; a request over it is answered RESOURCE_EXHAUSTED by gRPC.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.so_reuseport", 0),
    ]
