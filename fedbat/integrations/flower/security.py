"""A deployment's credentials: Flower's TLS (a CA and the SuperLink's certificate, which
SuperNodes and ``flwr`` verify) and SuperNode authentication (an EC P-384 key pair per
SuperNode; the SuperLink accepts only the public keys registered with it).

``fedbat flower`` writes a throw-away set for its local deployment, or reads a user's from a
folder laid out as :func:`generate` writes it. Private keys are files of mode 0600 and
never appear in a command line or a log: processes are given their paths.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CA, CERT, KEY = "ca.pem", "superlink.pem", "superlink.key"


@dataclass(frozen=True)
class Credentials:
    """The files of one deployment, by role."""

    root: Path

    @property
    def ca(self) -> Path:
        return self.root / CA

    @property
    def cert(self) -> Path:
        return self.root / CERT

    @property
    def key(self) -> Path:
        return self.root / KEY

    def node_key(self, i: int) -> Path:
        return self.root / f"supernode-{i}.key"

    def node_pub(self, i: int) -> Path:
        return self.root / f"supernode-{i}.pub"

    def missing(self, supernodes: int, present: bool = False) -> list[str]:
        """The files a deployment of ``supernodes`` nodes needs that the folder lacks (or,
        with ``present``, those it holds)."""
        need = [self.ca, self.cert, self.key]
        need += [p for i in range(supernodes) for p in (self.node_key(i), self.node_pub(i))]
        return [p.name for p in need if p.exists() == present]


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """A new file (never an existing one replaced); private keys get mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def generate(root: Path, supernodes: int, hosts: tuple[str, ...] = ("127.0.0.1",)) -> Credentials:
    """A new CA, a SuperLink certificate it signs for ``hosts`` (IP addresses or DNS names),
    and ``supernodes`` key pairs, written under ``root``, which must hold none of them."""
    root.mkdir(parents=True, exist_ok=True)
    creds = Credentials(root)
    if taken := creds.missing(supernodes, present=True):
        raise FileExistsError(f"{root} already holds {', '.join(taken)}")
    ca_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("fedbat deployment CA")
    ca = _certificate(ca_name, ca_name, ca_key.public_key(), ca_key,
                      [x509.BasicConstraints(ca=True, path_length=0)])  # fmt: skip
    sans = x509.SubjectAlternativeName([_host(h) for h in hosts])
    cert = _certificate(_name(hosts[0]), ca_name, key.public_key(), ca_key,
                        [x509.BasicConstraints(ca=False, path_length=None), sans])  # fmt: skip
    _write(creds.ca, ca.public_bytes(serialization.Encoding.PEM))
    _write(creds.cert, cert.public_bytes(serialization.Encoding.PEM))
    _write(creds.key, _pem(key), 0o600)
    for i in range(supernodes):
        node = ec.generate_private_key(ec.SECP384R1())
        _write(creds.node_key(i), _openssh(node), 0o600)
        public = node.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write(creds.node_pub(i), public)
    return creds


def _certificate(
    subject: x509.Name,
    issuer: x509.Name,
    public: ec.EllipticCurvePublicKey,
    signer: ec.EllipticCurvePrivateKey,
    extensions: list[x509.ExtensionType],
) -> x509.Certificate:
    """A certificate valid from 5 minutes ago for a year; BasicConstraints critical."""
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
    )
    for ext in extensions:
        builder = builder.add_extension(ext, critical=isinstance(ext, x509.BasicConstraints))
    return builder.sign(signer, hashes.SHA384())


def _host(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _openssh(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A SuperNode's key as Flower reads it (OpenSSH's private key format)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
