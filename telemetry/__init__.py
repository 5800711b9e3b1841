"""kvrelay: telemetry."""
