"""Certificates and SuperNode keys for a TLS federation with node authentication.

One private CA signs a server certificate for every TLS endpoint of the federation: the
SuperLink's (`server.crt`), and per SuperNode one for the Runtime API its SuperExec talks to
(`supernode-<i>-tls.crt`), so no node ever holds the SuperLink's private key. The SANs name the
docker-compose service and the loopback addresses, so the same files serve the compose stack and
the local federation. Each SuperNode also gets an EC P-384 key pair in OpenSSH format for node
authentication, the format `flower-supernode --auth-supernode-private-key` and
`flwr supernode register` read.

Usage: `fedpsg certs OUT_DIR --nodes 3` writes `ca.crt ca.key server.crt server.key` and per node
`supernode-<i> supernode-<i>.pub supernode-<i>-tls.crt supernode-<i>-tls.key`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
VALIDITY = dt.timedelta(days=365)


def server_names(service: str) -> list[str]:
    """SANs for the certificate of compose service `service`: its name plus loopback."""
    return [service, *LOOPBACK_NAMES]


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpsg"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def make_ca(now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed certificate authority."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name("fedpsg federation CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    names: list[str],
    now: dt.datetime,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A server certificate signed by the CA, valid for every name in `names`."""
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def write_node_key(path: Path, comment: str) -> None:
    """An EC P-384 key pair in OpenSSH format: `path` (private) and `path.pub` (public)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(path, private, private=True)
    path.with_name(path.name + ".pub").write_bytes(public + f" {comment}\n".encode())


def make_certificates(out: Path, num_nodes: int, *, extra_names: Iterable[str] = ()) -> Path:
    """Write the CA, the SuperLink's and each SuperNode's TLS certificate and key, and
    `num_nodes` SuperNode authentication key pairs into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key, ca_cert = make_ca(now)
    _write(out / "ca.key", _pem_key(ca_key), private=True)
    _write(out / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    endpoints = {"server": "superlink", **{f"supernode-{i}-tls": f"supernode-{i}" for i in
                                           range(num_nodes)}}  # fmt: skip
    for stem, service in endpoints.items():
        key, cert = make_server_cert(
            ca_key, ca_cert, server_names(service) + list(extra_names), now
        )
        _write(out / f"{stem}.key", _pem_key(key), private=True)
        _write(out / f"{stem}.crt", cert.public_bytes(serialization.Encoding.PEM))
    for i in range(num_nodes):
        write_node_key(out / f"supernode-{i}", comment=f"supernode-{i}@fedpsg")
    return out


def main(
    out: Annotated[Path, typer.Argument(help="Folder to write the certificates and keys into.")],
    nodes: Annotated[int, typer.Option(min=1, help="Number of SuperNode key pairs.")] = 3,
    name: Annotated[
        list[str] | None, typer.Option(help="Extra DNS name or IP for the server certificate.")
    ] = None,
) -> None:
    """Make the CA, the server certificate and the SuperNode key pairs."""
    make_certificates(out, nodes, extra_names=name or ())
    typer.echo(f"wrote CA, server certificate and {nodes} SuperNode key pairs to {out}")
