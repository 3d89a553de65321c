"""Builders for eventsync settings and table items in tests."""

from __future__ import annotations

from typing import Any

from eventsync.config import DynamoDBSettings, MqttSettings, Settings, SyncSettings
from eventsync.encoding import format_utc
from tests.support.broker import MosquittoBroker
from tests.support.dynamo import MotoServer
from tests.support.mqtt import unique_client_id
from tests.support.pki import KeyFormat, Pki


def make_settings(
    broker: MosquittoBroker,
    pki: Pki,
    moto_server: MotoServer,
    table_name: str,
    *,
    key: KeyFormat = "pkcs1",
    mqtt: dict[str, Any] | None = None,
    sync: dict[str, Any] | None = None,
) -> Settings:
    """Build settings for the test broker and table, with fast reconnects."""
    mqtt_values: dict[str, Any] = {
        "host": broker.host,
        "port": broker.port,
        "client_id": unique_client_id("eventsync"),
        "ca_file": pki.ca_cert,
        "cert_file": pki.client_cert,
        "key_file": pki.client_key(key),
        "reconnect_min_seconds": 0.2,
        "reconnect_max_seconds": 1.0,
        "publish_timeout_seconds": 5.0,
        "connect_timeout_seconds": 5.0,
        "max_publish_rate": 0,
    }
    mqtt_values.update(mqtt or {})
    return Settings(
        dynamodb=DynamoDBSettings(
            table=table_name,
            region="us-east-1",
            endpoint_url=moto_server.endpoint_url,
            max_attempts=2,
        ),
        mqtt=MqttSettings(**mqtt_values),
        sync=SyncSettings(**(sync or {})),
    )


def event_item(
    target: str,
    event_id: str,
    starts_at: float | dict[str, str],
    ends_at: float | dict[str, str],
    *,
    title: str | None = None,
    iso: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """Build a typed item; times are epoch seconds, ISO strings with `iso`, or typed values."""

    def when(value: float | dict[str, str]) -> dict[str, str]:
        if isinstance(value, dict):
            return value
        return {"S": format_utc(value)} if iso else {"N": str(value)}

    item: dict[str, Any] = {
        "target": {"S": target},
        "event_id": {"S": event_id},
        "title": {"S": title or f"{target} {event_id}"},
        "starts_at": when(starts_at),
        "ends_at": when(ends_at),
    }
    item.update(extra)
    return item
