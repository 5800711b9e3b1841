"""`kvrelay certs DIR [--host NAME ...]`: a cluster CA and a certificate for its
services, for `--tls-dir` (see `rpc.tls`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from deploy.cli_errors import UsageError

EPILOG = """\
examples:
  kvrelay certs ./tls                                  # localhost and 127.0.0.1
  kvrelay certs /etc/kvrelay/tls --host router.internal --host 10.0.0.5 --days 90

It writes ca.pem, cert.pem and key.pem (what every service's --tls-dir needs; copy
the directory to every host of the cluster) and ca-key.pem, the CA's key, which no
service reads: keep it off the serving hosts. Every certificate also names
kvrelay.internal, the name internal calls check, so workers may run on any host.
Rotate by making a new directory and restarting the services with it.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "certs",
        help="make a CA and certificates for mTLS inside a cluster (--tls-dir)",
        description="Make a cluster CA and a certificate signed by it, for --tls-dir.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("directory", metavar="DIR", help="where to write the PEM files")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name or IP address the certificate is for (repeatable)",
    )
    parser.add_argument(
        "--days", type=int, default=365, help="validity in days (default: %(default)s)"
    )
    parser.add_argument(
        "--force", action="store_true", help="overwrite the files if DIR already holds them"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rpc.tls import CA_FILE, make_cluster_certificates

    if args.days < 1:
        raise UsageError(f"--days {args.days}: a certificate must be valid for at least a day")
    directory = Path(args.directory)
    if (directory / CA_FILE).exists() and not args.force:
        raise UsageError(f"{directory} already holds a CA; pass --force to replace it")
    make_cluster_certificates(tuple(args.host), args.days).write(directory)
    hosts = ", ".join(["localhost", "127.0.0.1", *args.host])
    print(f"kvrelay certs: wrote ca.pem, cert.pem, key.pem and ca-key.pem to {directory} ({hosts})")
    return 0
