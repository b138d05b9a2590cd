"""Certificates: a CA, serving and client certificates, service-account keys.

The watcher issues its admission webhook's serving certificate with these when
none is configured, and ``mcsctl webhook-certificate`` writes one that several
watchers share; the local environment uses them for each cluster's CA,
API-server, admin client (group ``system:masters``) and service-account keys.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = dt.timedelta(days=365)
WEBHOOK_CA_NAME = "multicluster-scheduler-webhook-ca"


@dataclass(frozen=True)
class KeyPair:
    """PEM-encoded certificate and private key."""

    cert_pem: bytes
    key_pem: bytes

    def write(self, cert_path: Path, key_path: Path) -> None:
        cert_path.write_bytes(self.cert_pem)
        write_private(key_path, self.key_pem)

    def load_into(self, context: ssl.SSLContext) -> None:
        """Serve with this pair (``ssl`` reads certificates only from files: a private temporary directory)."""
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
            self.write(cert, key)
            context.load_cert_chain(cert, key)


def write_private(path: Path, data: bytes) -> None:
    """Write a key or a password readable by its owner only, from the first byte."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def new_ca(common_name: str) -> KeyPair:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue(
    ca: KeyPair,
    common_name: str,
    *,
    organization: str | None = None,
    dns_names: tuple[str, ...] = (),
    ip_addresses: tuple[str, ...] = (),
    server: bool = False,
    client: bool = False,
) -> KeyPair:
    """Issue a leaf certificate signed by ``ca``."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = _key()
    now = dt.datetime.now(dt.UTC)
    usages = []
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, organization))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def serving(ca: KeyPair, host: str) -> KeyPair:
    """A serving certificate for ``host``, an IP address or a DNS name (then also valid for 127.0.0.1)."""
    if _is_ip(host):
        return issue(ca, host, server=True, ip_addresses=(host,))
    return issue(ca, host, server=True, dns_names=(host,), ip_addresses=("127.0.0.1",))


@dataclass(frozen=True)
class ServingFiles:
    """Where a shared serving certificate, its key and its CA are written."""

    cert_file: Path
    key_file: Path
    ca_file: Path

    @classmethod
    def under(cls, directory: Path) -> ServingFiles:
        return cls(directory / "tls.crt", directory / "tls.key", directory / "ca.crt")


def _usable(files: ServingFiles, host: str) -> bool:
    """The files there hold a certificate for ``host``, valid for at least another month, signed by
    the CA beside it, with its own key (a run cut short leaves something else: it is made anew)."""
    try:
        cert = x509.load_pem_x509_certificate(files.cert_file.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(files.ca_file.read_bytes()))
        key = serialization.load_pem_private_key(files.key_file.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    if key.public_key() != cert.public_key():
        return False
    wanted = x509.IPAddress(ipaddress.ip_address(host)) if _is_ip(host) else x509.DNSName(host)
    return wanted in names and cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=30)


def write_serving(directory: Path, host: str, ca_name: str) -> ServingFiles:
    """A CA and a serving certificate for ``host`` under ``directory``, for every process that serves
    one address (the watchers behind one webhook URL). Kept when already there, valid for ``host``
    and not about to expire, so processes started later, or again, serve the same one."""
    files = ServingFiles.under(directory)
    if _usable(files, host):
        return files
    directory.mkdir(parents=True, exist_ok=True)
    ca = new_ca(ca_name)
    serving(ca, host).write(files.cert_file, files.key_file)
    files.ca_file.write_bytes(ca.cert_pem)
    return files


def service_account_keys() -> KeyPair:
    """Key pair the API server signs service-account tokens with (cert_pem holds the public key)."""
    key = _key()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return KeyPair(public, _key_pem(key))
