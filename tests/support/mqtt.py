"""MQTT clients that authenticate with the test PKI, built on aiomqtt 2.x.

Clients speak MQTT 3.1.1, aiomqtt's default. In 3.1.1 the broker sets the
retain flag only on messages it delivers from its retained store when a client
subscribes. A message published while the client is subscribed arrives with
retain=False, even if the publisher set retain=True.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
from paho.mqtt.reasoncodes import ReasonCode

from .pki import KeyFormat, Pki

DEFAULT_TIMEOUT_SECONDS = 10.0


def client_ssl_context(
    pki: Pki,
    key: KeyFormat = "pkcs8",
    *,
    ca_cert: Path | None = None,
    client_cert_and_key: tuple[Path, Path] | None = None,
) -> ssl.SSLContext:
    """Build a client SSLContext that verifies the broker and presents a certificate.

    By default the context trusts `pki.ca_cert` and presents the default client
    certificate with its key in `key` format. `ca_cert` replaces the trusted CA,
    and `client_cert_and_key` replaces the certificate, for example with a pair
    from `Pki.issue_client`. Hostname verification stays on, so connect to
    "localhost" or "127.0.0.1", the names in the broker certificate.
    """
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=ca_cert or pki.ca_cert
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_cert_and_key is None:
        client_cert_and_key = (pki.client_cert, pki.client_key(key))
    cert_path, key_path = client_cert_and_key
    context.load_cert_chain(certfile=cert_path, keyfile=key_path)
    return context


def unique_client_id(prefix: str = "test") -> str:
    """Return a client identifier no other client in the run uses.

    The result stays within MQTT 3.1.1's 23-byte limit while `prefix` is at
    most 14 characters.
    """
    return f"{prefix}-{secrets.token_hex(4)}"


def mqtt_client(
    host: str,
    port: int,
    pki: Pki,
    *,
    key: KeyFormat = "pkcs8",
    tls_context: ssl.SSLContext | None = None,
    identifier: str | None = None,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
) -> aiomqtt.Client:
    """Create an unconnected aiomqtt client; `async with` connects it."""
    return aiomqtt.Client(
        host,
        port,
        tls_context=tls_context or client_ssl_context(pki, key),
        identifier=identifier or unique_client_id(),
        timeout=timeout_seconds,
    )


async def publish_retained(
    host: str, port: int, pki: Pki, messages: Mapping[str, bytes]
) -> None:
    """Publish each topic's payload as a retained QoS 1 message.

    An empty payload deletes the topic's retained message.
    """
    async with mqtt_client(host, port, pki) as client:
        for topic, payload in messages.items():
            await client.publish(topic, payload, qos=1, retain=True)


@dataclass(frozen=True)
class ReceivedMessage:
    """One PUBLISH delivered to a subscriber."""

    topic: str
    payload: bytes
    retain: bool
    qos: int


class MessageCollector:
    """Messages delivered to one subscribed client, in arrival order."""

    def __init__(self) -> None:
        self.messages: list[ReceivedMessage] = []
        self._arrived = asyncio.Event()
        self._last_arrival = time.monotonic()
        self._reader: asyncio.Task[None] | None = None

    def retained(self) -> dict[str, bytes]:
        """Return topic -> payload of messages delivered from the retained store."""
        return {m.topic: m.payload for m in self.messages if m.retain}

    def live(self) -> list[ReceivedMessage]:
        """Return the messages published while the client was subscribed."""
        return [m for m in self.messages if not m.retain]

    async def wait_quiet(
        self,
        quiet_seconds: float = 0.5,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        """Wait until no message has arrived for `quiet_seconds`.

        The quiet period starts at the call at the earliest. Raises TimeoutError
        if messages keep arriving for `timeout_seconds`, and re-raises the
        reader's error if the connection was lost.
        """
        deadline = time.monotonic() + timeout_seconds
        start = time.monotonic()
        while True:
            self._raise_reader_error()
            now = time.monotonic()
            quiet_until = max(start, self._last_arrival) + quiet_seconds
            if now >= quiet_until:
                return
            if now >= deadline:
                raise TimeoutError(
                    f"messages kept arriving for {timeout_seconds} s"
                    f" ({len(self.messages)} collected)"
                )
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._arrived.wait(), min(quiet_until, deadline) - now
                )

    async def wait_for_count(
        self, count: int, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    ) -> None:
        """Wait until at least `count` messages have arrived.

        Raises TimeoutError after `timeout_seconds` and re-raises the reader's
        error if the connection was lost.
        """
        deadline = time.monotonic() + timeout_seconds
        while len(self.messages) < count:
            self._raise_reader_error()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"expected {count} messages within {timeout_seconds} s,"
                    f" got {len(self.messages)}"
                )
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    async def _read(self, client: aiomqtt.Client) -> None:
        try:
            async for message in client.messages:
                payload = message.payload
                if not isinstance(payload, bytes):
                    raise TypeError(f"unexpected payload type {type(payload)}")
                self.messages.append(
                    ReceivedMessage(
                        topic=message.topic.value,
                        payload=payload,
                        retain=message.retain,
                        qos=message.qos,
                    )
                )
                self._last_arrival = time.monotonic()
                self._arrived.set()
        finally:
            # Wake waiters so that they see the reader has stopped.
            self._arrived.set()

    def _raise_reader_error(self) -> None:
        if self._reader is None or not self._reader.done():
            return
        error = self._reader.exception()
        if error is not None:
            raise error
        raise RuntimeError("the MQTT reader stopped while the collector was open")


@contextlib.asynccontextmanager
async def subscribe_collect(
    host: str,
    port: int,
    pki: Pki,
    topics_or_filter: str | Sequence[str],
    *,
    key: KeyFormat = "pkcs8",
    qos: int = 1,
) -> AsyncIterator[MessageCollector]:
    """Subscribe and record every message delivered while the block runs.

    A single string is one subscription and may contain wildcards. A sequence
    subscribes to each topic in it. The subscription is acknowledged (SUBACK)
    before the block starts. Retained messages that the broker sends on
    subscribing are recorded too, with retain=True. Raises RuntimeError if the
    broker rejects a subscription. If the connection drops, leaving the block
    raises the reader's MqttError.
    """
    subscriptions = _subscriptions(topics_or_filter, qos)
    collector = MessageCollector()
    async with mqtt_client(host, port, pki, key=key) as client:
        granted = await client.subscribe(subscriptions)
        rejected = [
            topic
            for (topic, _), code in zip(subscriptions, granted, strict=True)
            if _is_failure(code)
        ]
        if rejected:
            raise RuntimeError(f"the broker rejected the subscriptions {rejected}")
        reader = asyncio.create_task(collector._read(client), name="mqtt-collector")
        collector._reader = reader
        try:
            yield collector
        finally:
            reader.cancel()
            await asyncio.wait([reader])
            reader_error = None if reader.cancelled() else reader.exception()
    # Raised after the client is closed, and only when the block itself raised
    # nothing, so that it never hides an error from the block.
    if reader_error is not None:
        raise reader_error


async def read_retained(
    host: str,
    port: int,
    pki: Pki,
    topics_or_filter: str | Sequence[str],
    *,
    quiet_seconds: float = 0.5,
    # A deadline for the whole read, connect included, so asyncio.timeout()
    # around the call would do the same.
    timeout: float = DEFAULT_TIMEOUT_SECONDS,  # noqa: ASYNC109
) -> dict[str, bytes]:
    """Return topic -> payload of the retained messages matching the subscription.

    Connects with the PKCS#8 client key, subscribes as `subscribe_collect`
    does, and stops once no message has arrived for `quiet_seconds`. Messages
    published live during the read (retain=False) are left out. Raises
    TimeoutError if the whole read takes more than `timeout` seconds.
    """
    async with asyncio.timeout(timeout):
        async with subscribe_collect(host, port, pki, topics_or_filter) as collector:
            await collector.wait_quiet(quiet_seconds, timeout_seconds=timeout)
    return collector.retained()


def _is_failure(code: object) -> bool:
    # aiomqtt 2.5 returns paho ReasonCodes. Its type hints also allow plain
    # ints, the MQTT 3.1.1 SUBACK return codes, where 0x80 means failure.
    if isinstance(code, ReasonCode):
        return bool(code.is_failure)
    if isinstance(code, int):
        return code >= 0x80
    raise TypeError(f"unexpected SUBACK code {code!r}")


def _subscriptions(
    topics_or_filter: str | Sequence[str], qos: int
) -> list[tuple[str, int]]:
    if isinstance(topics_or_filter, str):
        return [(topics_or_filter, qos)]
    topics = list(topics_or_filter)
    if not topics:
        raise ValueError("no topics to subscribe to: pass a filter or topic names")
    return [(topic, qos) for topic in topics]
