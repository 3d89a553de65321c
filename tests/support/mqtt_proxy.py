"""An MQTT 3.1.1 proxy over mutual TLS that injects broker faults on request.

The proxy sits between a client under test and a real broker. It accepts TLS
connections on 127.0.0.1 with the test PKI's server certificate and requires a
client certificate signed by the test CA. For each client it opens one
connection to the broker on 127.0.0.1, presenting the test client certificate.
Packets are framed by their fixed header and remaining length and forwarded
unchanged. Only PUBLISH (topic, packet identifier, payload) and PUBACK (packet
identifier) are decoded, so that faults can target topics and every publish
can be matched with its acknowledgement.

The proxy runs on the event loop that starts it. A test that also waits in
blocking calls, such as `DaemonProcess.wait_for`, must run those in a thread
(`asyncio.to_thread`), or the proxy stops forwarding while they block.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self

from . import LOOPBACK, RESERVED_PORTS
from .mqtt import client_ssl_context
from .pki import SERVER_COMMON_NAME, Pki

PUBLISH = 3
PUBACK = 4

# The remaining length is a variable-length integer of at most 4 bytes.
_MAX_LENGTH_BYTES = 4
# How long a closing connection may take to send TLS close_notify before it is
# aborted.
_CLOSE_TIMEOUT_SECONDS = 1.0

PublishAction = Literal["forwarded", "swallowed", "denied"]


class MalformedPacketError(ValueError):
    """A packet's fixed header or PUBLISH variable header could not be decoded."""


@dataclass(frozen=True, slots=True)
class Packet:
    """One MQTT control packet: `raw` is the whole packet, fixed header included."""

    raw: bytes
    header_size: int

    @property
    def packet_type(self) -> int:
        return self.raw[0] >> 4

    @property
    def body(self) -> bytes:
        """The variable header and payload."""
        return self.raw[self.header_size :]


@dataclass(slots=True)
class PublishRecord:
    """A PUBLISH that a client sent through the proxy, and what the proxy did with it.

    `acknowledged` becomes True once the broker's PUBACK for it was written to
    the client. A PUBACK that a cut drops from the client's send buffer still
    counts, so a client may lack PUBACKs that its records show.
    """

    connection: int
    topic: str
    packet_id: int | None
    payload: bytes
    action: PublishAction
    acknowledged: bool = False


async def read_packet(reader: asyncio.StreamReader) -> Packet:
    """Read one packet.

    Raises IncompleteReadError at end of stream, and MalformedPacketError when
    the remaining length takes more than 4 bytes.
    """
    header = bytearray(await reader.readexactly(1))
    remaining_length = 0
    for position in range(_MAX_LENGTH_BYTES):
        byte = (await reader.readexactly(1))[0]
        header.append(byte)
        remaining_length += (byte & 0x7F) << (7 * position)
        if not byte & 0x80:
            break
    else:
        raise MalformedPacketError(
            f"remaining length longer than {_MAX_LENGTH_BYTES} bytes"
        )
    body = await reader.readexactly(remaining_length)

    return Packet(bytes(header) + body, len(header))


