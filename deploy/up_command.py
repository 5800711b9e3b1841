"""`kvrelay up`: a whole cluster (router, prefill and decode workers) on Ray.

Without `--address` it starts a local Ray instance of its own, so a laptop needs
nothing else; with `--address` it joins an existing Ray cluster. Either way the
services run as Ray actors (`deploy.ray_launcher`). SIGINT or SIGTERM stops the
services, kills the actors and, when this command started Ray, stops Ray too.

Secure with no set-up: every start makes an ephemeral cluster CA and certificate,
so every internal call (registration, Prefill, Decode, stats) is mutually
authenticated; it makes a KV secret unless `--kv-secret-file` gives one, so every
block carries a MAC; and the local Ray instance it starts runs with Ray's token
authentication (`RAY_AUTH_MODE=token`). The certificate directory (for `kvrelay
status`) lives in a private temporary directory removed at shutdown.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import socket
import sys
import time
from types import FrameType

from deploy.cli_errors import UsageError
from deploy.worker_flags import add_worker_flags, worker_options

EPILOG = """\
examples:
  kvrelay up                                   # local Ray, dummy:tiny, 1 prefill + 1 decode
  kvrelay up --model /models/SmolLM-135M --prefill-workers 2 --decode-workers 2
  kvrelay up --address auto --model /models/Llama-3-8B   # join the Ray cluster of this node
  kvrelay up --kv-store redis://redis:6379      # blocks in Redis instead of Ray's object store

then, in another shell (kvrelay up prints the exact commands):
  kvrelay generate "Hello"
  kvrelay status --router localhost:50052 --tls-dir <the directory it prints>

