"""DynamoDB faults between eventsync and the table, injected by a proxy in front of moto.

The proxy pages every Scan at two items, so the six-target table of these tests
spans three pages and a fault from page 2 on leaves a scan partly read.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from eventsync.config import Settings
from eventsync.errors import StoreError
from eventsync.publisher import MqttConnection
from eventsync.store import EventStore
from eventsync.sync import Syncer
from tests.support.broker import MosquittoBroker
from tests.support.daemon import DaemonProcess
from tests.support.dynamo import (
    MotoServer,
    create_events_table,
    delete_raw_item,
    put_raw_items,
)
from tests.support.dynamo_proxy import THROTTLING_ERRORS, DynamoProxy
from tests.support.factories import event_item, make_settings
from tests.support.mqtt import ReceivedMessage, read_retained, subscribe_collect
from tests.support.pki import Pki

HOUR = 3600
TARGETS = [f"room-{number}" for number in range(6)]
SCAN_PAGE_ITEMS = 2
# The changes made while DynamoDB fails: one target gains an event, one gets a
# new title, one loses its only event and so vanishes.
CHANGED_TOPICS = {"events/room-0", "events/room-3", "events/room-5"}
VANISHED_TOPIC = "events/room-5"


@dataclass(frozen=True)
class StoreFault:
    """A way for DynamoDB to fail, and a regular expression the error matches."""

    apply: Callable[[DynamoProxy], None]
    error_pattern: str


# aiobotocore reports a request whose connection the server closed or reset as
# ConnectionClosedError when the connection came from its keep-alive pool, and
# as EndpointConnectionError when it was new, like a refused connection.
# refuse_connections() closes the pooled connections, so a sync's last attempt
# can end either way.
CONNECTION_ERRORS = "ConnectionClosedError|EndpointConnectionError"

FAULTS = [
    pytest.param(
        StoreFault(
            lambda proxy: proxy.fail_requests(
                "ProvisionedThroughputExceededException", operation="Scan"
            ),
            "ProvisionedThroughputExceededException",
        ),
        id="throttled",
    ),
    pytest.param(
        StoreFault(lambda proxy: proxy.refuse_connections(), CONNECTION_ERRORS),
        id="unreachable",
    ),
    pytest.param(
        StoreFault(
            lambda proxy: proxy.fail_scan_from_page(2, "http_500"),
            "InternalServerError",
        ),
        id="page-2-http-500",
    ),
    pytest.param(
        StoreFault(
            lambda proxy: proxy.fail_scan_from_page(2, "reset"),
            CONNECTION_ERRORS,
        ),
        id="page-2-reset",
    ),
]


@pytest.fixture
def dynamo_proxy(moto_server: MotoServer) -> Iterator[DynamoProxy]:
    """A fault proxy in front of moto that pages every Scan at two items."""
    with DynamoProxy(moto_server.endpoint_url) as proxy:
        proxy.set_scan_page_size(SCAN_PAGE_ITEMS)
        yield proxy


@pytest.fixture
async def six_targets(moto_server: MotoServer, table_name: str) -> str:
    """Create the test table with one current event on each of six targets."""
    now = time.time()
    await create_events_table(moto_server.endpoint_url, table_name)
    await put_raw_items(
        moto_server.endpoint_url,
        table_name,
        [event_item(target, "a", now - 60, now + HOUR) for target in TARGETS],
    )
    return table_name


@pytest.fixture
async def open_syncer(
    broker: MosquittoBroker,
    pki: Pki,
    moto_server: MotoServer,
    table_name: str,
    dynamo_proxy: DynamoProxy,
) -> AsyncIterator[Callable[..., Any]]:
    """Open Syncers that read the table through the proxy and publish to the broker."""
    async with AsyncExitStack() as stack:

        async def create(max_attempts: int = 1) -> Syncer:
            settings = through_proxy(
                make_settings(broker, pki, moto_server, table_name),
                dynamo_proxy,
                max_attempts,
            )
            store = await stack.enter_async_context(EventStore(settings.dynamodb))
            connection = await stack.enter_async_context(MqttConnection(settings.mqtt))
            assert await connection.wait_connected(10)
            return Syncer(settings, store, connection)

        yield create


def through_proxy(
    settings: Settings, proxy: DynamoProxy, max_attempts: int
) -> Settings:
    dynamodb = settings.dynamodb.model_copy(
        update={"endpoint_url": proxy.url, "max_attempts": max_attempts}
    )
    return settings.model_copy(update={"dynamodb": dynamodb})


async def change_table(moto_server: MotoServer, table_name: str) -> None:
    """Make the changes behind CHANGED_TOPICS, straight in moto."""
    now = time.time()
    await put_raw_items(
        moto_server.endpoint_url,
        table_name,
        [
            event_item("room-0", "b", now + 60, now + HOUR),
            event_item("room-3", "a", now - 60, now + HOUR, title="Renamed"),
        ],
    )
    await delete_raw_item(
        moto_server.endpoint_url,
        table_name,
        {"target": {"S": "room-5"}, "event_id": {"S": "a"}},
    )


def cache_state(syncer: Syncer) -> dict[str, tuple[str, bytes | None]]:
    """Return topic -> (target, acknowledged digest) for every tracked topic."""
    return {
        topic: (target, syncer.cache.digest(topic))
        for topic, target in syncer.cache.topics().items()
    }


def emptied_topics(messages: list[ReceivedMessage]) -> set[str]:
    """Return the topics among `messages` whose payload has no events."""
    return {
        message.topic
        for message in messages
        if not message.payload or json.loads(message.payload)["events"] == []
    }


async def wait_until(
    condition: Callable[[], bool], description: str, timeout_seconds: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_seconds} s: {description}")
        await asyncio.sleep(0.05)


async def wait_for_line(
    daemon: DaemonProcess,
    predicate: Callable[[dict[str, Any]], bool] | str,
    *,
    count: int = 1,
    timeout_seconds: float = 30.0,
) -> list[dict[str, Any]]:
    """Run DaemonProcess.wait_for in a thread, so the event loop keeps serving MQTT."""
    return await asyncio.to_thread(
        daemon.wait_for, predicate, timeout_seconds=timeout_seconds, count=count
    )


@pytest.mark.parametrize("error_type", THROTTLING_ERRORS)
async def test_syncer_brief_throttling_retried_within_sync(
    six_targets: str,
    open_syncer: Callable[..., Any],
    dynamo_proxy: DynamoProxy,
    broker: MosquittoBroker,
    pki: Pki,
    error_type: str,
) -> None:
    syncer: Syncer = await open_syncer(max_attempts=3)
    dynamo_proxy.fail_requests(error_type, count=2, operation="Scan")

    report = await syncer.run()
    retained = await read_retained(broker.host, broker.port, pki, "events/#")

    assert report.published == len(TARGETS)
    assert report.failed == 0
    assert dynamo_proxy.injected_count("Scan") == 2
    # Two throttled requests for page 1, then the three pages.
    assert dynamo_proxy.request_count("Scan") == 5
    assert dynamo_proxy.scan_pages_forwarded() == [1, 2, 3]
    assert sorted(retained) == [f"events/{target}" for target in TARGETS]


@pytest.mark.parametrize("max_attempts", [1, 2])
async def test_syncer_scan_attempts_match_max_attempts(
    six_targets: str,
    open_syncer: Callable[..., Any],
    dynamo_proxy: DynamoProxy,
    max_attempts: int,
) -> None:
    # docs/configuration.md: dynamodb.max_attempts counts attempts per request,
    # the first included.
    syncer: Syncer = await open_syncer(max_attempts=max_attempts)
    dynamo_proxy.fail_requests("ThrottlingException", operation="Scan")

    with pytest.raises(StoreError, match="ThrottlingException"):
        await syncer.run()

    assert dynamo_proxy.request_count("Scan") == max_attempts


@pytest.mark.parametrize("fault", FAULTS)
async def test_syncer_store_fault_keeps_cache(
    six_targets: str,
    open_syncer: Callable[..., Any],
    dynamo_proxy: DynamoProxy,
    moto_server: MotoServer,
    broker: MosquittoBroker,
    pki: Pki,
    fault: StoreFault,
) -> None:
    syncer: Syncer = await open_syncer()
    first = await syncer.run()
    cache_before = cache_state(syncer)
    retained_before = await read_retained(broker.host, broker.port, pki, "events/#")
    await change_table(moto_server, six_targets)

    async with subscribe_collect(broker.host, broker.port, pki, "events/#") as seen:
        await seen.wait_quiet(0.3)
        fault.apply(dynamo_proxy)
        with pytest.raises(StoreError, match=fault.error_pattern) as failure:
            await syncer.run()
        cache_after_failure = cache_state(syncer)
        await seen.wait_quiet(0.5)
        live_during_fault = seen.live()
        retained_during_fault = await read_retained(
            broker.host, broker.port, pki, "events/#"
        )

        dynamo_proxy.clear_faults()
        recovered = await syncer.run()
        await seen.wait_quiet(0.5)
        live_after_recovery = seen.live()[len(live_during_fault) :]

    assert first.published == len(TARGETS)
    assert six_targets in str(failure.value)
    assert cache_after_failure == cache_before
    assert live_during_fault == []
    assert retained_during_fault == retained_before
    assert recovered.published == len(CHANGED_TOPICS)
    assert recovered.unchanged == len(TARGETS) - len(CHANGED_TOPICS)
    assert recovered.failed == 0
    assert {message.topic for message in live_after_recovery} == CHANGED_TOPICS
    assert emptied_topics(live_after_recovery) == {VANISHED_TOPIC}


async def test_syncer_partial_scan_reads_first_page(
    six_targets: str,
    open_syncer: Callable[..., Any],
    dynamo_proxy: DynamoProxy,
) -> None:
    """Test that a page-2 fault leaves page 1 read, so the scan is really partial."""
    syncer: Syncer = await open_syncer()
    dynamo_proxy.fail_scan_from_page(2)

    with pytest.raises(StoreError):
        await syncer.run()

    assert dynamo_proxy.scan_pages_forwarded() == [1]
    assert dynamo_proxy.injected_count("Scan") >= 1


@pytest.mark.parametrize("fault", FAULTS)
async def test_daemon_store_fault_then_recovery(
    six_targets: str,
    dynamo_proxy: DynamoProxy,
    daemon_config: Callable[..., Path],
    start_daemon: Callable[[Path], DaemonProcess],
    moto_server: MotoServer,
    broker: MosquittoBroker,
    pki: Pki,
    fault: StoreFault,
) -> None:
    config_path = daemon_config(dynamodb={"endpoint_url": dynamo_proxy.url})
    daemon = start_daemon(config_path)
    await wait_for_line(daemon, "sync_completed")
    retained_before = await read_retained(broker.host, broker.port, pki, "events/#")

    async with subscribe_collect(broker.host, broker.port, pki, "events/#") as seen:
        await seen.wait_quiet(0.3)
        fault.apply(dynamo_proxy)
        await wait_for_line(daemon, "sync_failed")
        completed_before_change = daemon.events().count("sync_completed")
        await change_table(moto_server, six_targets)
        await wait_for_failed_syncs(dynamo_proxy)
        lines_during_fault = daemon.lines()
        await seen.wait_quiet(0.5)
        live_during_fault = seen.live()
        retained_during_fault = await read_retained(
            broker.host, broker.port, pki, "events/#"
        )

        dynamo_proxy.clear_faults()
        recovered = await wait_for_line(
            daemon,
            lambda line: (
                line.get("event") == "sync_completed" and line["published"] > 0
            ),
            count=2,
        )
        await seen.wait_quiet(0.5)
        live_after_recovery = seen.live()[len(live_during_fault) :]

    errors = [line for line in lines_during_fault if line["level"] == "error"]
    completed_during_fault = [
        line for line in lines_during_fault if line["event"] == "sync_completed"
    ]
    assert len(errors) == 1
    assert errors[0]["event"] == "sync_failed"
    assert re.search(fault.error_pattern, errors[0]["error"])
    assert six_targets in errors[0]["error"]
    assert len(completed_during_fault) == completed_before_change
    assert live_during_fault == []
    assert retained_during_fault == retained_before
    assert recovered[-1]["published"] == len(CHANGED_TOPICS)
    assert recovered[-1]["unchanged"] == len(TARGETS) - len(CHANGED_TOPICS)
    assert recovered[-1]["failed"] == 0
    assert {message.topic for message in live_after_recovery} == CHANGED_TOPICS
    assert emptied_topics(live_after_recovery) == {VANISHED_TOPIC}


async def wait_for_failed_syncs(proxy: DynamoProxy) -> None:
    """Wait until the daemon has run at least one whole sync after the table changed.

    A failed sync sends at most three Scan requests here: page 1 and two
    attempts of page 2. The sync under way at the change sends at most three
    more, so six new requests mean that one whole sync began after the change.
    A refused connection never reaches the proxy, so that fault waits three
    sync intervals instead.
    """
    start = proxy.request_count("Scan")
    if proxy.is_refusing_connections:
        await asyncio.sleep(3)
        return
    await wait_until(
        lambda: proxy.request_count("Scan") - start >= 6,
        "six Scan requests after the table changed",
    )


async def test_daemon_slow_scan_skips_sync(
    seeded_table: str,
    dynamo_proxy: DynamoProxy,
    daemon_config: Callable[..., Path],
    start_daemon: Callable[[Path], DaemonProcess],
) -> None:
    delay_seconds = 2.5
    dynamo_proxy.delay_responses(delay_seconds, operation="Scan")
    config_path = daemon_config(
        dynamodb={"endpoint_url": dynamo_proxy.url},
        sync={"interval_seconds": 1},
    )
    daemon = start_daemon(config_path)

    completed = await wait_for_line(
        daemon, "sync_completed", count=3, timeout_seconds=60
    )
    # Each sync takes 2.5 intervals, so the schedule fired during the first ones.
    skipped = [line for line in daemon.lines() if line["event"] == "sync_skipped"]

    assert dynamo_proxy.max_concurrent("Scan") == 1
    assert all(line["duration_seconds"] >= delay_seconds for line in completed)
    assert len(skipped) >= 1
    assert skipped[0]["level"] == "warning"
    assert skipped[0]["reason"] == "the previous sync is still running"
    assert "sync_failed" not in daemon.events()
    assert completed[0]["published"] == 2
    assert [line["published"] for line in completed[1:]] == [0, 0]
