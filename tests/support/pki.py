"""Build a throwaway certificate authority and TLS certificates for the tests.

Keys are RSA 2048 for speed: `create_pki` took about 0.15 s on a 2-core x86_64
machine.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyFormat = Literal["pkcs1", "pkcs8"]

CLIENT_COMMON_NAME = "eventsync-test-client"
SERVER_COMMON_NAME = "localhost"

_RSA_KEY_BITS = 2048
_CA_VALIDITY_DAYS = 365
_LEAF_VALIDITY_DAYS = 30

# Leaf certificates start one hour in the past so that a clock a little behind
# does not make a fresh certificate "not yet valid".
_CLOCK_SKEW = dt.timedelta(hours=1)

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class Pki:
    """PEM files of a test CA, a broker certificate and a client certificate.

    `ca_cert` signs the server and client certificates. `other_ca_cert` is a
    second, unrelated CA: a client that trusts only it cannot verify the
    broker, and the broker cannot verify a client certificate it signed.
    """

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key_pkcs1: Path
    client_key_pkcs8: Path
    other_ca_cert: Path
    other_ca_key: Path
    client_common_name: str = CLIENT_COMMON_NAME

    def client_key(self, key_format: KeyFormat) -> Path:
        """Return the default client key file in `key_format`."""
        if key_format == "pkcs1":
            return self.client_key_pkcs1
        if key_format == "pkcs8":
            return self.client_key_pkcs8
        raise ValueError(f"invalid key format {key_format!r}: use 'pkcs1' or 'pkcs8'")

    def issue_client(
        self,
        name: str,
        *,
        days: float = _LEAF_VALIDITY_DAYS,
        not_before_offset_days: float = 0,
        key_format: KeyFormat = "pkcs8",
        issuer: Literal["ca", "other_ca"] = "ca",
    ) -> tuple[Path, Path]:
        """Issue a client certificate with common name `name`.

        The certificate is valid from now plus `not_before_offset_days` for
        `days` days, so a negative offset larger than `days` gives an expired
        certificate and a positive offset a not-yet-valid one. With
        `use_identity_as_username`, mosquitto takes `name` as the username.
        Returns the certificate and key paths. File names get a random suffix,
        so issuing the same name twice gives two separate files.
        """
        if not _SAFE_NAME.fullmatch(name):
            raise ValueError(
                f"invalid client name {name!r}: use 1-64 letters, digits, '_', '.'"
                " or '-', starting with a letter or digit"
            )
        if days <= 0:
            raise ValueError(f"invalid validity {days!r} days: must be positive")

        if issuer == "ca":
            issuer_cert_path, issuer_key_path = self.ca_cert, self.ca_key
        else:
            issuer_cert_path, issuer_key_path = self.other_ca_cert, self.other_ca_key
        issuer_cert = x509.load_pem_x509_certificate(issuer_cert_path.read_bytes())
        issuer_key = _load_rsa_key(issuer_key_path)

        not_before = _now() + dt.timedelta(days=not_before_offset_days)
        key = _new_key()
        cert = _build_leaf(
            common_name=name,
            public_key=key.public_key(),
            issuer_cert=issuer_cert,
            issuer_key=issuer_key,
            not_before=not_before,
            not_after=not_before + dt.timedelta(days=days),
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        )

        stem = f"{name}-{secrets.token_hex(4)}"
        cert_path = self.directory / f"{stem}.crt"
        key_path = self.directory / f"{stem}.key"
        _write_cert(cert_path, cert)
        _write_key(key_path, key, key_format)
        return cert_path, key_path


def create_pki(directory: Path) -> Pki:
    """Generate a CA, server and client certificates and a second CA in `directory`.

    The server certificate names DNS:localhost and IP:127.0.0.1, so a client can
    connect to either with hostname verification on. The client key is written
    twice: PKCS#1 (`BEGIN RSA PRIVATE KEY`, the format AWS IoT hands out) and
    PKCS#8 (`BEGIN PRIVATE KEY`).
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = _now()

    ca_key = _new_key()
    ca_cert = _build_ca("eventsync test CA", ca_key, now)
    other_ca_key = _new_key()
    other_ca_cert = _build_ca("eventsync unrelated test CA", other_ca_key, now)

    server_key = _new_key()
    server_cert = _build_leaf(
        common_name=SERVER_COMMON_NAME,
        public_key=server_key.public_key(),
        issuer_cert=ca_cert,
        issuer_key=ca_key,
        not_before=now - _CLOCK_SKEW,
        not_after=now + dt.timedelta(days=_LEAF_VALIDITY_DAYS),
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        subject_alt_names=[
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ],
    )

    client_key = _new_key()
    client_cert = _build_leaf(
        common_name=CLIENT_COMMON_NAME,
        public_key=client_key.public_key(),
        issuer_cert=ca_cert,
        issuer_key=ca_key,
        not_before=now - _CLOCK_SKEW,
        not_after=now + dt.timedelta(days=_LEAF_VALIDITY_DAYS),
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )

    pki = Pki(
        directory=directory,
        ca_cert=directory / "ca.crt",
        ca_key=directory / "ca.key",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key_pkcs1=directory / "client-pkcs1.key",
        client_key_pkcs8=directory / "client-pkcs8.key",
        other_ca_cert=directory / "other-ca.crt",
        other_ca_key=directory / "other-ca.key",
    )
    _write_cert(pki.ca_cert, ca_cert)
    _write_key(pki.ca_key, ca_key, "pkcs8")
    _write_cert(pki.server_cert, server_cert)
    _write_key(pki.server_key, server_key, "pkcs8")
    _write_cert(pki.client_cert, client_cert)
    _write_key(pki.client_key_pkcs1, client_key, "pkcs1")
    _write_key(pki.client_key_pkcs8, client_key, "pkcs8")
    _write_cert(pki.other_ca_cert, other_ca_cert)
    _write_key(pki.other_ca_key, other_ca_key, "pkcs8")
    return pki


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=_RSA_KEY_BITS)


def _load_rsa_key(path: Path) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise TypeError(f"expected an RSA private key in {path}, got {type(key)}")
    return key


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _build_ca(
    common_name: str, key: rsa.RSAPrivateKey, now: dt.datetime
) -> x509.Certificate:
    # Critical basicConstraints and keyUsage keep the CA valid under OpenSSL's
    # strict X.509 checks (VERIFY_X509_STRICT), which Python 3.13's
    # ssl.create_default_context() turns on.
    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=_CA_VALIDITY_DAYS))
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
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def _build_leaf(
    *,
    common_name: str,
    public_key: rsa.RSAPublicKey,
    issuer_cert: x509.Certificate,
    issuer_key: rsa.RSAPrivateKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
    usage: x509.ObjectIdentifier,
    subject_alt_names: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    issuer_ski = issuer_cert.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    ).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
            critical=False,
        )
    )
    if subject_alt_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(subject_alt_names), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _write_key(path: Path, key: rsa.RSAPrivateKey, key_format: KeyFormat) -> None:
    private_format = {
        "pkcs1": serialization.PrivateFormat.TraditionalOpenSSL,
        "pkcs8": serialization.PrivateFormat.PKCS8,
    }[key_format]
    path.touch(mode=0o600, exist_ok=True)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            private_format,
            serialization.NoEncryption(),
        )
    )
