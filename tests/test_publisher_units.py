"""Tests of the publish pacing, the reconnect backoff and the TLS client context."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventsync import publisher
from eventsync.config import MqttSettings
from eventsync.publisher import RatePacer, backoff_seconds, describe_mqtt_error
from eventsync.tls import build_ssl_context
from tests.support.pki import Pki

AWS_IOT_ALPN = "x-amzn-mqtt-ca"


def mqtt_settings(pki: Pki, **values: object) -> MqttSettings:
    fields: dict[str, object] = {
        "host": "localhost",
        "ca_file": pki.ca_cert,
        "cert_file": pki.client_cert,
        "key_file": pki.client_key_pkcs1,
    }
    fields.update(values)
    return MqttSettings(**fields)


# RatePacer


class FakeClock:
    """Stands in for the event loop clock and asyncio.sleep inside eventsync.publisher.

    Sleeping advances the clock at once and records the requested duration.
    """

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def get_running_loop(self) -> FakeClock:
        return self


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(publisher, "asyncio", fake)
    return fake


async def test_rate_pacer_spaces_publishes(clock: FakeClock) -> None:
    pacer = RatePacer(10)

    for _ in range(5):
        await pacer.wait()

    assert clock.sleeps == pytest.approx([0.1, 0.1, 0.1, 0.1])


async def test_rate_pacer_first_publish_immediate(clock: FakeClock) -> None:
    pacer = RatePacer(10)

    await pacer.wait()

    assert clock.sleeps == []


async def test_rate_pacer_holds_across_syncs(clock: FakeClock) -> None:
    pacer = RatePacer(4)
    await pacer.wait()
    clock.now += 0.1  # the next sync starts 0.1 s after the last publish

    await pacer.wait()

    assert clock.sleeps == pytest.approx([0.15])


async def test_rate_pacer_idle_time_is_not_banked(clock: FakeClock) -> None:
    pacer = RatePacer(10)
    await pacer.wait()
    clock.now += 60  # a minute without publishes must not allow a burst after it

    await pacer.wait()
    await pacer.wait()

    assert clock.sleeps == pytest.approx([0.1])


async def test_rate_pacer_zero_turns_pacing_off(clock: FakeClock) -> None:
    pacer = RatePacer(0)

    for _ in range(100):
        await pacer.wait()

    assert clock.sleeps == []


# backoff_seconds


@given(
    failures=st.integers(min_value=0, max_value=10_000),
    minimum=st.floats(min_value=0.01, max_value=60),
    extra=st.floats(min_value=0, max_value=3600),
)
def test_backoff_within_jitter_of_capped_doubling(
    failures: int, minimum: float, extra: float
) -> None:
    maximum = minimum + extra
    ceiling = min(maximum, minimum * 2.0 ** min(max(failures - 1, 0), 32))

    delay = backoff_seconds(failures, minimum, maximum)

    assert delay <= maximum
    assert ceiling * 0.5 <= delay <= ceiling


def test_backoff_doubles_until_the_cap() -> None:
    ceilings = [
        max(backoff_seconds(failures, 1, 60) for _ in range(200))
        for failures in range(1, 9)
    ]

    assert ceilings[0] <= 1
    assert ceilings[1] > 1
    assert ceilings[5] > 16
    assert ceilings[7] <= 60


def test_backoff_jitter_spreads_delays() -> None:
    delays = {backoff_seconds(5, 1, 60) for _ in range(50)}

    assert len(delays) > 1


# describe_mqtt_error


def test_describe_error_names_timeout_operation() -> None:
    error = Exception("Operation timed out")

    assert describe_mqtt_error(error) == "timed out waiting for PUBACK"
    assert describe_mqtt_error(error, "CONNACK") == "timed out waiting for CONNACK"


def test_describe_error_adds_cause() -> None:
    try:
        try:
            raise OSError("Connection refused")
        except OSError as cause:
            raise RuntimeError("connect failed") from cause
    except RuntimeError as error:
        text = describe_mqtt_error(error)

    assert text == "connect failed: Connection refused"


def test_describe_error_without_text_names_type() -> None:
    assert describe_mqtt_error(ConnectionResetError()) == "ConnectionResetError"


# TLS context


def test_ssl_context_requires_tls_1_2(pki: Pki) -> None:
    context = build_ssl_context(mqtt_settings(pki))

    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_ssl_context_verifies_broker(pki: Pki) -> None:
    context = build_ssl_context(mqtt_settings(pki))

    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True


def test_ssl_context_insecure_setting_skips_hostname(pki: Pki) -> None:
    context = build_ssl_context(
        mqtt_settings(pki, insecure_skip_hostname_verification=True)
    )

    assert context.check_hostname is False
    assert context.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    ("port", "alpn", "expected"),
    [
        (443, None, AWS_IOT_ALPN),
        (8883, None, None),
        (443, "", None),
        (8883, "mqtt", "mqtt"),
    ],
)
def test_effective_alpn_by_port(
    pki: Pki, port: int, alpn: str | None, expected: str | None
) -> None:
    settings = mqtt_settings(pki, port=port, alpn=alpn)

    assert settings.effective_alpn == expected


@pytest.fixture
async def alpn_server(pki: Pki) -> AsyncIterator[tuple[int, list[str | None]]]:
    """A TLS server on 127.0.0.1 that records the ALPN protocol each client chose."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.load_verify_locations(pki.ca_cert)
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols([AWS_IOT_ALPN, "mqtt"])
    chosen: list[str | None] = []

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        chosen.append(ssl_object.selected_alpn_protocol())
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield port, chosen


@pytest.mark.parametrize(("port", "expected"), [(443, AWS_IOT_ALPN), (8883, None)])
async def test_ssl_context_offers_alpn_on_443(
    pki: Pki,
    alpn_server: tuple[int, list[str | None]],
    port: int,
    expected: str | None,
) -> None:
    server_port, chosen = alpn_server
    context = build_ssl_context(mqtt_settings(pki, port=port))

    reader, writer = await asyncio.open_connection(
        "127.0.0.1", server_port, ssl=context, server_hostname="localhost"
    )
    await reader.read()
    writer.close()

    assert chosen == [expected]


def test_ssl_context_loads_both_key_formats(pki: Pki) -> None:
    for key in (pki.client_key_pkcs1, pki.client_key_pkcs8):
        context = build_ssl_context(mqtt_settings(pki, key_file=key))

        assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_ssl_context_error_names_mismatched_key(pki: Pki) -> None:
    _, other_key = pki.issue_client("other-client")

    with pytest.raises(ssl.SSLError) as raised:
        build_ssl_context(mqtt_settings(pki, key_file=other_key))

    assert str(pki.client_cert) in str(raised.value)
    assert str(other_key) in str(raised.value)