def decode_publish(packet: Packet) -> tuple[str, int | None, bytes]:
    """Return the topic, packet identifier (None at QoS 0) and payload of a PUBLISH."""
    body = packet.body
    qos = (packet.raw[0] >> 1) & 0x03
    if len(body) < 2:
        raise MalformedPacketError("PUBLISH shorter than its topic length field")
    topic_end = 2 + int.from_bytes(body[:2], "big")
    try:
        topic = body[2:topic_end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedPacketError("PUBLISH topic is not valid UTF-8") from exc
    if qos == 0:
        return topic, None, body[topic_end:]
    if len(body) < topic_end + 2:
        raise MalformedPacketError(f"PUBLISH to {topic!r} lacks its packet identifier")
    packet_id = int.from_bytes(body[topic_end : topic_end + 2], "big")

    return topic, packet_id, body[topic_end + 2 :]


def decode_puback(packet: Packet) -> int:
    """Return the packet identifier of a PUBACK."""
    if len(packet.body) < 2:
        raise MalformedPacketError("PUBACK shorter than its packet identifier")
    return int.from_bytes(packet.body[:2], "big")


@dataclass(eq=False, slots=True)
class _Link:
    """One client connection and the broker connection opened for it."""

    number: int
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    # Packet identifier -> forwarded PUBLISH that waits for its PUBACK.
    pending: dict[int, PublishRecord] = field(default_factory=dict)
    forwarded_publishes: int = 0

    def abort(self) -> None:
        """Close both sockets at once, without TLS close_notify or flushing."""
        self.client.transport.abort()
        self.upstream.transport.abort()

    async def close(self) -> None:
        """Flush and close both sides, aborting a side that does not close in time."""
        for writer in (self.client, self.upstream):
            writer.close()
        for writer in (self.client, self.upstream):
            try:
                await asyncio.wait_for(writer.wait_closed(), _CLOSE_TIMEOUT_SECONDS)
            except (TimeoutError, OSError):
                writer.transport.abort()


class MqttFaultProxy:
    """A TLS-terminating MQTT proxy on a free port of 127.0.0.1.

    Faults apply to every connection from the moment they are set.
    `cut` closes connections, `swallow` drops publishes without a PUBACK, and
    `deny` closes the connection of a client that publishes to a topic. The
    counters and `records` show what was forwarded, for assertions.
    """

    host = SERVER_COMMON_NAME

    def __init__(
        self,
        pki: Pki,
        upstream_port: int,
        *,
        upstream_timeout_seconds: float = 5.0,
    ) -> None:
        """Prepare a proxy to the broker's TLS listener on 127.0.0.1:`upstream_port`."""
        if upstream_port in RESERVED_PORTS:
            raise ValueError(
                f"port {upstream_port} is reserved for the machine's own broker"
            )
        self._upstream_port = upstream_port
        self._upstream_timeout_seconds = upstream_timeout_seconds
        self._server_context = _server_ssl_context(pki)
        self._upstream_context = client_ssl_context(pki)
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._connection_numbers = itertools.count(1)
        self._publish_forwarded = asyncio.Event()

        self._swallow_all = False
        self._swallowed_topics: set[str] = set()
        self._denied_topics: set[str] = set()
        self._cut_after_publishes: int | None = None
        self._cut_baseline: dict[_Link, int] = {}

        self.records: list[PublishRecord] = []
        self.forwarded_publishes: Counter[str] = Counter()
        self.forwarded_pubacks: Counter[str] = Counter()
        self.swallowed_publishes: Counter[str] = Counter()
        self.denied_publishes: Counter[str] = Counter()
        self.accepted_connections = 0
        self.upstream_failures = 0
        self.cuts = 0

    @property
    def port(self) -> int:
        """TCP port of the proxy's TLS listener on 127.0.0.1."""
        if self._port is None:
            raise RuntimeError("the proxy has no port yet: call start() first")
        return self._port

    @property
    def open_connections(self) -> int:
        return len(self._links)

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1 that is not a reserved port."""
        if self._server is not None:
            raise RuntimeError(f"the proxy on port {self.port} is already running")
        while True:
            server = await asyncio.start_server(
                self._accept, LOOPBACK, 0, ssl=self._server_context
            )
            port: int = server.sockets[0].getsockname()[1]
            if port not in RESERVED_PORTS:
                break
            server.close()
            await server.wait_closed()
        self._server = server
        self._port = port

    async def stop(self) -> None:
        """Stop listening and close every connection abruptly."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for link in list(self._links):
            link.abort()
        for handler in list(self._handlers):
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    def cut(self, *, after_publishes: int | None = None) -> None:
        """Close every connection abruptly, now or after more publishes.

        With `after_publishes`, the cut happens once any one connection has
        forwarded that many more PUBLISH packets, counted from this call, and
        then the arming ends. The proxy keeps accepting new connections.
        """
        if after_publishes is None:
            self._cut_all()
            return
        if after_publishes < 1:
            raise ValueError(
                f"invalid after_publishes {after_publishes}: must be at least 1"
            )
        self._cut_after_publishes = after_publishes
        self._cut_baseline = {link: link.forwarded_publishes for link in self._links}

    def swallow(self, topics: Iterable[str] | None = None) -> None:
        """Drop PUBLISH packets to `topics`, or to every topic, without a PUBACK.

        AWS IoT Core does the same to publishes over its rate limit. Calls add
        to the set of swallowed topics.
        """
        if topics is None:
            self._swallow_all = True
            return
        self._swallowed_topics.update(topics)

    def stop_swallowing(self) -> None:
        """Forward every PUBLISH again."""
        self._swallow_all = False
        self._swallowed_topics.clear()

    def deny(self, topic: str) -> None:
        """Close the client's connection whenever it publishes to `topic`.

        AWS IoT Core disconnects a client that publishes to a topic its policy
        denies, without a PUBACK. The PUBLISH is not forwarded.
        """
        self._denied_topics.add(topic)

    def allow(self, topic: str) -> None:
        """Forward PUBLISH packets to a topic that `deny` named."""
        self._denied_topics.discard(topic)

    def publish_count(self) -> int:
        """Return how many PUBLISH packets were forwarded to the broker in all."""
        return sum(self.forwarded_publishes.values())

    async def wait_for_publishes(
        self, count: int, timeout_seconds: float = 20.0
    ) -> None:
        """Wait until at least `count` PUBLISH packets were forwarded in all.

        Raises TimeoutError, with the count so far, after `timeout_seconds`.
        """
        deadline = time.monotonic() + timeout_seconds
        while self.publish_count() < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"expected {count} forwarded publishes within {timeout_seconds} s,"
                    f" got {self.publish_count()}"
                )
            self._publish_forwarded.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._publish_forwarded.wait(), remaining)

    async def _accept(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        # asyncio has completed the TLS handshake, client certificate included,
        # before it calls this.
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            await self._serve(client_reader, client_writer)
        finally:
            self._handlers.discard(handler)

    async def _serve(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        self.accepted_connections += 1
        number = next(self._connection_numbers)
        try:
            upstream_reader, upstream_writer = await asyncio.wait_for(
                asyncio.open_connection(
                    LOOPBACK,
                    self._upstream_port,
                    ssl=self._upstream_context,
                    server_hostname=SERVER_COMMON_NAME,
                ),
                self._upstream_timeout_seconds,
            )
        except (OSError, TimeoutError):
            # The broker is down or does not accept the connection, so the
            # client's connection is closed as the broker would close it.
            # NOTE: the client sees the close after its TLS handshake, not a
            # refused TCP connection, and aiomqtt 2.5 then waits out its
            # connect timeout for CONNACK.
            self.upstream_failures += 1
            client_writer.transport.abort()
            return

        link = _Link(number, client_writer, upstream_writer)
        self._links.add(link)
        to_broker = asyncio.create_task(
            self._forward_from_client(link, client_reader),
            name=f"mqtt-proxy-{number}-to-broker",
        )
        to_client = asyncio.create_task(
            self._forward_from_broker(link, upstream_reader),
            name=f"mqtt-proxy-{number}-to-client",
        )
        try:
            await asyncio.wait({to_broker, to_client}, return_when="FIRST_COMPLETED")
        finally:
            self._links.discard(link)
            self._cut_baseline.pop(link, None)
            to_broker.cancel()
            to_client.cancel()
            await asyncio.gather(to_broker, to_client, return_exceptions=True)
            # When one side ends, close the other. A side that was already
            # aborted stays aborted.
            await link.close()

    async def _forward_from_client(
        self, link: _Link, reader: asyncio.StreamReader
    ) -> None:
        with contextlib.suppress(
            asyncio.IncompleteReadError, ConnectionError, OSError, MalformedPacketError
        ):
            while True:
                packet = await read_packet(reader)
                if packet.packet_type == PUBLISH:
                    if not await self._handle_publish(link, packet):
                        return
                    continue
                link.upstream.write(packet.raw)
                await link.upstream.drain()

    async def _handle_publish(self, link: _Link, packet: Packet) -> bool:
        """Apply the faults to one PUBLISH; return whether the connection stays open."""
        topic, packet_id, payload = decode_publish(packet)

        if topic in self._denied_topics:
            self.records.append(
                PublishRecord(link.number, topic, packet_id, payload, "denied")
            )
            self.denied_publishes[topic] += 1
            link.abort()
            return False

        if self._swallow_all or topic in self._swallowed_topics:
            self.records.append(
                PublishRecord(link.number, topic, packet_id, payload, "swallowed")
            )
            self.swallowed_publishes[topic] += 1
            return True

        link.upstream.write(packet.raw)
        await link.upstream.drain()
        record = PublishRecord(link.number, topic, packet_id, payload, "forwarded")
        self.records.append(record)
        self.forwarded_publishes[topic] += 1
        if packet_id is not None:
            link.pending[packet_id] = record
        link.forwarded_publishes += 1
        self._publish_forwarded.set()

        if self._cut_is_due(link):
            self._cut_all()
            return False
        return True

    async def _forward_from_broker(
        self, link: _Link, reader: asyncio.StreamReader
    ) -> None:
        with contextlib.suppress(
            asyncio.IncompleteReadError, ConnectionError, OSError, MalformedPacketError
        ):
            while True:
                packet = await read_packet(reader)
                link.client.write(packet.raw)
                await link.client.drain()
                if packet.packet_type != PUBACK:
                    continue
                record = link.pending.pop(decode_puback(packet), None)
                if record is not None:
                    record.acknowledged = True
                    self.forwarded_pubacks[record.topic] += 1

    def _cut_is_due(self, link: _Link) -> bool:
        if self._cut_after_publishes is None:
            return False
        since_armed = link.forwarded_publishes - self._cut_baseline.get(link, 0)
        return since_armed >= self._cut_after_publishes

    def _cut_all(self) -> None:
        self._cut_after_publishes = None
        self._cut_baseline.clear()
        self.cuts += 1
        for link in list(self._links):
            link.abort()


def _server_ssl_context(pki: Pki) -> ssl.SSLContext:
    """Build the listener's TLS context.

    It presents the broker certificate and requires a client certificate
    signed by the test CA.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki.ca_cert)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(pki.server_cert, pki.server_key)
    return context
