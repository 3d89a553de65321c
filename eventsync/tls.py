"""The TLS context for the MQTT connection: mutual TLS, 1.2 or newer."""

from __future__ import annotations

import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from eventsync.config import MqttSettings


def build_ssl_context(mqtt: MqttSettings) -> ssl.SSLContext:
    """Build a client context that verifies the broker and presents our certificate.

    OpenSSL reads both PKCS#1 (`BEGIN RSA PRIVATE KEY`, as AWS IoT issues keys)
    and PKCS#8 (`BEGIN PRIVATE KEY`) key files, so either loads as it is.
    Raises ssl.SSLError with a message that names the file that failed.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = not mqtt.insecure_skip_hostname_verification
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cafile=mqtt.ca_file)
    except (ssl.SSLError, ValueError) as exc:
        raise ssl.SSLError(
            f"CA file {str(mqtt.ca_file)!r} holds no usable certificate: {exc}"
        ) from exc
    try:
        context.load_cert_chain(certfile=mqtt.cert_file, keyfile=mqtt.key_file)
    except ssl.SSLError as exc:
        raise ssl.SSLError(
            f"certificate {str(mqtt.cert_file)!r} and key {str(mqtt.key_file)!r} "
            f"cannot be loaded as a pair (wrong format, encrypted key, or a key "
            f"that does not match the certificate): {exc}"
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
