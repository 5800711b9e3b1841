"""The router's calls to its workers, one per rpc, behind a small interface.

`WorkerClient` is what the router's logic (`router.worker_calls`) calls: each
method is one rpc to one worker, and every failure is a `WorkerCallError` with the
gRPC status, never a transport exception. `GrpcWorkerClient` is the real one over
the cluster's channels; the flow tests give the logic a fake one instead.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence

import grpc
from opentelemetry.context import Context

from protos import workers_pb2 as wpb
from protos import workers_pb2_grpc as wgrpc
from router.cluster import Cluster
from telemetry.propagation import outgoing_metadata

RELEASE_TIMEOUT_S = 5.0


class WorkerCallError(Exception):
    """A worker call that failed: its status code and the worker's message."""

    def __init__(self, worker_id: str, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{worker_id}: {code.name}: {message}")
        self.worker_id = worker_id
        self.code = code
        self.message = message


class WorkerClient(ABC):
    """One rpc per method. Implementations raise only `WorkerCallError` (and
    CancelledError when the caller is cancelled)."""

    @abstractmethod
    async def prefill(
        self, worker_id: str, request: wpb.PrefillRequest, timeout_s: float | None
    ) -> wpb.PrefillResult:
        """Runs `Prefill` on a prefill worker."""

    @abstractmethod
    async def release(self, worker_id: str, request_id: str) -> None:
        """Asks a prefill worker to delete a request's tail (`Release`)."""

    @abstractmethod
    async def count_resident(
        self, worker_id: str, block_hashes: Sequence[bytes], timeout_s: float
    ) -> int:
        """Leading blocks of the chain resident in a decode worker's pool."""

    @abstractmethod
    def decode(
        self,
        worker_id: str,
        request: wpb.DecodeRequest,
        timeout_s: float | None,
        trace_context: Context | None = None,
    ) -> AsyncIterator[wpb.DecodeResponse]:
        """Streams `Decode` from a decode worker, in `trace_context`'s trace (a
        generator's caller cannot make its span current); closing the iterator
        cancels the call."""


class GrpcWorkerClient(WorkerClient):
    """The calls over the channels the cluster keeps to its registered workers."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    async def prefill(
        self, worker_id: str, request: wpb.PrefillRequest, timeout_s: float | None
    ) -> wpb.PrefillResult:
        stub = wgrpc.PrefillWorkerStub(self._channel(worker_id))
        try:
            response = await stub.Prefill(request, timeout=timeout_s, metadata=outgoing_metadata())
        except grpc.aio.AioRpcError as err:
            raise _call_error(worker_id, err) from err
        return response.result

    async def release(self, worker_id: str, request_id: str) -> None:
        stub = wgrpc.PrefillWorkerStub(self._channel(worker_id))
        try:
            await stub.Release(wpb.ReleaseRequest(request_id=request_id), timeout=RELEASE_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            raise _call_error(worker_id, err) from err

    async def count_resident(
        self, worker_id: str, block_hashes: Sequence[bytes], timeout_s: float
    ) -> int:
        stub = wgrpc.DecodeWorkerStub(self._channel(worker_id))
        ask = wpb.CountResidentRequest(block_hashes=block_hashes)
        try:
            return (await stub.CountResident(ask, timeout=timeout_s)).num_resident_blocks
        except grpc.aio.AioRpcError as err:
            raise _call_error(worker_id, err) from err

    async def decode(
        self,
        worker_id: str,
        request: wpb.DecodeRequest,
        timeout_s: float | None,
        trace_context: Context | None = None,
    ) -> AsyncIterator[wpb.DecodeResponse]:
        stub = wgrpc.DecodeWorkerStub(self._channel(worker_id))
        metadata = outgoing_metadata(trace_context)
        call = stub.Decode(request, timeout=timeout_s, metadata=metadata)
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as err:
            raise _call_error(worker_id, err) from err
        finally:
            if not call.done():
                call.cancel()

    def _channel(self, worker_id: str) -> grpc.aio.Channel:
        channel = self.cluster.channel(worker_id)
        if channel is None:
            raise WorkerCallError(worker_id, grpc.StatusCode.UNAVAILABLE, "the worker left")
        return channel


def _call_error(worker_id: str, err: grpc.aio.AioRpcError) -> WorkerCallError:
    return WorkerCallError(worker_id, err.code(), err.details() or "")
