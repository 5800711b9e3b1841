"""W3C trace context carried in gRPC metadata, so one request is one trace.

Clients send `outgoing_metadata()` with each call; servers start their span with
`context=caller_context(context)` to continue the caller's trace.
"""

from __future__ import annotations

import grpc
from opentelemetry import propagate
from opentelemetry.context import Context


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """The current span's context as gRPC metadata (`traceparent`, `tracestate`)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


def caller_context(context: grpc.aio.ServicerContext) -> Context:
    """The trace context the caller sent, to parent this handler's span."""
    carrier = {key: value for key, value in context.invocation_metadata() or ()}
    return propagate.extract(carrier)
