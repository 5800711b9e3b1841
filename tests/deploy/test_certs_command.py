"""`kvrelay certs`: a CA and a certificate for every host given (plus localhost,
127.0.0.1 and the cluster name), keys readable by their owner only, checked with
the `cryptography` library's own verifier."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.verification import PolicyBuilder, Store

from deploy.cli import main
from rpc.tls import CLUSTER_NAME, ClusterTLS, TLSConfigError


def test_the_certificate_names_every_host_and_chains_to_the_ca(tmp_path: Path, capsys) -> None:
    assert main(["certs", str(tmp_path), "--host", "router.internal", "--host", "10.0.0.5"]) == 0
    assert "ca.pem, cert.pem, key.pem and ca-key.pem" in capsys.readouterr().out
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "cert.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {
        CLUSTER_NAME,
        "localhost",
        "router.internal",
    }
    assert set(names.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.0.0.5"),
    }
    for host in (CLUSTER_NAME, "router.internal"):
        verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName(host))
        assert verifier.verify(cert, [])[-1] == ca
    key = load_pem_private_key((tmp_path / "key.pem").read_bytes(), None)
    assert key.public_key() == cert.public_key()
    for name in ("key.pem", "ca-key.pem"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert ClusterTLS.from_dir(tmp_path).ca_pem == (tmp_path / "ca.pem").read_bytes()


def test_an_existing_ca_is_kept_unless_forced(tmp_path: Path, capsys) -> None:
    assert main(["certs", str(tmp_path)]) == 0
    first = (tmp_path / "ca.pem").read_bytes()
    assert main(["certs", str(tmp_path)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "ca.pem").read_bytes() == first
    assert main(["certs", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "ca.pem").read_bytes() != first


def test_a_tls_dir_without_its_files_says_how_to_make_them(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(b"")
    with pytest.raises(TLSConfigError, match=r"lacks cert\.pem, key\.pem; make one with"):
        ClusterTLS.from_dir(tmp_path)
