"""`kvrelay serve router|prefill|decode`: one service as a plain process.

For Kubernetes, systemd or a shell: each process serves one role on a port,
workers register with the router, and the KV store is Redis. SIGINT or SIGTERM
drains the service: it reports NOT_SERVING, takes no new work (a worker tells the
router so), lets the requests in flight finish for --drain-timeout, then stops and
exits 0; a worker's requests still running then resume on another worker. A second
signal stops at once. Flags map onto the services' config dataclasses here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

from deploy.cli_errors import UsageError
from deploy.worker_flags import add_worker_flags, decode_config, prefill_config, worker_options

EPILOG = """\
examples (one machine, plaintext):
  redis-server --port 6379 &
  kvrelay serve router  --model dummy:135m --port 50051
  kvrelay serve prefill --model dummy:135m --router localhost:50052 --kv-store redis://localhost:6379
  kvrelay serve decode  --model dummy:135m --router localhost:50052 --kv-store redis://localhost:6379
  kvrelay generate --target localhost:50051 "Hello"
  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \
       -d '{"model": "dummy:135m", "prompt": "Hello", "max_tokens": 8}'

a real cluster (mTLS inside, API keys outside, authenticated KV blocks):
  kvrelay certs /etc/kvrelay/tls --host router.internal --host 10.0.0.5
  kvrelay serve router --host 0.0.0.0 --tls-dir /etc/kvrelay/tls --api-keys-file keys.txt \
       --public-tls-cert public.pem --public-tls-key public-key.pem
  kvrelay serve decode --host 0.0.0.0 --advertise 10.0.0.7:7000 --port 7000 \
       --router router.internal:50052 --tls-dir /etc/kvrelay/tls --kv-secret-file kv.secret

The router serves Generate (and the HTTP API) on --port, and the Registry workers
register with on --internal-port (default: --port + 1); workers take --router as that
internal address. Every service binds 127.0.0.1 unless --host says otherwise.

