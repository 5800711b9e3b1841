"""Client channels to kvrelay services."""

from __future__ import annotations

import grpc

from rpc.limits import DEFAULT_MAX_MESSAGE_BYTES, channel_options


def open_channel(
    target: str,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    tls: grpc.ChannelCredentials | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel to `target` (`host:port`)."""
    options = channel_options(max_message_bytes)
    if tls is not None:
        return grpc.aio.secure_channel(target, tls, options=options)
    return grpc.aio.insecure_channel(target, options=options)