Worker actors ask for one GPU each where the Ray cluster has GPUs (--gpus-per-worker
overrides), prefill and decode workers are spread over the nodes, and a worker that
dies is restarted by Ray and registers again. Actors inherit the OTEL_* variables.
Cluster configs (Ray cluster launcher, KubeRay, plain processes): deploy/configs/.
"""


class ShutdownRequested(BaseException):
    """SIGINT or SIGTERM arrived (a BaseException, so no `except Exception` eats it)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "up",
        help="start a whole cluster on Ray (a local Ray instance by default)",
        description="Start a router, prefill and decode workers as Ray actors; "
        "serve until SIGINT/SIGTERM.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--prefill-workers", type=int, default=1, help="default: %(default)s")
    parser.add_argument("--decode-workers", type=int, default=1, help="default: %(default)s")
    parser.add_argument(
        "--kv-store",
        default="ray",
        help="ray (the Ray object store) or redis://host:port (default: %(default)s)",
    )
    parser.add_argument(
        "--address", help="Ray cluster to join (`auto`, host:6379); default: start a local one"
    )
    parser.add_argument("--port", type=int, default=50051, help="router port (default: 50051)")
    parser.add_argument(
        "--http-port",
        type=int,
        default=8000,
        help="port of the router's OpenAI-compatible HTTP API (0 turns it off; default: 8000)",
    )
    parser.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="the model's name in the HTTP API (default: the --model value)",
    )
    parser.add_argument(
        "--cpus-per-actor", type=float, default=1.0, help="Ray CPUs per actor (default: 1)"
    )
    parser.add_argument(
        "--gpus-per-worker",
        type=float,
        help="GPUs per worker actor (default: 1 if the cluster has GPUs, else 0)",
    )
    parser.add_argument(
        "--object-store-mb",
        type=int,
        help="local Ray only: object store size in MiB (default: Ray's choice)",
    )
    parser.add_argument(
        "--ready-timeout", type=float, default=300.0, help="seconds start-up may take"
    )
    parser.add_argument(
        "--dashboard",
        action="store_true",
        help="start Arize Phoenix (pip install 'kvrelay[dashboard]') and send every trace to it",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show the actors' logs in this terminal"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    add_worker_flags(parser, with_placement=False)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import secrets

    from deploy.launch_config import LaunchConfig

    try:
        workers = worker_options(args)
        if workers.kv_secret is None:  # a cluster secret of its own: blocks carry a MAC
            workers = dataclasses.replace(workers, kv_secret=secrets.token_bytes(32))
        config = LaunchConfig(
            workers=workers,
            num_prefill_workers=args.prefill_workers,
            num_decode_workers=args.decode_workers,
            store_url=args.kv_store,
            port=args.port,
            http_port=args.http_port or None,
            served_model_name=args.served_model_name,
            num_cpus_per_actor=args.cpus_per_actor,
            num_gpus_per_worker=args.gpus_per_worker,
            ready_timeout_s=args.ready_timeout,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.address is None:
        _check_port_is_free(config.port, "--port")
        _check_port_is_free(config.port + 1, "--port (the Registry takes --port + 1)")
        if config.http_port is not None:
            _check_port_is_free(config.http_port, "--http-port")
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    _on_signals(_request_shutdown)
    try:
        return _up(args, config)
    except ShutdownRequested:
        return 0
    except SystemError as err:
        # A signal that lands inside a C call (grpc's or Ray's, during start-up)
        # surfaces as "returned a result with an exception set", with our
        # ShutdownRequested as its cause: still the shutdown the user asked for.
        if _is_shutdown(err):
            return 0
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _up(args: argparse.Namespace, config) -> int:
    import dataclasses

    if args.address is None:
        _enable_ray_token_auth()  # before Ray is imported (by the launcher)
    from deploy.ray_launcher import RayDeployment
    from rpc.tls import ClusterTLS

    # What start-up makes is removed whatever stops it: a dashboard that fails to
    # start, or a Ctrl-C before the services run, must not leave the CA behind.
    with contextlib.ExitStack() as cleanup:
        tls_dir = _make_cluster_tls()
        cleanup.callback(shutil.rmtree, tls_dir, ignore_errors=True)
        config = dataclasses.replace(config, tls=ClusterTLS.from_dir(tls_dir))
        deployment = RayDeployment(config)
        dashboard = _start_dashboard(cleanup) if args.dashboard else None
        return _serve(args, config, deployment, dashboard, tls_dir)


def _serve(args: argparse.Namespace, config, deployment, dashboard, tls_dir: str) -> int:
    """Starts (or joins) Ray and the services, serves until a shutdown is asked for,
    then stops everything it started, whatever interrupted it."""
    import ray

    from deploy import local_processes

    is_local = args.address is None
    # Every process the local Ray instance started, refreshed while serving (Ray
    # restarts workers): what the shutdown must leave dead.
    spawned: dict[int, str] = {}
    try:
        if is_local:
            _say("starting Ray (local instance)...")
            ray.init(
                address="local",
                # Logical CPUs: enough for every actor even on a 2-core laptop.
                num_cpus=max(
                    os.cpu_count() or 1,
                    math.ceil(config.num_cpus_per_actor * (config.num_workers + 1)),
                ),
                object_store_memory=(args.object_store_mb or 0) * 1024**2 or None,
                include_dashboard=False,
                logging_level="ERROR",
                log_to_driver=args.verbose,
            )
            spawned |= local_processes.live_descendants()
        else:
            _say(f"joining the Ray cluster at {args.address}...")
            ray.init(address=args.address, logging_level="ERROR", log_to_driver=args.verbose)
        _on_signals(_request_shutdown)  # ray.init installs its own SIGTERM handler
        _check_shutdown()
        deployment.start(_progress)
        _check_shutdown()
        _print_ready(deployment, is_local, tls_dir)
        if dashboard is not None:
            _say(f"  traces:  {dashboard.url}")
        while True:
            if is_local:
                spawned |= local_processes.live_descendants()
            for _ in range(10):
                _check_shutdown()
                time.sleep(0.5)
    finally:
        # A second Ctrl-C must not cut the clean-up short and leave Ray running.
        _on_signals(signal.SIG_IGN)
        drain_s = config.workers.drain_timeout_s if deployment.router is not None else 0.0
        _say(
            f"shutting down (requests in flight get up to {drain_s:g} s to finish)..."
            if deployment.workers
            else "shutting down..."
        )
        if is_local:
            spawned |= local_processes.live_descendants()
        if not is_local:
            deployment.shutdown(drain_s)  # the cluster stays: leave it as it was
        elif local_processes.is_local_ray_intact(spawned):
            # The whole instance goes next, so stopping the services is enough.
            # A signal to the whole process group may have stopped Ray's own
            # processes already: then Ray calls would wait for them in vain.
            deployment.stop_services(timeout_s=5, drain_timeout_s=drain_s)
        ray.shutdown()  # stops the local instance if this process started it
        leftovers = local_processes.kill_leftovers(spawned)
        if leftovers:
            _say(f"killed what Ray left running: {', '.join(sorted(leftovers))}")
        if dashboard is not None:
            dashboard.stop()
        _say("stopped")


def _enable_ray_token_auth() -> None:
    """Ray's token authentication for the local instance, with a token of its own
    that is never written to disk (Ray's processes and actors inherit it). Ray reads
    these when it is imported, so this runs first; a process that imported Ray
    already (`kvrelay up` called in-process) keeps Ray's own setting."""
    import secrets

    if "ray" in sys.modules:
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def _make_cluster_tls() -> str:
    """An ephemeral CA and certificate, in a new directory only this user can read."""
    import tempfile

    from rpc.tls import make_cluster_certificates

    directory = tempfile.mkdtemp(prefix="kvrelay-tls-")  # mode 0700
    make_cluster_certificates(valid_days=7).write(directory)
    return directory


def _start_dashboard(cleanup: contextlib.ExitStack):
    """Starts Phoenix and points this process's OTEL_* settings at it, before Ray
    starts, so every actor inherits them. Its directory goes with `cleanup`."""
    import tempfile
    from pathlib import Path

    from deploy.dashboard import DashboardConfig, start_dashboard

    _say("starting the Phoenix trace dashboard...")
    workdir = Path(tempfile.mkdtemp(prefix="kvrelay-phoenix-"))
    cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
    dashboard = start_dashboard(DashboardConfig(workdir=workdir))
    os.environ.update(dashboard.otel_env())
    _say(f"dashboard ready: {dashboard.url}")
    return dashboard


def _check_port_is_free(port: int, flag: str) -> None:
    """Fails before Ray starts when the router could not bind its port here."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            raise UsageError(
                f"port {port} is in use (another kvrelay up?); stop it or pass {flag}"
            ) from None


def _print_ready(deployment, is_local: bool, tls_dir: str) -> None:
    port = deployment.endpoint.rsplit(":", 1)[1]
    target = f"localhost:{port}" if is_local else deployment.endpoint
    internal_port = deployment.internal_endpoint.rsplit(":", 1)[1]
    internal = f"localhost:{internal_port}" if is_local else deployment.internal_endpoint
    kvrelay = _kvrelay_command()
    _say(f"kvrelay is ready: router at {deployment.endpoint} serving {deployment.config.model}")
    for worker in deployment.workers:
        _say(f"  {worker.role:<8} {worker.worker_id}")
    _say("try, in another shell:")
    _say(f'  {kvrelay} generate --target {target} "hello"')
    _say(f"  {kvrelay} status --router {internal} --tls-dir {tls_dir}")
    if deployment.config.http_port is not None:
        host = target.rsplit(":", 1)[0]
        _say(f"  curl http://{host}:{deployment.config.http_port}/v1/models")
    _say("Ctrl-C stops the cluster.")


def _kvrelay_command() -> str:
    """How the user can call `kvrelay` from another shell (the venv may not be active)."""
    import shutil
    from pathlib import Path

    if shutil.which("kvrelay"):
        return "kvrelay"
    beside = Path(sys.executable).parent / "kvrelay"
    return str(beside) if beside.exists() else f"{sys.executable} -m deploy.cli"


def _say(line: str) -> None:
    print(f"kvrelay up: {line}", flush=True)


def _is_shutdown(err: BaseException) -> bool:
    """Whether `err` is, or was caused by, a ShutdownRequested."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ShutdownRequested):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


_requested: list[str] = []
"""The signal that asked for the shutdown, once one has."""


def _request_shutdown(signum: int, frame: FrameType | None) -> None:
    # Raised where the signal lands, and also remembered: a raise that lands in
    # code that swallows exceptions (an at-fork hook, a __del__) is raised again at
    # the next check, so no moment of the start-up can lose a Ctrl-C.
    _requested.append(signal.Signals(signum).name)
    raise ShutdownRequested(_requested[0])


def _check_shutdown() -> None:
    if _requested:
        raise ShutdownRequested(_requested[0])


def _progress(line: str) -> None:
    """Start-up progress: said, after checking for a shutdown request."""
    _check_shutdown()
    _say(line)


def _on_signals(handler) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
