"""`kvrelay status --router HOST:PORT`: the workers of a running cluster, their
load, KV pool usage, KV store statistics and token counters. It asks the router's
internal port (the Registry), as a member of the cluster: with `--tls-dir` when
the cluster runs mTLS."""

from __future__ import annotations

import argparse
import json

EPILOG = """\
examples:
  kvrelay status                       # the router's Registry at localhost:50052
  kvrelay status --router head:50052 --tls-dir /etc/kvrelay/tls --json

Columns: WAIT/RUN requests waiting / running; KV POOL decode blocks used / all;
STORE HIT/MISS/BAD blocks found / not found / failing their checks in the KV store;
TOKENS C/R/G prompt tokens computed / reused from cache, and tokens generated.
Exit status 1 when no router answers at the target.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show a running cluster's workers, load and KV statistics",
        description="Show the workers a router knows and each worker's counters.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--router",
        default="localhost:50052",
        metavar="HOST:PORT",
        help="the router's internal port, its Registry (default: %(default)s)",
    )
    parser.add_argument(
        "--tls-dir",
        metavar="DIR",
        help="the cluster's mTLS certificates (ca.pem, cert.pem, key.pem), when it has them",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    parser.add_argument(
        "--timeout", type=float, default=3.0, help="seconds per call (default: %(default)s)"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from deploy.cli_errors import UsageError
    from deploy.cluster_status import fetch_cluster_status, format_status_table, status_to_json
    from rpc.tls import ClusterTLS, TLSConfigError

    try:
        tls = ClusterTLS.from_dir(args.tls_dir) if args.tls_dir else None
    except TLSConfigError as err:
        raise UsageError(str(err)) from None
    status = fetch_cluster_status(args.router, args.timeout, tls)
    if args.json:
        print(json.dumps(status_to_json(status)))
    else:
        print(format_status_table(status))
    return 0
