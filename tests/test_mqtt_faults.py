"""Broker faults injected by an MQTT proxy: cuts, restarts, lost PUBACKs, denied topics.

The daemon, or a Syncer in this process, talks to a real mosquitto through
`MqttFaultProxy`. After each fault the retained messages are read from the
broker directly and compared with the payloads computed from the same table,
and the proxy's records show which publishes got a PUBACK.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import eventsync.sync
from eventsync.config import Settings
from eventsync.payloads import payload_digest
from eventsync.publisher import CONNECTION_LOST, PUBACK_TIMEOUT, MqttConnection
from eventsync.store import EventStore
from eventsync.sync import Syncer, item_rules, read_table
from tests.support.broker import BrokerFactory, MosquittoBroker
from tests.support.daemon import DaemonProcess, run_cli
from tests.support.dynamo import MotoServer, create_events_table, put_raw_items
from tests.support.factories import event_item, make_settings
from tests.support.mqtt import read_retained
from tests.support.mqtt_proxy import MqttFaultProxy, PublishRecord
from tests.support.pki import Pki

HOUR = 3600
# How long eventsync.quarantine first holds back a topic that drops the connection
# when it is published alone.
FIRST_HOLD_SECONDS = 60
RETAINED_READ_TIMEOUT_SECONDS = 20.0

ProxyFactory = Callable[[int], Awaitable[MqttFaultProxy]]


class AsyncDaemon:
    """`eventsync run` whose blocking log waits run in a worker thread.

    The proxy forwards on the test's event loop, so the loop must keep running
    while the test waits for a log line.
    """

    def __init__(self, process: DaemonProcess) -> None:
        self.process = process

    async def wait_for(
        self,
        predicate: Callable[[dict[str, Any]], bool] | str,
        timeout_seconds: float = 20.0,
        count: int = 1,
    ) -> list[dict[str, Any]]:
        return await asyncio.to_thread(
            self.process.wait_for, predicate, timeout_seconds, count
        )

    def lines(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.process.lines() if line.get("event") == event]


class ShiftedClock:
    """The `time` module that eventsync.sync reads, with `monotonic()` moved ahead.

    The topic quarantine measures its holds with `time.monotonic()` in
    eventsync.sync, and no setting shortens them, so a test moves that clock
    instead of sleeping through a hold.
    """

    def __init__(self) -> None:
        self.offset_seconds = 0.0

    def advance(self, seconds: float) -> None:
        self.offset_seconds += seconds

    def monotonic(self) -> float:
        return time.monotonic() + self.offset_seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
async def proxy_factory(pki: Pki) -> AsyncIterator[ProxyFactory]:
    """Start fault proxies in front of broker ports, and stop each at teardown."""
    async with contextlib.AsyncExitStack() as stack:

        async def create(upstream_port: int) -> MqttFaultProxy:
            return await stack.enter_async_context(MqttFaultProxy(pki, upstream_port))

        yield create


@pytest.fixture
async def proxy(proxy_factory: ProxyFactory, broker: MosquittoBroker) -> MqttFaultProxy:
    """A fault proxy in front of the default test broker."""
    return await proxy_factory(broker.port)


@pytest.fixture
async def launch_daemon(
    proxy_factory: ProxyFactory,
    start_daemon: Callable[[Path], DaemonProcess],
) -> AsyncIterator[Callable[[Path], AsyncDaemon]]:
    """Start `eventsync run` processes and stop them while the proxies still run.

    This fixture depends on `proxy_factory`, so its teardown comes first and a
    stopping daemon can still send DISCONNECT through its proxy.
    """
    daemons: list[AsyncDaemon] = []

    def launch(config_path: Path) -> AsyncDaemon:
        daemon = AsyncDaemon(start_daemon(config_path))
        daemons.append(daemon)
        return daemon

    yield launch
    for daemon in daemons:
        await asyncio.to_thread(daemon.process.stop)


async def put_targets(
    moto_server: MotoServer, table_name: str, count: int
) -> list[str]:
    """Create the table with one current event on each of `count` targets.

    Return their topics. The events started a minute ago and end in an hour,
    so every payload stays the same for the length of a test.
    """
    now = time.time()
    targets = [f"room-{number:03d}" for number in range(count)]
    await create_events_table(moto_server.endpoint_url, table_name)
    await put_raw_items(
        moto_server.endpoint_url,
        table_name,
        [event_item(target, "standup", now - 60, now + HOUR) for target in targets],
    )
    return [f"events/{target}" for target in targets]


async def computed_payloads(settings: Settings) -> dict[str, bytes]:
    """Compute topic -> payload body from the table now, with the payload rules."""
    async with EventStore(settings.dynamodb) as store:
        syncer = Syncer(settings, store, None)
        snapshot = await read_table(store, item_rules(settings))
        payloads = syncer.payloads(snapshot, time.time())
        return {payload.topic: payload.body for payload in payloads}


async def dry_run_payloads(config_path: Path) -> dict[str, Any]:
    """Return topic -> decoded payload as `eventsync sync --dry-run` prints them."""
    result = await asyncio.to_thread(
        run_cli, "sync", "--dry-run", "--config", str(config_path)
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    return {line["topic"]: line["payload"] for line in lines}


async def retained_payloads(broker: MosquittoBroker, pki: Pki) -> dict[str, Any]:
    """Return topic -> decoded retained payload under events/, read from the broker."""
    raw = await read_retained(
        broker.host,
        broker.port,
        pki,
        "events/#",
        timeout=RETAINED_READ_TIMEOUT_SECONDS,
    )
    return {topic: json.loads(body) for topic, body in raw.items()}


def topics_lacking_acknowledged(
    records: Iterable[PublishRecord], expected: dict[str, Any]
) -> list[str]:
    """Return the topics with no acknowledged publish of their expected payload."""
    acknowledged = {
        (record.topic, record.payload) for record in records if record.acknowledged
    }
    return sorted(
        topic
        for topic, payload in expected.items()
        if not any(
            json.loads(body) == payload
            for acknowledged_topic, body in acknowledged
            if acknowledged_topic == topic
        )
    )


def topics_not_republished(records: list[PublishRecord]) -> list[str]:
    """Return the topics with a publish that no later acknowledged publish followed."""
    missing: set[str] = set()
    for index, record in enumerate(records):
        if record.acknowledged:
            continue
        later = records[index + 1 :]
        if not any(
            other.topic == record.topic and other.acknowledged for other in later
        ):
            missing.add(record.topic)
    return sorted(missing)


async def wait_until(
    condition: Callable[[], bool], timeout_seconds: float = 20.0
) -> None:
    """Poll `condition` until it is true. Raises TimeoutError after `timeout_seconds`."""
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout_seconds} s")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def open_syncer(
    settings: Settings,
) -> AsyncIterator[tuple[Syncer, MqttConnection]]:
    """Open the table and a connected MQTT connection, and yield a Syncer on both."""
    async with (
        EventStore(settings.dynamodb) as store,
        MqttConnection(settings.mqtt) as connection,
    ):
        assert await connection.wait_connected(10)
        yield Syncer(settings, store, connection), connection


async def test_sync_cut_mid_batch_republishes_unacknowledged(
    broker: MosquittoBroker,
    pki: Pki,
    moto_server: MotoServer,
    table_name: str,
    proxy: MqttFaultProxy,
) -> None:
    topics = await put_targets(moto_server, table_name, 200)
    # With at most 20 publishes awaiting PUBACK, the 50th publish leaves only
    # after at least 30 PUBACKs came back, so the cut lands mid-sync with
    # topics acknowledged and topics in flight.
    settings = make_settings(
        broker,
        pki,
        moto_server,
        table_name,
        mqtt={"port": proxy.port, "max_in_flight": 20},
    )

    async with open_syncer(settings) as (syncer, connection):
        proxy.cut(after_publishes=50)
        first = await syncer.run()
        clean = {topic for topic in topics if syncer.cache.digest(topic) is not None}
        clean_digests = {topic: syncer.cache.digest(topic) for topic in clean}
        first_records = list(proxy.records)
        await wait_until(lambda: connection.connection_count >= 2)
        second = await syncer.run()
        second_records = proxy.records[len(first_records) :]

    expected = await computed_payloads(settings)
    retained = await retained_payloads(broker, pki)
    dirty = set(topics) - clean
    acknowledged_first = {
        record.topic: record.payload for record in first_records if record.acknowledged
    }
    unacknowledged_first = {
        record.topic for record in first_records if not record.acknowledged
    }

    assert proxy.cuts == 1
    assert len(first_records) == 50
    assert first.published >= 30
    assert first.published <= 50
    assert first.failed == 200 - first.published
    assert len(clean) == first.published
    # No topic is clean without a PUBACK for exactly the payload it records.
    assert clean <= set(acknowledged_first)
    assert all(
        clean_digests[topic] == payload_digest(acknowledged_first[topic])
        for topic in clean
    )
    assert unacknowledged_first <= dirty
    assert sorted(record.topic for record in second_records) == sorted(dirty)
    assert all(record.acknowledged for record in second_records)
    assert second.published == len(dirty)
    assert second.failed == 0
    assert second.unchanged == len(clean)
    assert sorted(retained) == sorted(topics)
    assert retained == {topic: json.loads(body) for topic, body in expected.items()}


async def test_daemon_broker_restart_loses_nothing(
    broker_factory: BrokerFactory,
    pki: Pki,
    moto_server: MotoServer,
    table_name: str,
    daemon_config: Callable[..., Path],
    proxy_factory: ProxyFactory,
    launch_daemon: Callable[[Path], AsyncDaemon],
    tmp_path: Path,
) -> None:
    topics = await put_targets(moto_server, table_name, 200)
    # With persistence on, mosquitto 2.0 saves its retained messages when it
    # stops and loads them when it starts.
    persistence_dir = tmp_path / "persistence"
    persistence_dir.mkdir()
    upstream = broker_factory(
        ["persistence true", f"persistence_location {persistence_dir}/"]
    )
    proxy = await proxy_factory(upstream.port)
    # 200 topics at 50 per second take 4 s, so the restart lands mid-sync. While
    # the broker is down the proxy closes each connection after the TLS
    # handshake, and aiomqtt then waits out its connect timeout for CONNACK.
    config = daemon_config(
        mqtt={
            "port": proxy.port,
            "max_publish_rate": 50,
            "max_in_flight": 20,
            "publish_timeout_seconds": 3,
            "connect_timeout_seconds": 3,
        }
    )
    daemon = launch_daemon(config)

    await proxy.wait_for_publishes(50)
    # Model a broker that stops reading before it goes down: the last
    # publishes reach neither its store nor a PUBACK.
    proxy.swallow()
    await wait_until(lambda: proxy.swallowed_publishes.total() >= 5)
    await asyncio.to_thread(upstream.stop)
    proxy.stop_swallowing()
    await daemon.wait_for("mqtt_disconnected")
    await asyncio.to_thread(upstream.start)
    await daemon.wait_for(
        lambda line: line.get("event") == "sync_completed" and line["unchanged"] == 200,
        timeout_seconds=60,
    )

    expected = await dry_run_payloads(config)
    retained = await retained_payloads(upstream, pki)
    interrupted = daemon.lines("sync_completed")[0]
    before_restart = {
        record.topic
        for record in proxy.records
        if record.connection == 1 and record.acknowledged
    }
    lost_with_broker = {
        record.topic for record in proxy.records if record.action == "swallowed"
    }

    assert interrupted["failed"] > 0
    assert interrupted["published"] >= 30
    assert interrupted["published"] + interrupted["failed"] == 200
    assert daemon.lines("mqtt_reconnecting") != []
    assert sorted(expected) == sorted(topics)
    assert retained == expected
    assert len(lost_with_broker) >= 5
    assert topics_lacking_acknowledged(proxy.records, expected) == []
    assert topics_not_republished(proxy.records) == []
    # Acknowledged topics stay clean, and the broker kept them across the restart.
    assert len(before_restart) >= 30
    assert all(proxy.forwarded_publishes[topic] == 1 for topic in before_restart)


async def test_daemon_unacknowledged_topics_stay_dirty(
    pki: Pki,
    broker: MosquittoBroker,
    moto_server: MotoServer,
    table_name: str,
    daemon_config: Callable[..., Path],
    proxy: MqttFaultProxy,
    launch_daemon: Callable[[Path], AsyncDaemon],
) -> None:
    topics = await put_targets(moto_server, table_name, 30)
    swallowed = sorted(topics[3:30:6])
    others = sorted(set(topics) - set(swallowed))
    config = daemon_config(mqtt={"port": proxy.port, "publish_timeout_seconds": 2})
    proxy.swallow(swallowed)

    daemon = launch_daemon(config)
    failed_syncs = await daemon.wait_for(
        lambda line: line.get("event") == "sync_completed" and line["failed"] > 0,
        timeout_seconds=30,
        count=2,
    )
    warnings = daemon.lines("publish_failed")
    proxy.stop_swallowing()
    await daemon.wait_for(
        lambda line: line.get("event") == "sync_completed" and line["unchanged"] == 30,
        timeout_seconds=30,
    )

    expected = await dry_run_payloads(config)
    retained = await retained_payloads(broker, pki)
    first, retry = failed_syncs[:2]

    assert first["topics"] == 30
    assert first["published"] == 25
    assert first["failed"] == 5
    assert retry["published"] == 0
    assert retry["failed"] == 5
    assert retry["unchanged"] == 25
    # The retry's identical warning is left out for five minutes.
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"
    assert warnings[0]["failed"] == 5
    assert warnings[0]["errors"] == {PUBACK_TIMEOUT: 5}
    assert warnings[0]["topics"] == swallowed
    assert daemon.lines("mqtt_disconnected") == []
    assert all(proxy.swallowed_publishes[topic] >= 2 for topic in swallowed)
    assert all(proxy.forwarded_publishes[topic] == 1 for topic in others)
    assert all(proxy.forwarded_publishes[topic] >= 1 for topic in swallowed)
    assert topics_lacking_acknowledged(proxy.records, expected) == []
    assert retained == expected


async def test_daemon_denied_topic_without_reconnect_loop(
    pki: Pki,
    broker: MosquittoBroker,
    moto_server: MotoServer,
    table_name: str,
    daemon_config: Callable[..., Path],
    proxy: MqttFaultProxy,
    launch_daemon: Callable[[Path], AsyncDaemon],
) -> None:
    topics = await put_targets(moto_server, table_name, 20)
    denied = topics[7]
    config = daemon_config(mqtt={"port": proxy.port})
    proxy.deny(denied)

    daemon = launch_daemon(config)
    quarantined = await daemon.wait_for("topic_quarantined", timeout_seconds=30)
    # Several syncs after the hold began show whether the connection keeps dropping.
    completed_before = len(daemon.lines("sync_completed"))
    await daemon.wait_for("sync_completed", count=completed_before + 4)

    expected = await dry_run_payloads(config)
    retained = await retained_payloads(broker, pki)
    lines = daemon.process.lines()
    held_index = lines.index(quarantined[0])
    later_syncs = [
        line for line in lines[held_index:] if line.get("event") == "sync_completed"
    ]
    later_drops = [
        line for line in lines[held_index:] if line.get("event") == "mqtt_disconnected"
    ]
    expected_others = {topic: expected[topic] for topic in topics if topic != denied}

    assert quarantined[0]["level"] == "error"
    assert quarantined[0]["topic"] == denied
    assert quarantined[0]["retry_in_seconds"] == FIRST_HOLD_SECONDS
    assert quarantined[0]["strikes"] == 1
    assert len(daemon.lines("topic_quarantined")) == 1
    # One drop with the topic in a batch, one with the topic alone.
    assert proxy.denied_publishes[denied] == 2
    assert len(daemon.lines("mqtt_disconnected")) == 2
    assert later_drops == []
    assert len(later_syncs) >= 4
    assert all(line["quarantined"] == 1 for line in later_syncs[1:])
    assert all(line["failed"] == 0 for line in later_syncs[1:])
    assert daemon.lines("mqtt_client_id_conflict") == []
    assert proxy.forwarded_publishes[denied] == 0
    assert topics_lacking_acknowledged(proxy.records, expected_others) == []
    assert retained == expected_others


async def test_sync_denied_topic_hold_doubles(
    broker: MosquittoBroker,
    pki: Pki,
    moto_server: MotoServer,
    table_name: str,
    proxy: MqttFaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topics = await put_targets(moto_server, table_name, 6)
    denied = topics[3]
    settings = make_settings(
        broker, pki, moto_server, table_name, mqtt={"port": proxy.port}
    )
    clock = ShiftedClock()
    monkeypatch.setattr(eventsync.sync, "time", clock)
    proxy.deny(denied)

    async with open_syncer(settings) as (syncer, connection):
        with capture_logs() as logs:
            batch_report = await syncer.run()
            alone_report = await syncer.run()
            # Count connections once the drop caused by `alone_report` has been replaced.
            assert await connection.wait_connected(10)
            connections_before_hold = connection.connection_count
            held_report = await syncer.run()
            connections_after_hold = connection.connection_count
            denied_after_hold = proxy.denied_publishes[denied]

            clock.advance(FIRST_HOLD_SECONDS + 1)
            retry_report = await syncer.run()
            # The second hold lasts twice as long as the first.
            clock.advance(FIRST_HOLD_SECONDS + 1)
            second_hold_report = await syncer.run()
            denied_after_second_hold = proxy.denied_publishes[denied]

            proxy.allow(denied)
            clock.advance(FIRST_HOLD_SECONDS)
            release_report = await syncer.run()
            released_digest = syncer.cache.digest(denied)

    expected = await computed_payloads(settings)
    retained = await retained_payloads(broker, pki)
    quarantine_logs = [entry for entry in logs if entry["event"] == "topic_quarantined"]

    assert batch_report.failures[denied] == CONNECTION_LOST
    assert alone_report.failures == {denied: CONNECTION_LOST}
    assert held_report.quarantined == 1
    assert held_report.failed == 0
    assert connections_after_hold == connections_before_hold
    assert denied_after_hold == 2
    assert retry_report.failures == {denied: CONNECTION_LOST}
    assert second_hold_report.quarantined == 1
    assert denied_after_second_hold == 3
    assert [entry["topic"] for entry in quarantine_logs] == [denied, denied]
    assert [entry["strikes"] for entry in quarantine_logs] == [1, 2]
    assert [entry["retry_in_seconds"] for entry in quarantine_logs] == [
        FIRST_HOLD_SECONDS,
        2 * FIRST_HOLD_SECONDS,
    ]
    assert all(entry["log_level"] == "error" for entry in quarantine_logs)
    assert release_report.published == 1
    assert release_report.quarantined == 0
    assert release_report.failed == 0
    assert released_digest == payload_digest(expected[denied])
    assert retained == {topic: json.loads(body) for topic, body in expected.items()}
