"""`kvrelay generate --target HOST:PORT`: a streaming client of the Generate API,
with an API key (`--api-key`, `KVRELAY_API_KEY`) and TLS to a router whose public
port has it (`--tls-ca`)."""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from typing import TextIO

import grpc

from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc
from rpc.limits import channel_options

CONNECT_TIMEOUT_S = 3.0
_FINISH_NAMES = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


class RouterUnreachable(ConnectionError):
    """No router answers at the target."""


class RouterError(RuntimeError):
    """The router answered a request with an error status."""


@dataclass(frozen=True)
class RemoteGenerateRequest:
    target: str
    requests: tuple[pb.GenerateRequest, ...]
    is_json: bool
    api_key: str | None = None
    """Sent as `authorization: Bearer KEY`."""
    tls_ca: bytes | None = None
    """PEM roots that the router's public certificate must chain to; None: plaintext."""

    def open_channel(self) -> grpc.aio.Channel:
        if self.tls_ca is None:
            return grpc.aio.insecure_channel(self.target, options=channel_options())
        credentials = grpc.ssl_channel_credentials(root_certificates=self.tls_ca)
        return grpc.aio.secure_channel(self.target, credentials, options=channel_options())

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()


def run_remote_generate(request: RemoteGenerateRequest, out: TextIO | None = None) -> int:
    return asyncio.run(_run(request, out or sys.stdout))


async def _run(request: RemoteGenerateRequest, out: TextIO) -> int:
    async with request.open_channel() as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise RouterUnreachable(
                f"no kvrelay router answers at {request.target} within {CONNECT_TIMEOUT_S:.0f} s; "
                "start one with `kvrelay up` (or `kvrelay serve router`), or pass --target"
            ) from None
        stub = pb_grpc.GeneratorStub(channel)
        is_streamed = len(request.requests) == 1 and not request.is_json
        results = await asyncio.gather(
            *(
                _generate(stub, r, request.metadata, out if is_streamed else None)
                for r in request.requests
            )
        )
    for index, result in enumerate(results):
        if request.is_json:
            print(json.dumps({"prompt_index": index, **result}), file=out)
        elif not is_streamed:
            print(result["text"], file=out)
    return 0


async def _generate(
    stub: pb_grpc.GeneratorStub,
    request: pb.GenerateRequest,
    metadata: tuple[tuple[str, str], ...],
    stream_to: TextIO | None,
) -> dict:
    token_ids: list[int] = []
    text: list[str] = []
    result: dict = {}
    try:
        async for response in stub.Generate(request, metadata=metadata):
            token_ids.extend(response.token_ids)
            text.append(response.text)
            if stream_to is not None and response.text:
                stream_to.write(response.text)
                stream_to.flush()
            if response.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                result = {
                    "finish_reason": _FINISH_NAMES[response.finish_reason],
                    "usage": {
                        "prompt_tokens": response.usage.prompt_tokens,
                        "completion_tokens": response.usage.completion_tokens,
                        "cached_prompt_tokens": response.usage.cached_prompt_tokens,
                    },
                }
    except grpc.aio.AioRpcError as err:
        raise RouterError(f"{err.code().name}: {err.details()}") from None
    if stream_to is not None:
        stream_to.write("\n")
    return {"token_ids": token_ids, "text": "".join(text), **result}