Every worker of a cluster must use the same --model, --dtype and --block-size (the
router refuses a worker whose KV layout differs). Workers can start before the router:
they keep trying to register. Tracing: set OTEL_EXPORTER_OTLP_ENDPOINT.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run one service (router, prefill or decode worker) as a process",
        description="Run one kvrelay service in this process until SIGINT/SIGTERM.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("role", choices=("router", "prefill", "decode"), help="which service")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: %(default)s; 0.0.0.0 for every interface)",
    )
    parser.add_argument(
        "--port",
        type=int,
        help="port to bind (default: 50051 for the router, any free one for workers)",
    )
    parser.add_argument(
        "--advertise", metavar="HOST:PORT", help="address the router dials (workers)"
    )
    parser.add_argument(
        "--router",
        metavar="HOST:PORT",
        help="the router's internal address to register with (workers; its --internal-port)",
    )
    security = parser.add_argument_group("security")
    security.add_argument(
        "--tls-dir",
        metavar="DIR",
        help="cluster mTLS: DIR holds ca.pem, cert.pem and key.pem (`kvrelay certs DIR`); "
        "every internal call then needs a certificate that CA signed (default: plaintext)",
    )
    security.add_argument(
        "--public-tls-cert", metavar="FILE", help="router: TLS certificate of the public port"
    )
    security.add_argument(
        "--public-tls-key", metavar="FILE", help="router: the key of --public-tls-cert"
    )
    security.add_argument(
        "--api-keys-file",
        metavar="FILE",
        help="router: keys the public API requires, one per line (or set KVRELAY_API_KEYS); "
        "callers send `authorization: Bearer KEY`",
    )
    security.add_argument(
        "--salt-per-key",
        action="store_true",
        help="router: each API key gets a prefix cache of its own (no block, hit or "
        "cached_prompt_tokens is shared between keys)",
    )
    parser.add_argument(
        "--kv-store",
        default="redis://127.0.0.1:6379",
        help="KV store URL: redis://, rediss://, ray or memory (default: %(default)s)",
    )
    parser.add_argument(
        "--worker-id", default="", help="unique worker id (default: role-host:port)"
    )
    parser.add_argument(
        "--max-inflight",
        type=int,
        default=256,
        help="router: requests at once before RESOURCE_EXHAUSTED",
    )
    router = parser.add_argument_group("router")
    router.add_argument(
        "--internal-port",
        type=int,
        help="router: port of the Registry, where workers register (default: --port + 1)",
    )
    router.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="router: deadline of a request whose client sets none (default: %(default)s)",
    )
    router.add_argument(
        "--token-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="router: a worker that sends no token for this long has failed, and the request "
        "moves to another (default: %(default)s)",
    )
    router.add_argument(
        "--max-migrations",
        type=int,
        default=3,
        help="router: times one request may resume on another decode worker (default: %(default)s)",
    )
    router.add_argument(
        "--http-port",
        type=int,
        default=8000,
        help="router: port of the OpenAI-compatible HTTP API, on --host (0 turns it off; "
        "default: %(default)s)",
    )
    router.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="router: the model's name in the HTTP API (default: the --model value)",
    )
    parser.add_argument(
        "--metrics-port", type=int, help="serve Prometheus /metrics on this port (0: any free one)"
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address /metrics binds (default: %(default)s)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    add_worker_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    from telemetry import names
    from telemetry.tracing import setup_tracing, shutdown_tracing

    port = args.port if args.port is not None else (50051 if args.role == "router" else 0)
    address = f"{args.host}:{port}"
    service_name = {
        "router": names.SERVICE_ROUTER,
        "prefill": names.SERVICE_PREFILL,
        "decode": names.SERVICE_DECODE,
    }[args.role]
    setup_tracing(service_name)
    service = await _start(args, address)
    print(f"kvrelay {args.role} serving on port {service.port}", flush=True)
    if getattr(service, "internal_port", None) is not None:
        print(f"kvrelay {args.role} Registry on port {service.internal_port}", flush=True)
    if service.metrics_port is not None:
        print(f"kvrelay {args.role} metrics on port {service.metrics_port}", flush=True)
    if getattr(service, "http_port", None) is not None:
        print(f"kvrelay {args.role} OpenAI API on port {service.http_port}", flush=True)
    signals = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    await signals.get()
    print(f"kvrelay {args.role} draining (up to {args.drain_timeout:g} s)", flush=True)
    drain = asyncio.ensure_future(service.drain(args.drain_timeout))
    again = asyncio.ensure_future(signals.get())
    await asyncio.wait([drain, again], return_when=asyncio.FIRST_COMPLETED)
    if not drain.done():  # a second signal: stop now, cutting what is left
        drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drain
        await service.stop(0)
    again.cancel()
    shutdown_tracing()
    print(f"kvrelay {args.role} stopped", flush=True)
    return 0


async def _start(args: argparse.Namespace, address: str):
    from rpc.tls import ClusterTLS, TLSConfigError

    try:
        tls = ClusterTLS.from_dir(args.tls_dir) if args.tls_dir else None
    except TLSConfigError as err:
        raise UsageError(str(err)) from None
    if args.role == "router":
        return await _start_router(args, address, tls)
    from rpc.worker_server import WorkerAddress

    try:
        options = worker_options(args)
    except ValueError as err:
        raise UsageError(str(err)) from None
    where = WorkerAddress(
        address,
        args.advertise,
        args.worker_id,
        args.router,
        args.metrics_port,
        args.metrics_host,
        tls,
    )
    if args.role == "prefill":
        from prefill_worker.service import start_prefill_worker

        return await start_prefill_worker(prefill_config(options, where, args.kv_store))
    from decode_worker.service import start_decode_worker

    return await start_decode_worker(decode_config(options, where, args.kv_store))


async def _start_router(args: argparse.Namespace, address: str, tls):
    from model.tokenizer import tokenizer_for_model
    from router.api_keys import ApiKeyError, ApiKeys
    from router.service import RouterConfig, start_router
    from router.worker_calls import FailoverConfig
    from rpc.tls import PublicTLS, TLSConfigError

    for flag, value in (("--http-port", args.http_port), ("--internal-port", args.internal_port)):
        if value is not None and not 0 <= value < 65536:
            raise UsageError(f"{flag} {value} is not a port number")
    if (args.public_tls_cert is None) != (args.public_tls_key is None):
        raise UsageError("--public-tls-cert and --public-tls-key go together: give both")
    try:
        api_keys = ApiKeys.load(args.api_keys_file)
        public_tls = (
            PublicTLS(args.public_tls_cert, args.public_tls_key) if args.public_tls_cert else None
        )
    except (ApiKeyError, TLSConfigError) as err:
        raise UsageError(str(err)) from None
    internal = None
    if args.internal_port is not None:
        internal = f"{args.host}:{args.internal_port}"
    try:
        failover = FailoverConfig(
            request_timeout_s=args.request_timeout,
            token_timeout_s=args.token_timeout,
            max_migrations=args.max_migrations,
        )
        config = RouterConfig(
            model=args.model,
            address=address,
            internal_address=internal,
            tls=tls,
            public_tls=public_tls,
            api_keys=api_keys,
            salt_per_key=args.salt_per_key,
            max_inflight=args.max_inflight,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            failover=failover,
            http_port=http_port_flag(args.http_port),
            served_model_name=args.served_model_name,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    return await start_router(config, tokenizer_for_model(args.model))


def http_port_flag(value: int) -> int | None:
    """`--http-port`: 0 turns the HTTP API off (RouterConfig's None)."""
    return value or None
