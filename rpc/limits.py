"""Limits: message sizes and channel options (the same on both ends of every
call), and how much work a worker takes on before it refuses more."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class WorkerLimits:
    """How much a worker takes on, and when it counts as wedged."""

    max_queued: int = 128
    """Requests held but not yet running (admitting, fetching, waiting); past it a
    new one gets RESOURCE_EXHAUSTED and the router tries another worker."""
    engine_stall_timeout_s: float = 60.0
    """With work queued and no engine progress for this long, the worker reports
    NOT_SERVING and the router routes nothing to it."""

    def __post_init__(self) -> None:
        if self.max_queued < 0:
            raise ValueError(f"--max-queued must be >= 0, got {self.max_queued}")
        if self.engine_stall_timeout_s <= 0:
            raise ValueError(
                f"--engine-stall-timeout must be > 0, got {self.engine_stall_timeout_s}"
            )


class Overloaded(Exception):
    """A worker's queue is full (`WorkerLimits.max_queued`): RESOURCE_EXHAUSTED."""
