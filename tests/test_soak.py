"""A soak run of `eventsync run`: a churning table and a broker that restarts.

For about two and a half minutes the test rewrites the table with new events,
replacements, deletions and whole targets vanishing. Meanwhile it restarts the
broker several times on the same port. Persistence is on, so the broker keeps
its retained messages across restarts. After the last change the daemon must
settle with every retained payload equal to what `eventsync sync --dry-run`
computes from the final table, and its `runtime_stats` lines must show no
growth in tasks, open files or memory.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from eventsync.payloads import build_vanished_payload
from tests.support.broker import BrokerFactory, MosquittoBroker
from tests.support.daemon import DaemonProcess, run_cli
from tests.support.dynamo import MotoServer, create_events_table, dynamodb_client
from tests.support.factories import event_item
from tests.support.mqtt import read_retained
from tests.support.pki import Pki

HOUR = 3600
DAY = 24 * HOUR
# Fixed, so that a failing run can be repeated with the same changes.
SEED = 20261204
CHURN_SECONDS = 150.0
RESTART_INTERVAL_SECONDS = 25.0
CHANGE_PAUSE_SECONDS = 0.4
# Additions outnumber deletions, so the table grows to this size and stays near it.
MAX_ITEMS = 100
TARGET_POOL = [f"soak-{number:02d}" for number in range(30)] + [
    f"floor/{floor}/kiosk-{kiosk}" for floor in (1, 2) for kiosk in range(5)
]
INITIAL_TARGETS = 25
# The early steady state: runtime_stats lines from this window of the churn,
# after the cold start and the first broker restart.
EARLY_WINDOW_SECONDS = (30.0, 60.0)
# Open files may differ by the connections aiohttp keeps in its pool to
# DynamoDB and by a socket being replaced during a reconnect. A leak of one
# file per restart (five) or per sync (about a hundred) exceeds this.
OPEN_FILES_TOLERANCE = 3
# Python's allocator keeps freed arenas, and a sync of about a hundred items
# builds a few hundred kilobytes of objects, so the resident size wanders by a
# few MiB between samples. A leak of 100 kB per sync, about 10 MiB over the
# run, exceeds this.
RSS_TOLERANCE_BYTES = 8 * 1024 * 1024


@dataclass
class TableModel:
    """The items this test wrote, to know which targets and events exist."""

    items: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    ever_present: set[str] = field(default_factory=set)
    next_event_number: int = 0
    changes: int = 0

    def targets(self) -> set[str]:
        return {target for target, _ in self.items}

    def new_event_id(self) -> str:
        self.next_event_number += 1
        return f"e{self.next_event_number}"


def random_event(
    rng: random.Random, target: str, event_id: str, origin: float
) -> dict[str, Any]:
    """Build an item whose payload cannot change during the test on its own.

    Every event ends at least an hour after `origin`, and an event outside the
    seven-day lookahead enters it a day or more later, so only the table's
    changes change a payload while the test runs.
    """
    if rng.random() < 0.2:
        starts_at = origin + rng.uniform(8 * DAY, 10 * DAY)
    else:
        starts_at = origin + rng.uniform(-HOUR, 3 * DAY)
    ends_at = starts_at + rng.uniform(2 * HOUR, 2 * DAY)
    extra: dict[str, Any] = {}
    if rng.random() < 0.3:
        extra["location"] = {"S": f"Room {rng.randint(1, 99)}"}
    return event_item(
        target,
        event_id,
        int(starts_at),
        int(ends_at),
        title=f"{target} {event_id} {rng.randint(0, 10**6)}",
        iso=rng.random() < 0.5,
        **extra,
    )


async def put(client: Any, table: str, model: TableModel, item: dict[str, Any]) -> None:
    await client.put_item(TableName=table, Item=item)
    key = (item["target"]["S"], item["event_id"]["S"])
    model.items[key] = item
    model.ever_present.add(key[0])
    model.changes += 1


async def delete(
    client: Any, table: str, model: TableModel, key: tuple[str, str]
) -> None:
    target, event_id = key
    await client.delete_item(
        TableName=table,
        Key={"target": {"S": target}, "event_id": {"S": event_id}},
    )
    del model.items[key]
    model.changes += 1


async def change_table_once(
    client: Any, table: str, model: TableModel, rng: random.Random, origin: float
) -> None:
    """Apply one random change: add, replace, delete, or empty a whole target."""
    keys = sorted(model.items)
    roll = rng.random()
    if len(keys) >= MAX_ITEMS:
        roll = 0.8
    if roll < 0.45 or not keys:
        target = rng.choice(TARGET_POOL)
        await put(
            client,
            table,
            model,
            random_event(rng, target, model.new_event_id(), origin),
        )
    elif roll < 0.7:
        target, event_id = rng.choice(keys)
        await put(client, table, model, random_event(rng, target, event_id, origin))
    elif roll < 0.93:
        await delete(client, table, model, rng.choice(keys))
    else:
        target = rng.choice(sorted(model.targets()))
        for key in keys:
            if key[0] == target:
                await delete(client, table, model, key)


async def churn_table(
    endpoint_url: str,
    table: str,
    model: TableModel,
    rng: random.Random,
    origin: float,
    deadline: float,
) -> float:
    """Change the table until `deadline`, and return the time of the last change."""
    async with dynamodb_client(endpoint_url) as client:
        while time.monotonic() < deadline:
            for _ in range(rng.randint(1, 4)):
                await change_table_once(client, table, model, rng, origin)
            await asyncio.sleep(CHANGE_PAUSE_SECONDS)
    return time.time()


async def restart_broker_repeatedly(
    broker: MosquittoBroker, rng: random.Random, deadline: float
) -> int:
    """Restart the broker every RESTART_INTERVAL_SECONDS, and return the count."""
    restarts = 0
    while time.monotonic() + RESTART_INTERVAL_SECONDS < deadline:
        await asyncio.sleep(RESTART_INTERVAL_SECONDS)
        await asyncio.to_thread(broker.stop)
        await asyncio.sleep(rng.uniform(0.5, 3.0))
        await asyncio.to_thread(broker.start)
        restarts += 1
    return restarts


def started_at(line: dict[str, Any]) -> float:
    """Return the epoch time at which the sync of a sync_completed line began."""
    ended = datetime.fromisoformat(line["timestamp"]).timestamp()
    return ended - float(line["duration_seconds"])


def logged_at(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(line["timestamp"]).timestamp()


def expected_payloads(config_path: Path) -> dict[str, Any]:
    """Return topic -> payload of every target in the table, from the dry run."""
    result = run_cli("sync", "--dry-run", "--config", str(config_path))
    if result.returncode != 0:
        raise AssertionError(f"eventsync sync --dry-run failed:\n{result.stderr}")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    return {line["topic"]: line["payload"] for line in lines}


@pytest.mark.timeout(290)
async def test_daemon_soak_converges_without_growth(
    broker_factory: BrokerFactory,
    daemon_config: Callable[..., Path],
    start_daemon: Callable[[Path], DaemonProcess],
    moto_server: MotoServer,
    table_name: str,
    pki: Pki,
    tmp_path: Path,
) -> None:
    rng = random.Random(SEED)
    origin = time.time()
    model = TableModel()

    await create_events_table(moto_server.endpoint_url, table_name)
    async with dynamodb_client(moto_server.endpoint_url) as client:
        for target in TARGET_POOL[:INITIAL_TARGETS]:
            for _ in range(rng.randint(1, 3)):
                item = random_event(rng, target, model.new_event_id(), origin)
                await put(client, table_name, model, item)

    persistence_folder = tmp_path / "mosquitto-persistence"
    persistence_folder.mkdir()
    broker = broker_factory(
        [
            # The generated configuration contains `persistence false` first,
            # and mosquitto takes the last value of a repeated option.
            "persistence true",
            f"persistence_location {persistence_folder}/",
        ]
    )
    config_path = daemon_config(
        mqtt={"port": broker.port},
        sync={"interval_seconds": 1},
        log={"level": "debug"},
    )
    daemon = start_daemon(config_path)
    await asyncio.to_thread(daemon.wait_for, "sync_completed")

    churn_started = time.time()
    deadline = time.monotonic() + CHURN_SECONDS
    last_change, restarts = await asyncio.gather(
        churn_table(moto_server.endpoint_url, table_name, model, rng, origin, deadline),
        restart_broker_repeatedly(broker, rng, deadline),
    )

    settled = await asyncio.to_thread(
        daemon.wait_for,
        lambda line: (
            line.get("event") == "sync_completed"
            and started_at(line) > last_change
            and line["published"] == 0
            and line["failed"] == 0
            and line["quarantined"] == 0
        ),
        timeout_seconds=60,
    )
    # Two more syncs, so that the end of the run has several runtime_stats lines.
    final_syncs = len(settled) + 2
    await asyncio.to_thread(
        daemon.wait_for,
        lambda line: (
            line.get("event") == "sync_completed" and started_at(line) > last_change
        ),
        count=final_syncs,
        timeout_seconds=30,
    )
    retained_raw = await read_retained(broker.host, broker.port, pki, "events/#")
    expected = expected_payloads(config_path)
    lines = daemon.lines()

    retained = {topic: json.loads(body) for topic, body in retained_raw.items()}
    missing = sorted(set(expected) - set(retained))
    different = sorted(
        topic
        for topic in set(expected) & set(retained)
        if retained[topic] != expected[topic]
    )
    vanished = {
        topic: retained[topic] for topic in sorted(set(retained) - set(expected))
    }
    vanished_expected = {
        topic: json.loads(
            build_vanished_payload(
                topic.removeprefix("events/"), topic, clear=False
            ).body
        )
        for topic in vanished
    }
    never_written = sorted(
        topic
        for topic in vanished
        if topic.removeprefix("events/") not in model.ever_present
    )

    stats = [line for line in lines if line["event"] == "runtime_stats"]
    early = [
        line
        for line in stats
        if churn_started + EARLY_WINDOW_SECONDS[0]
        <= logged_at(line)
        <= churn_started + EARLY_WINDOW_SECONDS[1]
    ]
    end = [line for line in stats if logged_at(line) > last_change][-3:]
    reconnects = [line for line in lines if line["event"] == "mqtt_connected"]
    print(
        f"soak: {model.changes} table changes, {restarts} broker restarts,"
        f" {len(expected)} targets, {len(vanished)} vanished;"
        f" early tasks/files/rss max {max_stats(early)}, end {max_stats(end)}"
    )

    assert daemon.process.poll() is None
    assert restarts >= 4
    assert len(reconnects) >= restarts + 1
    assert model.changes >= 200
    assert len(expected) >= 10
    assert missing == []
    assert different == []
    assert vanished == vanished_expected
    assert never_written == []
    assert len(early) >= 10
    assert len(end) == 3
    # Tasks get no tolerance: between syncs the daemon runs a fixed set of them.
    assert max_stats(end)[0] <= max_stats(early)[0]
    assert max_stats(end)[1] <= max_stats(early)[1] + OPEN_FILES_TOLERANCE
    assert max_stats(end)[2] <= max_stats(early)[2] + RSS_TOLERANCE_BYTES


def max_stats(lines: list[dict[str, Any]]) -> tuple[int, int, int]:
    """Return the largest tasks, open_files and rss_bytes among runtime_stats lines."""
    if not lines:
        return (0, 0, 0)
    return (
        max(int(line["tasks"]) for line in lines),
        max(int(line["open_files"]) for line in lines),
        max(int(line["rss_bytes"]) for line in lines),
    )
