"""OpenTelemetry tracing set-up and W3C context propagation over gRPC metadata."""
