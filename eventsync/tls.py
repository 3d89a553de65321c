"""The TLS context for the MQTT connection: mutual TLS, 1.2 or newer."""

from __future__ import annotations

import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING

from eventsync.errors import ConfigError

if TYPE_CHECKING:
    from eventsync.config import MqttSettings


class TlsFileError(ssl.SSLError):
    """A CA, certificate or key file that OpenSSL cannot load.

    `settings` names the settings that point at the files, and str() of the
    error is its message alone, not the tuple that ssl.SSLError prints.
    """

    def __init__(self, settings: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.settings = settings
        self.message = message

    def __str__(self) -> str:
        return self.message


class _EncryptedKeyError(Exception):
    """Raised from the password callback, so OpenSSL never prompts on the terminal."""


def _reject_password() -> str:
    raise _EncryptedKeyError


def build_ssl_context(mqtt: MqttSettings) -> ssl.SSLContext:
    """Build a client context that verifies the broker and presents our certificate.

    OpenSSL reads both PKCS#1 (`BEGIN RSA PRIVATE KEY`, as AWS IoT issues keys)
    and PKCS#8 (`BEGIN PRIVATE KEY`) key files, so either loads as it is.
    Raises TlsFileError, a subclass of ssl.SSLError, whose message names the
    file that failed. An encrypted key fails too, because eventsync has no
    passphrase to give.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = not mqtt.insecure_skip_hostname_verification
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cafile=mqtt.ca_file)
    except (ssl.SSLError, ValueError) as exc:
        raise TlsFileError(
            ("mqtt.ca_file",),
            f"CA file {str(mqtt.ca_file)!r} holds no usable certificate: {exc}",
        ) from exc
    try:
        context.load_cert_chain(
            certfile=mqtt.cert_file, keyfile=mqtt.key_file, password=_reject_password
        )
    except _EncryptedKeyError:
        raise TlsFileError(
            ("mqtt.key_file",),
            f"key file {str(mqtt.key_file)!r} is encrypted; eventsync needs an "
            "unencrypted key (decrypt it with `openssl pkey -in KEY -out NEW_KEY`)",
        ) from None
    except ssl.SSLError as exc:
        raise TlsFileError(
            ("mqtt.cert_file", "mqtt.key_file"),
            f"certificate {str(mqtt.cert_file)!r} and key {str(mqtt.key_file)!r} "
            f"cannot be loaded as a pair (wrong format, or a key that does not "
            f"match the certificate): {exc}",
        ) from exc
    alpn = mqtt.effective_alpn
    if alpn:
        context.set_alpn_protocols([alpn])
    return context


def certificate_validity_problem(path: Path, now: float | None = None) -> str | None:
    """Return why the first certificate in `path` is not valid at `now`, or None.

    NOTE: this reads the dates with `ssl._ssl._test_decode_cert`, a private
    CPython function (present from 3.4 through 3.13 at least). Where it is
    missing the check is skipped, and the broker rejects the certificate at
    connect time instead.
    """
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    try:
        decoded = decode(str(path))
        not_before = ssl.cert_time_to_seconds(decoded["notBefore"])
        not_after = ssl.cert_time_to_seconds(decoded["notAfter"])
    except (ssl.SSLError, KeyError, ValueError):
        return None
    moment = time.time() if now is None else now
    if moment < not_before:
        return f"certificate {str(path)!r} is not valid before {decoded['notBefore']}"
    if moment > not_after:
        return f"certificate {str(path)!r} expired on {decoded['notAfter']}"
    return None


def check_certificate_files(mqtt: MqttSettings, now: float | None = None) -> list[str]:
    """Load the CA, certificate and key once, so that a bad file stops start-up.

    Raises ConfigError naming the setting, the file and what is wrong with it:
    missing, unreadable, not PEM, an encrypted key, a key that does not match
    the certificate, or a client certificate outside its validity period.
    Returns warnings that do not stop start-up, such as a private key that
    other users can read.
    """
    for setting, path in (
        ("mqtt.ca_file", mqtt.ca_file),
        ("mqtt.cert_file", mqtt.cert_file),
        ("mqtt.key_file", mqtt.key_file),
    ):
        try:
            with path.open("rb"):
                pass
        except FileNotFoundError:
            raise ConfigError(
                f"invalid setting {setting}: file {str(path)!r} not found"
            ) from None
        except IsADirectoryError:
            raise ConfigError(
                f"invalid setting {setting}: {str(path)!r} is a folder, not a file"
            ) from None
        except OSError as exc:
            raise ConfigError(
                f"invalid setting {setting}: file {str(path)!r} cannot be read: {exc.strerror}"
            ) from None

    try:
        build_ssl_context(mqtt)
    except TlsFileError as exc:
        settings = " and ".join(exc.settings)
        raise ConfigError(f"invalid setting {settings}: {exc.message}") from None
    problem = certificate_validity_problem(mqtt.cert_file, now)
    if problem is not None:
        raise ConfigError(f"invalid setting mqtt.cert_file: {problem}")

    warnings = []
    mode = mqtt.key_file.stat().st_mode & 0o777
    if mode & 0o077:
        warnings.append(
            f"private key {str(mqtt.key_file)!r} is readable by other users "
            f"(mode {mode:o}); restrict it with chmod 600"
        )
    return warnings
