"""W3C trace context carried in gRPC metadata, so one request is one trace.

Clients send `outgoing_metadata()` with each call; servers start their span with
`context=caller_context(context)` to continue the caller's trace.
"""

from __future__ import annotations

import grpc
from opentelemetry import propagate
from opentelemetry.context import Context


def outgoing_metadata(context: Context | None = None) -> tuple[tuple[str, str], ...]:
    """A trace context (default: the current one) as gRPC metadata (`traceparent`,
    `tracestate`). Async generators pass theirs explicitly: a context attached
    across a `yield` cannot be detached reliably, so they never make spans current."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return tuple(carrier.items())


def caller_context(context: grpc.aio.ServicerContext) -> Context:
    """The trace context the caller sent, to parent this handler's span."""
    carrier = {key: value for key, value in context.invocation_metadata() or ()}
    return propagate.extract(carrier)
