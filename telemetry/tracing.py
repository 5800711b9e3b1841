"""Tracing set-up from the standard `OTEL_*` environment variables.

Export is on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or its `_TRACES_` variant) is set
and `OTEL_SDK_DISABLED` is not true. `OTEL_EXPORTER_OTLP_PROTOCOL` (or
`_TRACES_PROTOCOL`) picks `grpc` (default) or `http/protobuf`; the exporters read
the endpoint, headers, timeout and TLS settings from the environment themselves.
Without an endpoint the global no-op tracer stays, so spans cost next to nothing.
"""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

_provider: TracerProvider | None = None


def is_export_configured() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def _make_exporter() -> SpanExporter:
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HTTPSpanExporter,
        )

        return HTTPSpanExporter()
    raise ValueError(
        f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported; use grpc or http/protobuf"
    )


def setup_tracing(service_name: str) -> bool:
    """Installs the global tracer provider for this process; returns whether spans
    are exported. `service_name` wins over `OTEL_SERVICE_NAME`, because every
    process of a cluster shares one environment but must report its own role."""
    global _provider
    if _provider is not None or not is_export_configured():
        return _provider is not None
    resource = Resource.create().merge(Resource({SERVICE_NAME: service_name}))
    _provider = TracerProvider(resource=resource)
    _provider.add_span_processor(BatchSpanProcessor(_make_exporter()))
    trace.set_tracer_provider(_provider)
    return True


def shutdown_tracing() -> None:
    """Flushes and stops export; call on service shutdown so no span is lost."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)
