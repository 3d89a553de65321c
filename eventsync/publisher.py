"""One persistent MQTT connection over mutual TLS, and pipelined retained publishes."""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, Self

import aiomqtt
import paho.mqtt.client as mqtt

from eventsync.config import MqttSettings
from eventsync.logs import get_logger
from eventsync.tls import build_ssl_context

log = get_logger("eventsync.mqtt")

# A connection that lasted this long counts as stable, and the backoff starts
# again from its minimum after it drops.
STABLE_CONNECTION_SECONDS = 60.0
# A connection that drops this soon after it opened, with nothing in flight,
# counts as short-lived. Several in a row point at another client with our id.
SHORT_CONNECTION_SECONDS = 30.0
CLIENT_ID_CONFLICT_DROPS = 3
# paho keeps every publish that never got a PUBACK until the connection closes,
# so after this many the connection is replaced to free them.
MAX_UNACKNOWLEDGED_PER_CONNECTION = 1000
NOT_CONNECTED = "not connected to the MQTT broker"
CONNECTION_LOST = "connection lost before PUBACK"
PUBACK_TIMEOUT = "timed out waiting for PUBACK"


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    topic: str
    body: bytes


# Called once per message with None on PUBACK, or with the reason it failed.
PublishCallback = Callable[[OutgoingMessage, str | None], None]


class RatePacer:
    """Spaces publishes at most `rate_per_second` apart; 0 turns pacing off.

    AWS IoT Core drops publishes over 100 per second per connection without a
    PUBACK, so the pace applies across syncs, not only within one.
    """

    def __init__(self, rate_per_second: float) -> None:
        self._interval = 1.0 / rate_per_second if rate_per_second > 0 else 0.0
        self._next_slot = 0.0

    async def wait(self) -> None:
        if not self._interval:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._next_slot > now:
            await asyncio.sleep(self._next_slot - now)
            now = self._next_slot
        self._next_slot = now + self._interval


def backoff_seconds(failures: int, minimum: float, maximum: float) -> float:
    """Return the delay before reconnecting after `failures` attempts in a row.

    The delay doubles from `minimum` up to `maximum`, and a random factor
    between 0.5 and 1 spreads out clients that lost the broker together.
    """
    exponent = min(max(failures - 1, 0), 32)
    delay: float = min(maximum, minimum * 2.0**exponent)
    return delay * random.uniform(0.5, 1.0)


def describe_mqtt_error(error: BaseException, waiting_for: str = "PUBACK") -> str:
    """Describe an aiomqtt error in one line; aiomqtt's timeouts name no operation."""
    cause = error.__cause__
    text = str(error)
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    if text == "Operation timed out":
        return f"timed out waiting for {waiting_for}"
    return text or type(error).__name__


@dataclass(frozen=True, slots=True)
class _ConnectionEnd:
    connected_seconds: float  # 0 when the connection never came up
    reason: str
    # True when eventsync closed it: shutdown, or replacing a clogged connection.
    closed_by_us: bool
    publishes_in_flight: int


