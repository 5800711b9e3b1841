"""The router's OpenAI-compatible HTTP API: `/v1/models`, `/v1/completions`,
`/v1/chat/completions` and `/health`, served by uvicorn inside the router's own
event loop.

Each endpoint converts its pydantic body into a `GenerateRequest` and calls
`RequestRelay.generate`, the gRPC API's request path, then re-shapes the
responses (`router.openai_responses`). Errors are OpenAI's JSON error body with
the status a client retries on: 400 a bad field (named in `param`), 404 an unknown
model, 429 the router's admission limit or full workers, 503 no worker (or a
draining router), 504 the deadline.

A streamed answer starts only once the first token is there, so a request that
fails before it gets its status. A client that disconnects, mid-stream or while
it waits for a whole answer, cancels the relay's generator, which cancels the
worker call and frees its KV, exactly as a cancelled gRPC stream does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable

import anyio
import grpc
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from protos import generator_pb2 as pb
from router.api_keys import REFUSAL, ApiKeys
from router.openai_models import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorBody,
    ErrorDetail,
    ModelCard,
    ModelList,
    UnsupportedField,
)
from router.openai_responses import (
    ResponseMeta,
    chat_body,
    chat_events,
    collect,
    completion_body,
    completion_events,
    event,
)
from router.relay import RequestRelay
from router.relay_error import RelayError
from router.validation import InvalidRequest
from rpc.tls import PublicTLS

log = logging.getLogger(__name__)

_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
# Request fields, as the router's messages name them, and as OpenAI names them.
_PARAMS = {"prompt_token_ids": "prompt", "request_id": None, "request": None}
_FIELD_AT_START = re.compile(r"(?:sampling\.)?([a-z_]+)")


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(
            error=ErrorDetail(message=message, type=type_, param=param, code=code)
        )

    @classmethod
    def bad_field(cls, param: str | None, message: str) -> ApiError:
        return cls(400, message, "invalid_request_error", param)

    @classmethod
    def of(cls, err: InvalidRequest | RelayError) -> ApiError:
        if isinstance(err, InvalidRequest):
            # The gRPC names: `sampling.max_tokens` is the body's `max_tokens`.
            message = str(err).replace("sampling.", "")
            return cls.bad_field(_param_of(message), message)
        status, type_ = _STATUS.get(err.code, (500, "server_error"))
        return cls(status, err.message, type_, code=err.code.name.lower())

    def response(self) -> JSONResponse:
        return JSONResponse(self.body.model_dump(), status_code=self.status)


def _param_of(message: str) -> str | None:
    match = _FIELD_AT_START.match(message)
    name = match.group(1) if match else None
    return _PARAMS.get(name, name) if name else None


class _EventStream(StreamingResponse):
    """Closes the relay's generator however the stream ends, a disconnect (the
    response task is cancelled) included, so the request's KV is freed at once
    rather than when the generator is collected."""

    def __init__(self, events: AsyncIterator[bytes], relay_stream: AsyncIterator, **kwargs) -> None:
        super().__init__(events, **kwargs)
        self.relay_stream = relay_stream

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self.relay_stream.aclose()


def build_app(
    relay: RequestRelay,
    served_model_name: str,
    is_serving: Callable[[], bool],
    api_keys: ApiKeys | None = None,
    salt_per_key: bool = False,
) -> FastAPI:
    """The API's routes; `is_serving` answers `/health` (RouterHealth's rule). With
    `api_keys`, every `/v1` route needs `Authorization: Bearer KEY` (401 before any
    work without one); `/health` stays open. `salt_per_key` scopes each key's
    prefix cache to itself, as on the gRPC API."""
    keys = api_keys or ApiKeys()

    def key_salt(http: Request) -> str | None:
        return keys.salt_of(http.headers.get("authorization")) if salt_per_key else None

    async def require_key(request: Request) -> None:
        if not keys.allows(request.headers.get("authorization")):
            raise ApiError(401, REFUSAL, "invalid_request_error", code="invalid_api_key")

    app = FastAPI(
        title="kvrelay",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    created = int(time.time())
    v1 = [Depends(require_key)]

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, err: RequestValidationError) -> JSONResponse:
        # A union reports one error per branch: the deepest is the branch the body
        # chose (`[1, 2**40]` is a list with one bad id, not a bad string).
        first = max(err.errors(), key=lambda error: len(error.get("loc", ())))
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        # A union's branch name (`str`, `list[int]`) is not a field.
        param = ".".join(p for p in loc if not p.startswith(("str", "list", "int")))
        message = f"{param or 'body'}: {first.get('msg', 'invalid')}"
        return ApiError.bad_field(param or None, message).response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if err.status_code < 500 else "server_error"
        return ApiError(err.status_code, str(err.detail), type_).response()

    @app.get("/health")
    async def health() -> Response:
        if is_serving():
            return JSONResponse({"status": "ok"})
        raise ApiError(
            503,
            "the router cannot serve: no decode worker is routable, or it is draining",
            "service_unavailable_error",
        )

    @app.get("/v1/models", dependencies=v1)
    async def models() -> JSONResponse:
        cards = ModelList(data=[ModelCard(id=served_model_name, created=created)])
        return JSONResponse(cards.model_dump())

    @app.post("/v1/completions", dependencies=v1)
    async def completions(body: CompletionRequest, http: Request) -> Response:
        meta, request = _start(body, "cmpl")
        meta = _with(meta, want_logprobs=body.logprobs is not None)
        responses = relay.generate(request, None, key_salt=key_salt(http))
        return await _answer(http, responses, meta, body.stream, completion_events, completion_body)

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat_completions(body: ChatCompletionRequest, http: Request) -> Response:
        meta, request = _start(body, "chatcmpl")
        meta = _with(meta, want_logprobs=body.logprobs)
        responses = relay.generate(request, None, key_salt=key_salt(http))
        return await _answer(http, responses, meta, body.stream, chat_events, chat_body)

    def _start(
        body: CompletionRequest | ChatCompletionRequest, prefix: str
    ) -> tuple[ResponseMeta, pb.GenerateRequest]:
        if body.model != served_model_name:
            raise ApiError(
                404,
                f"the model {body.model!r} does not exist; this server serves {served_model_name!r}",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        try:
            body.check_supported()
            request = body.to_generate_request(request_id)
        except UnsupportedField as err:
            raise ApiError.bad_field(err.param, str(err)) from None
        meta = ResponseMeta(
            request_id, int(time.time()), body.model, relay.tokenizer, False, body.include_usage
        )
        return meta, request

    return app


def _with(meta: ResponseMeta, want_logprobs: bool) -> ResponseMeta:
    return ResponseMeta(
        meta.id, meta.created, meta.model, meta.tokenizer, want_logprobs, meta.include_usage
    )


async def _answer(http: Request, responses, meta, stream, events, body) -> Response:
    if not stream:
        try:
            answer = await _collect_while_connected(http, responses)
        except (InvalidRequest, RelayError) as err:
            raise ApiError.of(err) from None
        if answer is None:  # the client left; nobody reads this
            return Response(status_code=499)
        return Response(body(answer, meta).model_dump_json(), media_type="application/json")
    # The first message before the headers: errors before it get their status.
    try:
        first = await anext(responses)
    except (InvalidRequest, RelayError) as err:
        raise ApiError.of(err) from None
    except StopAsyncIteration:
        raise ApiError(500, "the request ended without an answer", "server_error") from None
    return _EventStream(
        _with_errors(events(_prepend(first, responses), meta)),
        responses,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _collect_while_connected(http: Request, responses: AsyncIterator):
    """The whole answer, or None when the client disconnects first: then the relay's
    generator is closed at once, which cancels the worker call and frees its KV."""
    collecting = asyncio.ensure_future(collect(responses))
    watching = asyncio.ensure_future(_disconnect(http))
    try:
        await asyncio.wait((collecting, watching), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not collecting.done():
            collecting.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(collecting, return_exceptions=True)
                await responses.aclose()
    return None if collecting.cancelled() else collecting.result()


async def _disconnect(http: Request) -> None:
    """Returns when the client closes its connection (the body is already read, so the
    next ASGI message is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _prepend(
    first: pb.GenerateResponse, rest: AsyncIterator[pb.GenerateResponse]
) -> AsyncIterator[pb.GenerateResponse]:
    yield first
    async for response in rest:
        yield response


async def _with_errors(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A failure after the first event becomes an error event (the status is sent)."""
    try:
        async for chunk in events:
            yield chunk
    except RelayError as err:
        yield event(ApiError.of(err).body.model_dump())


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the process that runs the router owns
    SIGINT and SIGTERM (they drain it)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """uvicorn serving `app` on the caller's event loop (a task, not a thread)."""

    def __init__(self, app: FastAPI, host: str, port: int, tls: PublicTLS | None = None) -> None:
        try:
            self._socket = socket.create_server((host.strip("[]"), port))
        except OSError as err:
            raise OSError(
                err.errno,
                f"cannot serve the HTTP API on {host}:{port}: {err.strerror}; choose another "
                "--http-port (0 turns it off)",
            ) from None
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
            ssl_certfile=tls.cert_file if tls else None,
            ssl_keyfile=tls.key_file if tls else None,
        )
        self._server = _Server(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self, grace_s: float = 2.0) -> None:
        """Stops accepting, lets open responses finish for `grace_s`, then cuts them."""
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace_s + 1.0)
        except TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
