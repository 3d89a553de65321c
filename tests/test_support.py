"""Tests of the test fixtures: PKI files, the mosquitto broker and moto_server."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import ssl
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import EndpointConnectionError
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support import tcp_port_accepts
from tests.support.broker import BrokerFactory, BrokerStartError, MosquittoBroker
from tests.support.dynamo import (
    REGION,
    UNREACHABLE_ENDPOINT_URL,
    MotoServer,
    aws_session,
    create_events_table,
    delete_raw_item,
    isolate_aws_environment,
    put_raw_items,
    scan_raw_items,
)
from tests.support.mqtt import (
    client_ssl_context,
    mqtt_client,
    publish_retained,
    read_retained,
    subscribe_collect,
    unique_client_id,
)
from tests.support.pki import KeyFormat, Pki

CERTIFICATE_HEADER = "-----BEGIN CERTIFICATE-----"
PKCS1_HEADER = "-----BEGIN RSA PRIVATE KEY-----"
PKCS8_HEADER = "-----BEGIN PRIVATE KEY-----"

# Under TLS 1.3 the client finishes its handshake before the broker checks the
# client certificate, so the broker's alert arrives before CONNACK. aiomqtt 2.5
# ignores a disconnect that comes before CONNACK, so a rejected client fails
# only when its connect timeout expires, with "Operation timed out". The alert
# itself can be lost when the broker closes the socket first (paho then logs
# "EOF occurred in violation of protocol"), so only the broker log is reliable.
REJECT_TIMEOUT_SECONDS = 1.5


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _topic_prefix() -> str:
    return f"support-test/{unique_client_id()}"


# --- PKI ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attribute", "header"),
    [
        ("ca_cert", CERTIFICATE_HEADER),
        ("ca_key", PKCS8_HEADER),
        ("server_cert", CERTIFICATE_HEADER),
        ("server_key", PKCS8_HEADER),
        ("client_cert", CERTIFICATE_HEADER),
        ("client_key_pkcs1", PKCS1_HEADER),
        ("client_key_pkcs8", PKCS8_HEADER),
        ("other_ca_cert", CERTIFICATE_HEADER),
        ("other_ca_key", PKCS8_HEADER),
    ],
)
def test_pki_pem_header(pki: Pki, attribute: str, header: str) -> None:
    path: Path = getattr(pki, attribute)
    assert path.read_text().startswith(header + "\n")


def test_pki_client_key_formats_hold_same_key(pki: Pki) -> None:
    pkcs1 = serialization.load_pem_private_key(
        pki.client_key_pkcs1.read_bytes(), password=None
    )
    pkcs8 = serialization.load_pem_private_key(
        pki.client_key_pkcs8.read_bytes(), password=None
    )
    assert isinstance(pkcs1, rsa.RSAPrivateKey)
    assert isinstance(pkcs8, rsa.RSAPrivateKey)
    assert pkcs1.private_numbers() == pkcs8.private_numbers()


def test_pki_server_cert_names_localhost(pki: Pki) -> None:
    names = (
        _load_cert(pki.server_cert)
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1"
    ]


def test_pki_leaf_certs_signed_by_ca(pki: Pki) -> None:
    ca = _load_cert(pki.ca_cert)
    # Each call raises if the signature or issuer name does not match.
    _load_cert(pki.server_cert).verify_directly_issued_by(ca)
    _load_cert(pki.client_cert).verify_directly_issued_by(ca)


def test_pki_other_ca_is_unrelated(pki: Pki) -> None:
    ca = _load_cert(pki.ca_cert)
    other_ca = _load_cert(pki.other_ca_cert)
    assert other_ca.subject != ca.subject
    assert other_ca.public_key() != ca.public_key()
    with pytest.raises(ValueError, match="does not match certificate issuer"):
        _load_cert(pki.server_cert).verify_directly_issued_by(other_ca)


def test_pki_issue_client_sets_validity(pki: Pki) -> None:
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    cert_path, key_path = pki.issue_client("window", days=2, not_before_offset_days=-3)
    cert = _load_cert(cert_path)

    assert cert.not_valid_before_utc < before - dt.timedelta(days=2, hours=23)
    assert cert.not_valid_after_utc < before - dt.timedelta(hours=23)
    assert key_path.read_text().startswith(PKCS8_HEADER)
    assert cert.subject.rfc4514_string() == "CN=window"


def test_pki_issue_client_pkcs1_key(pki: Pki) -> None:
    _, key_path = pki.issue_client("legacy-key", key_format="pkcs1")
    assert key_path.read_text().startswith(PKCS1_HEADER)


def test_pki_issue_client_same_name_twice(pki: Pki) -> None:
    first, _ = pki.issue_client("twice")
    second, _ = pki.issue_client("twice")
    assert first != second


def test_pki_issue_client_rejects_path_name(pki: Pki) -> None:
    with pytest.raises(ValueError, match="invalid client name"):
        pki.issue_client("../escape")


# --- mosquitto and TLS ---------------------------------------------------------


@pytest.mark.parametrize("key", ["pkcs1", "pkcs8"])
async def test_broker_accepts_client_key_format(
    broker: MosquittoBroker, pki: Pki, key: KeyFormat
) -> None:
    topic = f"{_topic_prefix()}/{key}"
    async with subscribe_collect(broker.host, broker.port, pki, topic) as collector:
        async with mqtt_client(broker.host, broker.port, pki, key=key) as client:
            await client.publish(topic, b"hello", qos=1)
        await collector.wait_for_count(1)
    assert collector.messages[0].payload == b"hello"


@pytest.mark.parametrize(
    ("tls_version", "expected"),
    [(ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")],
)
async def test_broker_accepts_tls_version(
    broker: MosquittoBroker, pki: Pki, tls_version: ssl.TLSVersion, expected: str
) -> None:
    context = client_ssl_context(pki)
    context.minimum_version = tls_version
    context.maximum_version = tls_version

    _, writer = await asyncio.open_connection(
        broker.host, broker.port, ssl=context, server_hostname=broker.host
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        assert ssl_object.version() == expected
    finally:
        writer.close()
        await writer.wait_closed()


async def test_broker_rejects_client_without_certificate(
    broker: MosquittoBroker, pki: Pki
) -> None:
    context = ssl.create_default_context(cafile=pki.ca_cert)
    client = mqtt_client(
        broker.host,
        broker.port,
        pki,
        tls_context=context,
        timeout_seconds=REJECT_TIMEOUT_SECONDS,
    )

    with pytest.raises(aiomqtt.MqttError):
        async with client:
            pass

    await broker.wait_for_log("peer did not return a certificate")


async def test_broker_fails_verification_with_other_ca(
    broker: MosquittoBroker, pki: Pki
) -> None:
    # The client checks the broker certificate during the handshake, so this
    # fails at once and names the cause.
    context = client_ssl_context(pki, ca_cert=pki.other_ca_cert)
    client = mqtt_client(
        broker.host,
        broker.port,
        pki,
        tls_context=context,
        timeout_seconds=REJECT_TIMEOUT_SECONDS,
    )
    with pytest.raises(aiomqtt.MqttError, match="CERTIFICATE_VERIFY_FAILED"):
        async with client:
            pass


@pytest.mark.parametrize(
    ("name", "issue_options", "alert"),
    [
        ("expired", {"days": 1, "not_before_offset_days": -2}, "CERTIFICATE_EXPIRED"),
        ("future", {"days": 1, "not_before_offset_days": 1}, "BAD_CERTIFICATE"),
        ("stranger", {"issuer": "other_ca"}, "UNKNOWN_CA"),
    ],
)
async def test_broker_rejects_invalid_client_cert(
    broker: MosquittoBroker,
    pki: Pki,
    name: str,
    issue_options: dict[str, Any],
    alert: str,
) -> None:
    cert_and_key = pki.issue_client(name, **issue_options)
    context = client_ssl_context(pki, client_cert_and_key=cert_and_key)
    # Under TLS 1.2 the broker checks the client certificate inside the
    # handshake, so the connect fails at once with the alert that names the
    # cause.
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    client = mqtt_client(
        broker.host,
        broker.port,
        pki,
        tls_context=context,
        timeout_seconds=REJECT_TIMEOUT_SECONDS,
    )

    with pytest.raises(aiomqtt.MqttError, match=alert):
        async with client:
            pass

    # mosquitto 2.0.11 logs the same line for every verification failure.
    await broker.wait_for_log("certificate verify failed")


async def test_read_retained_filter(broker: MosquittoBroker, pki: Pki) -> None:
    prefix = _topic_prefix()
    published = {f"{prefix}/lobby": b'{"a": 1}', f"{prefix}/hall/2": b"second"}
    await publish_retained(broker.host, broker.port, pki, published)

    retained = await read_retained(broker.host, broker.port, pki, f"{prefix}/#")

    assert retained == published


async def test_read_retained_topic_list(broker: MosquittoBroker, pki: Pki) -> None:
    prefix = _topic_prefix()
    await publish_retained(
        broker.host,
        broker.port,
        pki,
        {f"{prefix}/kept": b"1", f"{prefix}/other": b"2", f"{prefix}/gone": b"3"},
    )
    # An empty retained payload deletes the topic's retained message.
    await publish_retained(broker.host, broker.port, pki, {f"{prefix}/gone": b""})

    retained = await read_retained(
        broker.host, broker.port, pki, [f"{prefix}/kept", f"{prefix}/gone"]
    )

    assert retained == {f"{prefix}/kept": b"1"}


async def test_read_retained_empty_topic_returns_quickly(
    broker: MosquittoBroker, pki: Pki
) -> None:
    started = time.monotonic()
    retained = await read_retained(
        broker.host, broker.port, pki, f"{_topic_prefix()}/#", quiet_seconds=0.2
    )
    assert retained == {}
    assert time.monotonic() - started < 2


async def test_subscribe_collect_retain_flags(
    broker: MosquittoBroker, pki: Pki
) -> None:
    prefix = _topic_prefix()
    await publish_retained(broker.host, broker.port, pki, {f"{prefix}/old": b"old"})

    async with subscribe_collect(
        broker.host, broker.port, pki, f"{prefix}/#"
    ) as collector:
        await collector.wait_for_count(1)
        await publish_retained(broker.host, broker.port, pki, {f"{prefix}/new": b"new"})
        await collector.wait_for_count(2)

    assert collector.retained() == {f"{prefix}/old": b"old"}
    assert [(m.topic, m.payload) for m in collector.live()] == [
        (f"{prefix}/new", b"new")
    ]


async def _collect_while_killing(broker: MosquittoBroker, pki: Pki) -> None:
    async with subscribe_collect(
        broker.host, broker.port, pki, f"{_topic_prefix()}/#"
    ) as collector:
        broker.kill()
        await collector.wait_quiet(quiet_seconds=2)


async def test_subscribe_collect_raises_on_lost_connection(
    broker: MosquittoBroker, pki: Pki
) -> None:
    with pytest.raises(aiomqtt.MqttError):
        await _collect_while_killing(broker, pki)


async def test_broker_restart_keeps_port(broker: MosquittoBroker, pki: Pki) -> None:
    topic = f"{_topic_prefix()}/state"
    await publish_retained(broker.host, broker.port, pki, {topic: b"before"})
    port = broker.port

    broker.restart()

    assert broker.port == port
    # persistence is off, so the restart dropped the retained message.
    assert await read_retained(broker.host, broker.port, pki, [topic]) == {}
    await publish_retained(broker.host, broker.port, pki, {topic: b"after"})
    assert await read_retained(broker.host, broker.port, pki, [topic]) == {
        topic: b"after"
    }


def test_broker_kill_closes_port(broker: MosquittoBroker) -> None:
    broker.kill()
    assert not broker.is_running
    assert not tcp_port_accepts("127.0.0.1", broker.port)


def test_broker_stop_twice(broker: MosquittoBroker) -> None:
    broker.stop()
    broker.stop()
    assert not broker.is_running


def test_broker_start_error_shows_output(broker_factory: BrokerFactory) -> None:
    with pytest.raises(BrokerStartError, match="no_such_option"):
        broker_factory(["no_such_option true"])


def test_broker_factory_separate_ports(broker_factory: BrokerFactory) -> None:
    first = broker_factory()
    second = broker_factory()
    assert first.port != second.port
    assert first.port != 1883
    assert second.port != 1883


async def test_broker_acl_matches_certificate_name(
    broker_factory: BrokerFactory, pki: Pki, tmp_path: Path
) -> None:
    acl_file = tmp_path / "acl"
    acl_file.write_text(f"user {pki.client_common_name}\ntopic readwrite allowed/#\n")
    broker = broker_factory([f"acl_file {acl_file}"])

    await publish_retained(
        broker.host, broker.port, pki, {"allowed/a": b"yes", "denied/a": b"no"}
    )
    retained = await read_retained(
        broker.host, broker.port, pki, ["allowed/a", "denied/a"]
    )

    assert retained == {"allowed/a": b"yes"}
    # mosquitto names the client id in this line, not the username.
    log = await broker.wait_for_log("Denied PUBLISH from")
    denied = [line for line in log.splitlines() if "Denied PUBLISH from" in line]
    assert "'denied/a'" in denied[0]


# --- moto and the AWS environment ----------------------------------------------


def test_dynamodb_env_sets_dummy_credentials() -> None:
    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "testing"
    assert os.environ["AWS_DEFAULT_REGION"] == "us-east-1"
    assert os.environ["AWS_EC2_METADATA_DISABLED"] == "true"


def test_dynamodb_env_points_at_empty_config() -> None:
    assert Path(os.environ["AWS_CONFIG_FILE"]).read_text() == ""
    assert Path(os.environ["AWS_SHARED_CREDENTIALS_FILE"]).read_text() == ""


def test_isolate_aws_environment_removes_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_PROFILE", "production")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token")
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://192.0.2.1/")
    monkeypatch.setenv("https_proxy", "http://192.0.2.1:3128")

    isolate_aws_environment(monkeypatch, tmp_path / "empty")

    assert "AWS_PROFILE" not in os.environ
    assert "AWS_SESSION_TOKEN" not in os.environ
    assert "AWS_CONTAINER_CREDENTIALS_FULL_URI" not in os.environ
    assert "https_proxy" not in os.environ
    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"


async def test_dynamodb_env_default_endpoint_unreachable() -> None:
    session = get_session()
    credentials = await session.get_credentials()
    assert credentials is not None
    assert credentials.access_key == "testing"

    config = AioConfig(retries={"max_attempts": 1}, connect_timeout=2)
    async with session.create_client(
        "dynamodb", region_name=REGION, config=config
    ) as client:
        assert client.meta.endpoint_url == UNREACHABLE_ENDPOINT_URL
        with pytest.raises(EndpointConnectionError):
            await client.list_tables()


async def test_moto_server_stores_60_items(
    moto_server: MotoServer, table_name: str
) -> None:
    items = [
        {
            "target": {"S": f"room-{index % 3}"},
            "event_id": {"S": f"event-{index:03d}"},
            "title": {"S": f"Event {index}"},
        }
        for index in range(60)
    ]
    await create_events_table(moto_server.endpoint_url, table_name)
    await put_raw_items(moto_server.endpoint_url, table_name, items)

    stored = await scan_raw_items(moto_server.endpoint_url, table_name)

    assert len(stored) == 60
    assert sorted(item["event_id"]["S"] for item in stored) == [
        f"event-{index:03d}" for index in range(60)
    ]


async def test_put_raw_items_chunks_of_25(
    moto_server: MotoServer, table_name: str
) -> None:
    chunk_sizes: list[int] = []

    def record_chunk(params: dict[str, Any], **_: Any) -> None:
        chunk_sizes.append(len(params["RequestItems"][table_name]))

    items = [
        {"target": {"S": "lobby"}, "event_id": {"S": str(index)}} for index in range(60)
    ]
    event_name = "provide-client-params.dynamodb.BatchWriteItem"
    await create_events_table(moto_server.endpoint_url, table_name)
    aws_session().register(event_name, record_chunk)
    try:
        await put_raw_items(moto_server.endpoint_url, table_name, items)
    finally:
        aws_session().unregister(event_name, record_chunk)

    assert chunk_sizes == [25, 25, 10]


async def test_delete_raw_item_removes_item(
    moto_server: MotoServer, table_name: str
) -> None:
    keep = {"target": {"S": "lobby"}, "event_id": {"S": "keep"}}
    drop = {"target": {"S": "lobby"}, "event_id": {"S": "drop"}}
    await create_events_table(moto_server.endpoint_url, table_name)
    await put_raw_items(moto_server.endpoint_url, table_name, [keep, drop])

    await delete_raw_item(moto_server.endpoint_url, table_name, drop)

    assert await scan_raw_items(moto_server.endpoint_url, table_name) == [keep]


def test_table_name_unique(table_name: str) -> None:
    assert table_name.startswith("active_events_")
    assert len(table_name) == len("active_events_") + 8