class MqttConnection:
    """Keeps one MQTT connection open, reconnecting with capped backoff and jitter.

    Each connection attempt gets a new aiomqtt Client, as aiomqtt 2 expects. A
    dropped connection is noticed through the client's message iterator, which
    ends with an error on disconnect, and through keepalive pings while idle.
    """

    def __init__(self, settings: MqttSettings) -> None:
        self._settings = settings
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._stopping = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._pacer = RatePacer(settings.max_publish_rate)
        # Connections opened so far. A caller that sees it change knows a reconnect happened.
        self.connection_count = 0
        # Called after each successful connect, for example to retry dirty topics.
        self.on_connected: Callable[[], None] | None = None
        self._replace = asyncio.Event()
        self._unacknowledged = 0
        self._library_logger = logging.getLogger("mqtt")

    async def __aenter__(self) -> Self:
        self._supervisor = asyncio.create_task(self._maintain(), name="mqtt-connection")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stopping.set()
        if self._supervisor is None:
            return
        # The supervisor sends DISCONNECT and waits for the socket to close,
        # which aiomqtt bounds by the client timeout.
        done, _ = await asyncio.wait(
            {self._supervisor}, timeout=self._settings.connect_timeout_seconds + 5
        )
        if not done:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)

    @property
    def is_connected(self) -> bool:
        return self._client is not None

    async def wait_connected(self, timeout_seconds: float) -> bool:
        """Wait up to `timeout_seconds` for a connection; return whether there is one."""
        if self._connected.is_set():
            return True
        try:
            await asyncio.wait_for(self._connected.wait(), timeout_seconds)
        except TimeoutError:
            return False
        return True

    async def publish_many(
        self, messages: Iterable[OutgoingMessage], on_result: PublishCallback
    ) -> None:
        """Publish each message retained, with a bounded number awaiting PUBACK.

        `on_result` is called once per message. A message that finds no open
        connection fails at once, so a dropped connection fails the rest of the
        batch quickly instead of waiting out every timeout.
        """
        slots = asyncio.Semaphore(self._settings.max_in_flight)
        pending: set[asyncio.Task[None]] = set()

        def finish(message: OutgoingMessage, task: asyncio.Task[None]) -> None:
            slots.release()
            pending.discard(task)
            self._in_flight.discard(task)
            if task.cancelled():
                on_result(message, CONNECTION_LOST)
                return
            error = task.exception()
            if error is None:
                on_result(message, None)
                return
            if (
                isinstance(error, aiomqtt.MqttCodeError)
                and error.rc == mqtt.MQTT_ERR_NO_CONN
            ):
                # paho refuses a publish that starts between the drop and
                # aiomqtt noticing it.
                on_result(message, NOT_CONNECTED)
                return
            description = describe_mqtt_error(error)
            if description == PUBACK_TIMEOUT:
                self._count_unacknowledged()
            on_result(message, description)

        try:
            for message in messages:
                await slots.acquire()
                client = self._client
                if client is None:
                    slots.release()
                    on_result(message, NOT_CONNECTED)
                    continue
                await self._pacer.wait()
                task = asyncio.create_task(
                    client.publish(
                        message.topic,
                        message.body,
                        qos=self._settings.qos,
                        retain=True,
                        timeout=self._settings.publish_timeout_seconds,
                    )
                )
                pending.add(task)
                self._in_flight.add(task)
                task.add_done_callback(partial(finish, message))
            if pending:
                await asyncio.wait(pending)
        except asyncio.CancelledError:
            for task in pending:
                task.cancel()
            raise

    def _count_unacknowledged(self) -> None:
        self._unacknowledged += 1
        if self._unacknowledged == MAX_UNACKNOWLEDGED_PER_CONNECTION:
            self._replace.set()

    async def _maintain(self) -> None:
        failures = 0
        short_drops = 0
        while not self._stopping.is_set():
            attempt = failures + 1
            end = await self._connect_once(attempt)
            if self._stopping.is_set():
                return
            short_drops = self._check_client_id_conflict(end, short_drops)
            if end.connected_seconds >= STABLE_CONNECTION_SECONDS or end.closed_by_us:
                failures = 0
            failures += 1
            delay = backoff_seconds(
                failures,
                self._settings.reconnect_min_seconds,
                self._settings.reconnect_max_seconds,
            )
            log.warning(
                "mqtt_reconnecting",
                attempt=failures + 1,
                delay_seconds=round(delay, 2),
                reason=end.reason,
            )
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
            except TimeoutError:
                continue

    def _check_client_id_conflict(self, end: _ConnectionEnd, short_drops: int) -> int:
        """Count short-lived idle connections and report a likely client id clash.

        AWS IoT Core, like any MQTT broker, drops the older of two connections
        with the same client id, so two processes with one id take turns
        dropping each other right after they connect.
        """
        if end.connected_seconds <= 0 or end.closed_by_us or end.publishes_in_flight:
            return short_drops
        if end.connected_seconds >= SHORT_CONNECTION_SECONDS:
            return 0
        short_drops += 1
        # Logged at the third drop and then at every tenth: the drop count
        # changes each time, so the log's repeat filter would let every one through.
        if short_drops == CLIENT_ID_CONFLICT_DROPS or (
            short_drops > CLIENT_ID_CONFLICT_DROPS and short_drops % 10 == 0
        ):
            log.error(
                "mqtt_client_id_conflict",
                client_id=self._settings.client_id,
                drops=short_drops,
                reason=f"the connection dropped {short_drops} times in a row within "
                f"{SHORT_CONNECTION_SECONDS:g} s of connecting; another client probably "
                "uses the same client id, and the broker drops the older connection",
            )
        return short_drops

    async def _connect_once(self, attempt: int) -> _ConnectionEnd:
        """Connect, stay connected until the link drops or we stop, and disconnect."""
        settings = self._settings
        loop = asyncio.get_running_loop()
        connected_at: float | None = None
        try:
            client = aiomqtt.Client(
                settings.host,
                settings.port,
                identifier=settings.client_id,
                tls_context=build_ssl_context(settings),
                keepalive=settings.keepalive,
                timeout=settings.connect_timeout_seconds,
                clean_session=True,
                # paho's own window would keep publishes that the broker never
                # acknowledges (AWS IoT Core drops those over its rate limit)
                # and block later ones, so publish_many keeps the window instead.
                max_inflight_messages=0,
                logger=self._library_logger,
            )
            # aiomqtt warns above this many pending calls; publish_many keeps
            # at most max_in_flight pending by design.
            client.pending_calls_threshold = settings.max_in_flight
            async with client:
                connected_at = loop.time()
                self.connection_count += 1
                self._unacknowledged = 0
                self._replace.clear()
                self._client = client
                self._connected.set()
                log.info(
                    "mqtt_connected",
                    host=settings.host,
                    port=settings.port,
                    client_id=settings.client_id,
                    attempt=attempt,
                )
                if self.on_connected is not None:
                    self.on_connected()
                reason = await self._wait_until_closed(client)
        except aiomqtt.MqttError as exc:
            if connected_at is None:
                # Under TLS 1.3 a broker that rejects the client certificate
                # closes the connection after the handshake, and aiomqtt 2.5
                # reports that only as a CONNACK timeout.
                reason = describe_mqtt_error(
                    exc,
                    "CONNACK (the broker may have rejected the client certificate or id)",
                )
            else:
                reason = describe_mqtt_error(exc)
        except (ssl.SSLError, OSError) as exc:
            reason = f"TLS setup failed: {exc}"
        finally:
            self._client = None
            self._connected.clear()
            publishes_in_flight = len(self._in_flight)
            for task in list(self._in_flight):
                task.cancel()

        if connected_at is None:
            log.warning(
                "mqtt_connect_failed",
                host=settings.host,
                port=settings.port,
                attempt=attempt,
                error=reason,
            )
            return _ConnectionEnd(0.0, reason, False, 0)
        connected_seconds = loop.time() - connected_at
        closed_by_us = self._stopping.is_set() or self._replace.is_set()
        log.log(
            logging.INFO if closed_by_us else logging.WARNING,
            "mqtt_disconnected",
            reason=reason,
            connected_seconds=round(connected_seconds, 3),
            publishes_in_flight=publishes_in_flight,
        )
        return _ConnectionEnd(
            connected_seconds, reason, closed_by_us, publishes_in_flight
        )

    async def _wait_until_closed(self, client: aiomqtt.Client) -> str:
        """Wait until the connection drops (raising MqttError), must be replaced, or we stop."""
        watch = asyncio.create_task(_drain(client), name="mqtt-watch")
        stop = asyncio.create_task(self._stopping.wait(), name="mqtt-stop")
        replace = asyncio.create_task(self._replace.wait(), name="mqtt-replace")
        tasks = (watch, stop, replace)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._stopping.is_set():
            return "shutdown"
        if self._replace.is_set():
            return (
                f"replacing the connection: {self._unacknowledged} publishes got no "
                "PUBACK, and paho keeps each of them until the connection closes"
            )
        if not watch.cancelled() and watch.exception() is not None:
            error = watch.exception()
            assert error is not None
            raise error
        return "message stream ended"


async def _drain(client: aiomqtt.Client) -> Any:
    # Nothing is subscribed, so this only waits: aiomqtt ends the iteration with
    # MqttError when the connection drops, which is how an idle drop is noticed.
    async for _message in client.messages:
        pass
