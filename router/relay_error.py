"""`RelayError`: a request that failed with a gRPC status the client should see."""

from __future__ import annotations

import grpc


class RelayError(Exception):
    """Raised anywhere on the router's request path; the servicer aborts the call
    with `code` and `message` (a message written for the client)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
