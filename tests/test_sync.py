"""Syncs against a real mosquitto over mutual TLS and a moto DynamoDB server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any

import pytest
from structlog.testing import capture_logs

from eventsync.config import Settings
from eventsync.errors import NotConnectedError
from eventsync.publisher import MqttConnection
from eventsync.store import EventStore
from eventsync.sync import Syncer, SyncReport
from tests.support.broker import MosquittoBroker
from tests.support.dynamo import (
    MotoServer,
    create_events_table,
    delete_raw_item,
    put_raw_items,
)
from tests.support.factories import event_item, make_settings
from tests.support.mqtt import read_retained, subscribe_collect
from tests.support.pki import Pki

HOUR = 3600


class Harness:
    """A Syncer wired to the test broker and table, plus readers for both."""

    def __init__(
        self, settings: Settings, broker: MosquittoBroker, pki: Pki, moto: MotoServer
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.pki = pki
        self.moto = moto
        self.syncer: Syncer
        self.connection: MqttConnection

    async def put(self, *items: dict[str, Any]) -> None:
        await put_raw_items(self.moto.endpoint_url, self.settings.dynamodb.table, items)

    async def delete(self, target: str, event_id: str) -> None:
        key = {"target": {"S": target}, "event_id": {"S": event_id}}
        await delete_raw_item(self.moto.endpoint_url, self.settings.dynamodb.table, key)

    async def sync(self, now: float | None = None) -> SyncReport:
        return await self.syncer.run(now=now)

    async def retained(self) -> dict[str, Any]:
        """Return topic -> decoded payload of every retained message under events/."""
        raw = await read_retained(
            self.broker.host, self.broker.port, self.pki, "events/#"
        )
        return {topic: json.loads(body) for topic, body in raw.items()}


@pytest.fixture
async def harness_factory(
    broker: MosquittoBroker, pki: Pki, moto_server: MotoServer, table_name: str
) -> AsyncIterator[Callable[..., Any]]:
    await create_events_table(moto_server.endpoint_url, table_name)
    async with AsyncExitStack() as stack:

        async def create(**options: Any) -> Harness:
            settings = make_settings(broker, pki, moto_server, table_name, **options)
            harness = Harness(settings, broker, pki, moto_server)
            store = await stack.enter_async_context(EventStore(settings.dynamodb))
            harness.connection = await stack.enter_async_context(
                MqttConnection(settings.mqtt)
            )
            assert await harness.connection.wait_connected(10)
            harness.syncer = Syncer(settings, store, harness.connection)
            return harness

        yield create


@pytest.fixture
async def harness(harness_factory: Callable[..., Any]) -> Harness:
    result: Harness = await harness_factory()
    return result


@pytest.mark.parametrize("key", ["pkcs1", "pkcs8"])
async def test_sync_publishes_every_target(
    harness_factory: Callable[..., Any], key: str
) -> None:
    harness: Harness = await harness_factory(key=key)
    now = time.time()
    await harness.put(
        event_item("lobby", "b", now - HOUR, now + HOUR, location={"S": "Hall"}),
        event_item(
            "lobby",
            "a",
            now - HOUR,
            now + 2 * HOUR,
            data={"M": {"z": {"N": "1"}, "a": {"BOOL": True}}},
        ),
        event_item("room-101", "x", now + HOUR, now + 2 * HOUR, iso=True),
        event_item("floor/2/kiosk", "k", now, now + 30),
    )

    report = await harness.sync(now)
    retained = await harness.retained()

    assert report.published == 3
    assert report.failed == 0
    assert report.events_read == 4
    assert sorted(retained) == [
        "events/floor/2/kiosk",
        "events/lobby",
        "events/room-101",
    ]
    lobby = retained["events/lobby"]
    assert list(lobby) == ["version", "target", "events", "next_change_at"]
    assert lobby["version"] == 1
    assert lobby["target"] == "lobby"
    # Equal start times are ordered by event id.
    assert [event["id"] for event in lobby["events"]] == ["a", "b"]
    assert lobby["events"][0]["data"] == {"a": True, "z": 1}
    assert lobby["events"][1]["location"] == "Hall"
    assert "description" not in lobby["events"][1]
    assert lobby["next_change_at"] == time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(now + HOUR))
    )
    assert retained["events/room-101"]["events"][0]["title"] == "room-101 x"


async def test_sync_unchanged_publishes_nothing(harness: Harness) -> None:
    now = time.time()
    await harness.put(
        event_item("lobby", "a", now, now + HOUR),
        event_item("room-101", "b", now, now + HOUR),
    )
    await harness.sync(now)

    async with subscribe_collect(
        harness.broker.host, harness.broker.port, harness.pki, "events/#"
    ) as collector:
        await collector.wait_quiet(0.3)
        report = await harness.sync(now + 1)
        await collector.wait_quiet(0.5)

    assert report.published == 0
    assert report.unchanged == 2
    assert collector.live() == []


async def test_sync_event_end_changes_payload(harness: Harness) -> None:
    now = time.time()
    await harness.put(
        event_item("lobby", "short", now - 60, now + 60),
        event_item("lobby", "long", now - 60, now + HOUR),
    )
    await harness.sync(now)
    first = (await harness.retained())["events/lobby"]

    report = await harness.sync(now + 61)
    second = (await harness.retained())["events/lobby"]

    assert [event["id"] for event in first["events"]] == ["long", "short"]
    assert report.published == 1
    assert [event["id"] for event in second["events"]] == ["long"]


async def test_sync_vanished_target_gets_empty_payload(harness: Harness) -> None:
    now = time.time()
    await harness.put(
        event_item("lobby", "a", now, now + HOUR),
        event_item("room-101", "b", now, now + HOUR),
    )
    await harness.sync(now)
    await harness.delete("lobby", "a")

    with capture_logs() as logs:
        emptied = await harness.sync(now + 1)
    retained = await harness.retained()
    after = await harness.sync(now + 2)

    vanished_logs = [entry for entry in logs if entry["event"] == "targets_vanished"]
    assert emptied.published == 1
    assert retained["events/lobby"] == {
        "version": 1,
        "target": "lobby",
        "events": [],
        "next_change_at": None,
    }
    assert vanished_logs[0]["topics"] == ["events/lobby"]
    assert after.published == 0
    assert after.topics == 1


async def test_sync_empty_table_keeps_topics(harness: Harness) -> None:
    now = time.time()
    await harness.put(
        event_item("lobby", "a", now, now + HOUR),
        event_item("room-101", "b", now, now + HOUR),
    )
    await harness.sync(now)
    before = await harness.retained()
    await harness.delete("lobby", "a")
    await harness.delete("room-101", "b")

    with capture_logs() as logs:
        report = await harness.sync(now + 1)
    after = await harness.retained()

    held_logs = [entry for entry in logs if entry["event"] == "empty_table_held"]
    assert report.published == 0
    assert after == before
    assert len(held_logs) == 1
    assert held_logs[0]["topics"] == 2


async def test_sync_empty_table_after_refill_publishes(harness: Harness) -> None:
    now = time.time()
    await harness.put(event_item("lobby", "a", now, now + HOUR))
    await harness.sync(now)
    await harness.delete("lobby", "a")
    await harness.sync(now + 1)
    await harness.put(event_item("lobby", "c", now, now + HOUR, title="new"))

    report = await harness.sync(now + 2)
    retained = await harness.retained()

    assert report.published == 1
    assert retained["events/lobby"]["events"][0]["title"] == "new"


async def test_sync_empty_table_allowed_empties_topics(
    harness_factory: Callable[..., Any],
) -> None:
    harness: Harness = await harness_factory(sync={"allow_empty_table": True})
    now = time.time()
    await harness.put(event_item("lobby", "a", now, now + HOUR))
    await harness.sync(now)
    await harness.delete("lobby", "a")

    report = await harness.sync(now + 1)
    retained = await harness.retained()

    assert report.published == 1
    assert retained["events/lobby"]["events"] == []


async def test_sync_vanished_target_cleared(
    harness_factory: Callable[..., Any],
) -> None:
    harness: Harness = await harness_factory(sync={"on_empty": "clear"})
    now = time.time()
    await harness.put(
        event_item("lobby", "a", now, now + HOUR),
        event_item("room-101", "b", now, now + HOUR),
    )
    await harness.sync(now)
    await harness.delete("lobby", "a")

    report = await harness.sync(now + 1)
    retained = await harness.retained()

    assert report.published == 1
    assert "events/lobby" not in retained
    assert "events/room-101" in retained


async def test_sync_target_outside_window_gets_empty_events(harness: Harness) -> None:
    now = time.time()
    await harness.put(event_item("lobby", "later", now + 8 * 86400, now + 9 * 86400))

    await harness.sync(now)
    lobby = (await harness.retained())["events/lobby"]

    assert lobby["events"] == []
    # The event enters the 7-day lookahead window 8 - 7 = 1 day from now.
    assert lobby["next_change_at"] == time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(now + 86400))
    )


async def test_sync_invalid_items_skipped(harness: Harness) -> None:
    now = time.time()
    good = event_item("lobby", "good", now, now + HOUR)
    reversed_times = event_item("lobby", "reversed", now + HOUR, now)
    wildcard = event_item("lob+by", "w", now, now + HOUR)
    no_title = event_item("lobby", "untitled", now, now + HOUR)
    del no_title["title"]
    await harness.put(good, reversed_times, wildcard, no_title)

    with capture_logs() as logs:
        report = await harness.sync(now)
    retained = await harness.retained()

    warnings = [entry for entry in logs if entry["event"] == "invalid_item"]
    assert report.invalid == 3
    assert report.published == 1
    assert sorted(entry["event_id"] for entry in warnings) == [
        "reversed",
        "untitled",
        "w",
    ]
    assert all(entry["log_level"] == "warning" for entry in warnings)
    assert [event["id"] for event in retained["events/lobby"]["events"]] == ["good"]
    assert "events/lob+by" not in retained


async def test_sync_only_invalid_items_publishes_nothing(harness: Harness) -> None:
    now = time.time()
    await harness.put(
        event_item("$SYS", "a", now, now + HOUR),
        event_item("a//b", "b", now, now + HOUR),
        event_item("lobby", "c", {"S": "not a time"}, now + HOUR),
    )

    report = await harness.sync(now)

    assert report.invalid == 3
    assert report.topics == 0
    assert report.published == 0
    assert await harness.retained() == {}


async def test_sync_time_zone_applies_to_naive_times(
    harness_factory: Callable[..., Any],
) -> None:
    harness: Harness = await harness_factory(
        sync={"timezone": "America/New_York", "lookahead": "400d"}
    )
    # New York is UTC-4 in July (daylight saving time) and UTC-5 in January.
    await harness.put(
        event_item(
            "lobby",
            "summer",
            {"S": "2030-07-01T09:00:00"},
            {"S": "2030-07-01T11:00:00-04:00"},
        ),
        event_item(
            "lobby",
            "winter",
            {"S": "2031-01-15T09:00"},
            {"S": "2031-01-15T10:00:00Z"},
        ),
    )
    now = datetime(2030, 7, 1, 12, 0, tzinfo=UTC).timestamp()

    report = await harness.sync(now)
    events = (await harness.retained())["events/lobby"]["events"]

    assert report.invalid == 1
    assert [event["id"] for event in events] == ["summer"]
    assert events[0]["starts_at"] == "2030-07-01T13:00:00Z"
    assert events[0]["ends_at"] == "2030-07-01T15:00:00Z"


async def test_sync_time_zone_winter_offset(
    harness_factory: Callable[..., Any],
) -> None:
    harness: Harness = await harness_factory(sync={"timezone": "America/New_York"})
    await harness.put(
        event_item(
            "lobby",
            "winter",
            {"S": "2031-01-15T09:00"},
            {"S": "2031-01-15T10:30"},
        )
    )
    now = datetime(2031, 1, 15, 12, 0, tzinfo=UTC).timestamp()

    await harness.sync(now)
    event = (await harness.retained())["events/lobby"]["events"][0]

    assert event["starts_at"] == "2031-01-15T14:00:00Z"
    assert event["ends_at"] == "2031-01-15T15:30:00Z"


async def test_sync_grace_keeps_ended_event(
    harness_factory: Callable[..., Any],
) -> None:
    harness: Harness = await harness_factory(sync={"grace": "10m"})
    now = time.time()
    await harness.put(event_item("lobby", "a", now - HOUR, now - 300))

    await harness.sync(now)
    lobby = (await harness.retained())["events/lobby"]

    assert [event["id"] for event in lobby["events"]] == ["a"]
    assert lobby["next_change_at"] == time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(now - 300) + 600)
    )


async def test_sync_truncates_to_max_events(
    harness_factory: Callable[..., Any],
) -> None:
    harness: Harness = await harness_factory(sync={"max_events_per_topic": 3})
    now = time.time()
    await harness.put(
        *(
            event_item("lobby", f"e{index}", now + index * 60, now + HOUR * 2)
            for index in range(5)
        )
    )

    with capture_logs() as logs:
        report = await harness.sync(now)
    lobby = (await harness.retained())["events/lobby"]

    assert [event["id"] for event in lobby["events"]] == ["e0", "e1", "e2"]
    assert lobby["truncated"] is True
    assert report.truncated == 1
    assert [
        entry["dropped"] for entry in logs if entry["event"] == "payload_truncated"
    ] == [2]


async def test_sync_expired_item_treated_as_gone(harness: Harness) -> None:
    now = time.time()
    await harness.put(
        event_item("lobby", "a", now, now + HOUR, expires_at={"N": str(int(now - 1))}),
        event_item(
            "lobby", "b", now, now + HOUR, expires_at={"N": str(int(now + 600))}
        ),
    )

    await harness.sync(now)
    lobby = (await harness.retained())["events/lobby"]

    assert [event["id"] for event in lobby["events"]] == ["b"]
    assert lobby["next_change_at"] == time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(now + 600))
    )


async def test_sync_while_disconnected_keeps_topics_dirty(harness: Harness) -> None:
    now = time.time()
    await harness.put(event_item("lobby", "a", now, now + HOUR))
    harness.broker.stop()
    for _ in range(100):
        if not harness.connection.is_connected:
            break
        await asyncio.sleep(0.05)

    with pytest.raises(NotConnectedError):
        await harness.sync(now)
    assert "events/lobby" in harness.syncer.cache
    assert harness.syncer.cache.digest("events/lobby") is None

    harness.broker.start()
    assert await harness.connection.wait_connected(10)
    report = await harness.sync(now + 1)
    retained = await harness.retained()

    assert report.published == 1
    assert [event["id"] for event in retained["events/lobby"]["events"]] == ["a"]


async def test_connection_notices_idle_drop(harness: Harness) -> None:
    assert harness.connection.is_connected
    count_before = harness.connection.connection_count

    with capture_logs() as logs:
        harness.broker.restart()
        for _ in range(200):
            if harness.connection.connection_count > count_before:
                break
            await asyncio.sleep(0.05)

    events = [entry["event"] for entry in logs]
    assert harness.connection.connection_count == count_before + 1
    assert "mqtt_disconnected" in events
    assert "mqtt_reconnecting" in events
    assert events.index("mqtt_disconnected") < events.index("mqtt_connected")


async def test_sync_after_restart_republishes_with_option(
    harness_factory: Callable[..., Any],
) -> None:
    harness: Harness = await harness_factory(mqtt={"republish_after_reconnect": True})
    now = time.time()
    await harness.put(event_item("lobby", "a", now, now + HOUR))
    await harness.sync(now)

    # The test broker keeps no retained messages across a restart.
    count_before = harness.connection.connection_count
    harness.broker.restart()
    for _ in range(200):
        if harness.connection.connection_count > count_before:
            break
        await asyncio.sleep(0.05)
    lost = await harness.retained()
    report = await harness.sync(now + 1)
    restored = await harness.retained()

    assert lost == {}
    assert report.published == 1
    assert "events/lobby" in restored
