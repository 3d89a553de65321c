"""`eventsync run` as a process: schedule, signals, reconnects and the heartbeat."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.broker import MosquittoBroker
from tests.support.daemon import DaemonProcess, SilentServer, run_cli
from tests.support.dynamo import MotoServer, put_raw_items
from tests.support.factories import event_item
from tests.support.mqtt import read_retained
from tests.support.pki import Pki

HOUR = 3600


async def test_daemon_sigterm_exits_cleanly(
    seeded_table: str,
    daemon_config: Callable[..., Path],
    start_daemon: Callable[[Path], DaemonProcess],
    broker: MosquittoBroker,
    pki: Pki,
    tmp_path: Path,
) -> None:
    config_path = daemon_config()
    daemon = start_daemon(config_path)
    daemon.wait_for("sync_completed", count=2)
    retained = await read_retained(broker.host, broker.port, pki, "events/#")
    health = run_cli("health", "--config", str(config_path), "--max-age", "60")

    daemon.signal(signal.SIGTERM)
    status = await asyncio.to_thread(daemon.wait, 15)
    events = daemon.events()

    assert sorted(retained) == ["events/lobby", "events/room-101"]
    assert health.returncode == 0
    assert status == 0
    assert events[0] == "startup"
    assert "shutdown_started" in events
    assert events[-1] == "shutdown_completed"
    disconnects = [
        line for line in daemon.lines() if line["event"] == "mqtt_disconnected"
    ]
    assert [line["reason"] for line in disconnects] == ["shutdown"]
    assert all(line["level"] != "error" for line in daemon.lines())


async def test_daemon_logs_are_json_lines(
    seeded_table: str,
    daemon_config: Callable[..., Path],
    start_daemon: Callable[[Path], DaemonProcess],
    pki: Pki,
) -> None:
    daemon = start_daemon(daemon_config())
    daemon.wait_for("sync_completed")
    daemon.stop()

    lines = daemon.lines()
    startup = lines[0]
    completed = next(line for line in lines if line["event"] == "sync_completed")
    key_text = pki.client_key_pkcs1.read_text()
    output = daemon.output_path.read_text()

    assert "<not json>" not in [line["event"] for line in lines]
    assert startup["topic_template"] == "events/{target}"
    assert startup["broker_host"] == "localhost"
    assert set(completed) >= {
        "duration_seconds",
        "events_read",
        "invalid",
        "topics",
        "published",
        "unchanged",
        "failed",
    }
    assert completed["events_read"] == 2
    assert completed["published"] == 2
    # No key material and no payload body at INFO.
    assert key_text.splitlines()[1] not in output
    assert '"events":' not in output


def test_daemon_second_signal_exits_at_once(
    daemon_config: Callable[..., Path],
    start_daemon: Callable[[Path], DaemonProcess],
) -> None:
    silent = SilentServer()
    try:
        config_path = daemon_config(
            dynamodb={"endpoint_url": silent.url, "read_timeout_seconds": 60},
            sync={"shutdown_timeout": 30},
        )
        daemon = start_daemon(config_path)
        silent.wait_for_connection()

        daemon.signal(signal.SIGTERM)
        daemon.wait_for("shutdown_waiting_for_sync")
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        status = daemon.wait(5)
        elapsed = time.monotonic() - started
    finally:
        silent.close()

    assert status == 128 + signal.SIGTERM
    assert elapsed < 3
    assert "shutdown_forced" in daemon.events()


def test_daemon_shutdown_timeout_cancels_sync(
    daemon_config: Callable[..., Path],
    start_daemon: Callable[[Path], DaemonProcess],
) -> None:
    silent = SilentServer()
    try:
        config_path = daemon_config(
            dynamodb={"endpoint_url": silent.url, "read_timeout_seconds": 60},
            sync={"shutdown_timeout": 1},
        )
        daemon = start_daemon(config_path)
        silent.wait_for_connection()

        daemon.signal(signal.SIGTERM)
        status = daemon.wait(10)
    finally:
        silent.close()

    events = daemon.events()
    assert status == 0
    assert "sync_cancelled" in events
    assert events[-1] == "shutdown_completed"


async def test_daemon_skips_overlapping_sync(
    daemon_config: Callable[..., Path],
    start_daemon: Callable[[Path], DaemonProcess],
) -> None:
    silent = SilentServer()
    try:
        config_path = daemon_config(
            dynamodb={"endpoint_url": silent.url, "read_timeout_seconds": 4},
            sync={"interval_seconds": 1, "shutdown_timeout": 1},
        )
        daemon = start_daemon(config_path)
        skipped = daemon.wait_for("sync_skipped", timeout_seconds=10)
        failed = daemon.wait_for("sync_failed", timeout_seconds=15)
    finally:
        silent.close()

    assert skipped[0]["level"] == "warning"
    assert failed[0]["level"] == "error"
    assert "scan of table" in failed[0]["error"]


async def test_daemon_cron_syncs_at_startup(
    seeded_table: str,
    daemon_config: Callable[..., Path],
    start_daemon: Callable[[Path], DaemonProcess],
) -> None:
    # Midnight on January 1st: the only sync within the test is the start-up one.
    config_path = daemon_config(sync={"interval_seconds": None, "cron": "0 0 1 1 *"})
    daemon = start_daemon(config_path)

    completed = daemon.wait_for("sync_completed")
    startup = daemon.lines()[0]

    assert completed[0]["published"] == 2
    assert startup["schedule"] == "cron '0 0 1 1 *' (UTC)"


async def test_daemon_publishes_after_broker_restart(
    seeded_table: str,
    daemon_config: Callable[..., Path],
    start_daemon: Callable[[Path], DaemonProcess],
    broker: MosquittoBroker,
    pki: Pki,
    moto_server: MotoServer,
) -> None:
    daemon = start_daemon(daemon_config())
    daemon.wait_for("sync_completed")

    broker.stop()
    daemon.wait_for("mqtt_disconnected")
    now = time.time()
    await put_raw_items(
        moto_server.endpoint_url,
        seeded_table,
        [event_item("lobby", "new", now - 30, now + HOUR)],
    )
    broker.start()
    daemon.wait_for("mqtt_connected", count=2)
    daemon.wait_for(
        lambda line: line.get("event") == "sync_completed" and line["published"] >= 1,
        count=2,
    )
    retained = await read_retained(broker.host, broker.port, pki, "events/lobby")

    ids = [event["id"] for event in json.loads(retained["events/lobby"])["events"]]
    assert ids == ["a", "new"]
    assert "mqtt_reconnecting" in daemon.events()


def test_daemon_heartbeat_stops_without_broker(
    seeded_table: str,
    daemon_config: Callable[..., Path],
    start_daemon: Callable[[Path], DaemonProcess],
    broker: MosquittoBroker,
    tmp_path: Path,
) -> None:
    heartbeat = tmp_path / "heartbeat"
    daemon = start_daemon(daemon_config())
    daemon.wait_for("sync_completed")

    broker.stop()
    daemon.wait_for("mqtt_disconnected")
    # Syncs with nothing to publish go on completing without the broker.
    completed = daemon.events().count("sync_completed")
    daemon.wait_for("sync_completed", count=completed + 1)
    stale_mtime = heartbeat.stat().st_mtime
    daemon.wait_for("sync_completed", count=completed + 3)
    mtime_while_down = heartbeat.stat().st_mtime

    broker.start()
    daemon.wait_for("mqtt_connected", count=2)
    completed = daemon.events().count("sync_completed")
    daemon.wait_for("sync_completed", count=completed + 2)

    assert mtime_while_down == stale_mtime
    assert heartbeat.stat().st_mtime > stale_mtime
