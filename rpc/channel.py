"""Client channels to kvrelay services."""

from __future__ import annotations

import grpc

from rpc.limits import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from rpc.tls import ClusterTLS
from rpc.tls import channel_options as tls_options


def open_channel(
    target: str,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    tls: ClusterTLS | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel to `target` (`host:port`): mutually authenticated by the
    cluster CA when `tls` is given (internal calls), plaintext otherwise."""
    options = channel_options(max_message_bytes) + tls_options(tls)
    if tls is not None:
        return grpc.aio.secure_channel(target, tls.channel_credentials(), options=options)
    return grpc.aio.insecure_channel(target, options=options)


def open_blocking_channel(target: str, tls: ClusterTLS | None = None) -> grpc.Channel:
    """A blocking channel to an internal `target` (`kvrelay status`, the launcher's
    readiness checks): mutually authenticated when `tls` is given."""
    if tls is not None:
        return grpc.secure_channel(target, tls.channel_credentials(), options=tls_options(tls))
    return grpc.insecure_channel(target)
