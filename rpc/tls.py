"""Mutual TLS inside a cluster, and the certificates for it.

Every internal gRPC call (router ⇄ workers: Registry, Prefill, Decode, Release,
stats) is mutually authenticated when the services have a TLS directory: each side
presents a certificate signed by the cluster's CA and accepts only peers whose
certificate that CA signed. The CA is the identity: a peer is "of the cluster"
when it holds a key the CA certified, whatever address it dials from, so a worker
that moves between hosts (a Ray actor restarted on another node) needs no new
certificate. Channels therefore check the server's name against `CLUSTER_NAME`,
which every certificate made here carries, rather than the dialled host.

`make_cluster_certificates` (the `kvrelay certs` command, and `kvrelay up` at each
start) makes a CA and one certificate for the cluster's services, valid for the
hosts given plus localhost, 127.0.0.1 and `CLUSTER_NAME`.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

CLUSTER_NAME = "kvrelay.internal"
"""The name every cluster certificate carries and every internal channel checks."""
CA_FILE, CERT_FILE, KEY_FILE = "ca.pem", "cert.pem", "key.pem"
CA_KEY_FILE = "ca-key.pem"
"""Written by `kvrelay certs` beside the rest, for issuing more certificates later;
no service reads it."""
_DEFAULT_HOSTS = ("localhost", "127.0.0.1")


class TLSConfigError(ValueError):
    """A TLS directory or file that cannot be used; the message says what to change."""


@dataclass(frozen=True)
class ClusterTLS:
    """The PEM material of one service: the cluster CA, its certificate and key."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def from_dir(cls, directory: str | Path) -> ClusterTLS:
        """Reads `ca.pem`, `cert.pem` and `key.pem` from `directory` (`--tls-dir`)."""
        path = Path(directory)
        missing = [n for n in (CA_FILE, CERT_FILE, KEY_FILE) if not (path / n).is_file()]
        if missing:
            raise TLSConfigError(
                f"--tls-dir {directory} lacks {', '.join(missing)}; make one with "
                f"`kvrelay certs {directory}`"
            )
        return cls(*((path / n).read_bytes() for n in (CA_FILE, CERT_FILE, KEY_FILE)))

    def server_credentials(self) -> grpc.ServerCredentials:
        """Serves with our certificate and refuses clients without one the CA signed."""
        return grpc.ssl_server_credentials(
            [(self.key_pem, self.cert_pem)],
            root_certificates=self.ca_pem,
            require_client_auth=True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Dials with our certificate and trusts only servers the CA signed."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem,
            private_key=self.key_pem,
            certificate_chain=self.cert_pem,
        )


def channel_options(tls: ClusterTLS | None) -> list[tuple[str, str]]:
    """What an internal channel adds for `tls`: the name the server's certificate
    must carry (see the module docstring)."""
    return [("grpc.ssl_target_name_override", CLUSTER_NAME)] if tls else []


@dataclass(frozen=True)
class PublicTLS:
    """Server-side TLS for the public port, gRPC and HTTP (`--public-tls-cert`,
    `--public-tls-key`): any certificate the users' clients trust; clients are not
    asked for one (they bring API keys)."""

    cert_file: str
    key_file: str

    def __post_init__(self) -> None:
        for flag, name in (
            ("--public-tls-cert", self.cert_file),
            ("--public-tls-key", self.key_file),
        ):
            if not Path(name).is_file():
                raise TLSConfigError(f"{flag} {name}: no such file")

    def server_credentials(self) -> grpc.ServerCredentials:
        pair = (Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes())
        return grpc.ssl_server_credentials([pair])


@dataclass(frozen=True)
class CertificateSet:
    """A CA and a service certificate it signed, PEM-encoded."""

    ca_pem: bytes
    ca_key_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def tls(self) -> ClusterTLS:
        return ClusterTLS(self.ca_pem, self.cert_pem, self.key_pem)

    def write(self, directory: str | Path) -> None:
        """Writes the four files; the keys readable by their owner only."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        for name, data, mode in (
            (CA_FILE, self.ca_pem, 0o644),
            (CERT_FILE, self.cert_pem, 0o644),
            (KEY_FILE, self.key_pem, 0o600),
            (CA_KEY_FILE, self.ca_key_pem, 0o600),
        ):
            target = path / name
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(target, mode)


def make_cluster_certificates(hosts: tuple[str, ...] = (), valid_days: int = 365) -> CertificateSet:
    """A new CA and one certificate, for servers and clients alike, naming
    `CLUSTER_NAME`, localhost, 127.0.0.1 and `hosts` (DNS names or IP addresses)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=valid_days)

    def name(common_name: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kvrelay"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("kvrelay cluster CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys((CLUSTER_NAME, *_DEFAULT_HOSTS, *hosts)):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name(CLUSTER_NAME))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    def key_pem(private_key: ec.EllipticCurvePrivateKey) -> bytes:
        return private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    return CertificateSet(
        ca_pem=ca.public_bytes(serialization.Encoding.PEM),
        ca_key_pem=key_pem(ca_key),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key_pem(key),
    )
