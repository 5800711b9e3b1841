"""`kvrelay serve router|prefill|decode`: one service as a plain process.

For Kubernetes, systemd or a shell: each process serves one role on a port,
workers register with the router, and the KV store is Redis. SIGINT or SIGTERM
stops the service gracefully (workers deregister first, in-flight calls get a
grace period). Flags map onto the services' config dataclasses here, in one place.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

EPILOG = """\
examples:
  redis-server --port 6379 &
  kvrelay serve router  --model dummy:135m --port 50051
  kvrelay serve prefill --model dummy:135m --router localhost:50051 --kv-store redis://localhost:6379
  kvrelay serve decode  --model dummy:135m --router localhost:50051 --kv-store redis://localhost:6379
  kvrelay generate --target localhost:50051 "Hello"

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
    parser.add_argument("--model", default="dummy:tiny", help="HF directory or dummy:* preset")
    parser.add_argument("--host", default="0.0.0.0", help="address to bind (default: %(default)s)")
    parser.add_argument(
        "--port",
        type=int,
        help="port to bind (default: 50051 for the router, any free one for workers)",
    )
    parser.add_argument(
        "--advertise", metavar="HOST:PORT", help="address the router dials (workers)"
    )
    parser.add_argument("--router", metavar="HOST:PORT", help="router to register with (workers)")
    parser.add_argument(
        "--kv-store",
        default="redis://127.0.0.1:6379",
        help="KV store URL: redis://, rediss://, ray or memory (default: %(default)s)",
    )
    parser.add_argument(
        "--worker-id", default="", help="unique worker id (default: role-host:port)"
    )
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--threads", type=int, help="torch threads (default: this process's cores)")
    parser.add_argument(
        "--token-budget", type=int, default=2048, help="prefill: most tokens per forward pass"
    )
    parser.add_argument(
        "--kv-cache-gb", type=float, default=0.5, help="decode: memory for the KV pool in GiB"
    )
    parser.add_argument(
        "--max-num-seqs", type=int, default=64, help="decode: running requests at most"
    )
    parser.add_argument(
        "--max-local-prefill-len",
        type=int,
        default=0,
        help="decode: prompts up to this many tokens are prefilled here, not by a prefill worker",
    )
    parser.add_argument(
        "--max-inflight",
        type=int,
        default=256,
        help="router: requests at once before RESOURCE_EXHAUSTED",
    )
    parser.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="workers: compute every prompt in full, never reuse cached KV (for comparisons)",
    )
    parser.add_argument(
        "--metrics-port", type=int, help="serve Prometheus /metrics on this port (0: any free one)"
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
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
    if service.metrics_port is not None:
        print(f"kvrelay {args.role} metrics on port {service.metrics_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await service.stop()
    shutdown_tracing()
    return 0


async def _start(args: argparse.Namespace, address: str):
    if args.role == "router":
        from model.tokenizer import tokenizer_for_model
        from router.service import RouterConfig, start_router

        return await start_router(
            RouterConfig(
                model=args.model,
                address=address,
                max_inflight=args.max_inflight,
                metrics_port=args.metrics_port,
            ),
            tokenizer_for_model(args.model),
        )
    if args.role == "prefill":
        from prefill_worker.config import PrefillConfig
        from prefill_worker.service import start_prefill_worker

        return await start_prefill_worker(
            PrefillConfig(
                model=args.model,
                address=address,
                advertise_address=args.advertise,
                router=args.router,
                store_url=args.kv_store,
                worker_id=args.worker_id,
                dtype=None if args.dtype == "auto" else args.dtype,
                device=args.device,
                block_size=args.block_size,
                token_budget=args.token_budget,
                enable_prefix_cache=not args.no_prefix_cache,
                num_threads=args.threads,
                metrics_port=args.metrics_port,
            )
        )
    from decode_worker.config import DecodeConfig
    from decode_worker.engine import EngineConfig
    from decode_worker.service import start_decode_worker

    return await start_decode_worker(
        DecodeConfig(
            model=args.model,
            address=address,
            advertise_address=args.advertise,
            router=args.router,
            store_url=args.kv_store,
            worker_id=args.worker_id,
            dtype=None if args.dtype == "auto" else args.dtype,
            device=args.device,
            engine=EngineConfig(
                kv_cache_bytes=int(args.kv_cache_gb * 1024**3),
                block_size=args.block_size,
                max_num_seqs=args.max_num_seqs,
                enable_prefix_cache=not args.no_prefix_cache,
            ),
            max_local_prefill_len=args.max_local_prefill_len,
            num_threads=args.threads,
            metrics_port=args.metrics_port,
        )
    )
