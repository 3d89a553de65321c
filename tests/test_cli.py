"""The `eventsync` commands as an operator runs them, against real servers."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import MosquittoBroker
from tests.support.daemon import run_cli
from tests.support.dynamo import MotoServer, put_raw_items, scan_raw_items
from tests.support.factories import event_item
from tests.support.pki import Pki

HOUR = 3600


def stderr_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def put_event(
    config: Path, target: str, event_id: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    now = int(time.time())
    return run_cli(
        "events",
        "put",
        "--config",
        str(config),
        "--target",
        target,
        "--event-id",
        event_id,
        "--title",
        f"Meeting {event_id}",
        "--starts-at",
        str(now - 60),
        "--ends-at",
        str(now + HOUR),
        *extra,
    )


def test_table_create_twice_is_harmless(config_factory: Callable[..., Path]) -> None:
    config = config_factory()

    first = run_cli("table", "create", "--config", str(config))
    second = run_cli("table", "create", "--config", str(config))

    assert first.returncode == 0
    assert json.loads(first.stdout)["event"] == "table_created"
    assert second.returncode == 0
    assert json.loads(second.stdout)["event"] == "table_exists"


def test_events_put_list_delete(
    config_factory: Callable[..., Path], moto_server: MotoServer, table_name: str
) -> None:
    config = config_factory()
    run_cli("table", "create", "--config", str(config))

    put = put_event(
        config, "lobby", "e1", "--location", "Hall", "--data", '{"seats": 12}'
    )
    duplicate = put_event(config, "lobby", "e1")
    replaced = put_event(config, "lobby", "e1", "--replace", "--location", "Annex")
    listing = run_cli("events", "list", "--config", str(config), "--target", "lobby")
    deleted = run_cli(
        "events",
        "delete",
        "--config",
        str(config),
        "--target",
        "lobby",
        "--event-id",
        "e1",
    )
    missing = run_cli(
        "events",
        "delete",
        "--config",
        str(config),
        "--target",
        "lobby",
        "--event-id",
        "e1",
    )

    assert put.returncode == 0
    assert duplicate.returncode == 1
    assert "already exists" in stderr_line(duplicate)
    assert replaced.returncode == 0
    listed = [json.loads(line) for line in listing.stdout.splitlines()]
    assert len(listed) == 1
    assert listed[0]["location"] == "Annex"
    assert deleted.returncode == 0
    assert missing.returncode == 1
    assert "not found" not in missing.stdout
    assert "no event" in stderr_line(missing)


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (("--target", "bad+target"), "'+'"),
        (("--target", "a//b"), "empty level"),
        (("--starts-at", "yesterday"), "starts_at is not an ISO 8601 time"),
        (("--ends-at", "1"), "ends_at"),
        (("--data", "[1, 2]"), "--data must be a JSON object"),
        (("--data", "{oops"), "--data is not valid JSON"),
    ],
)
def test_events_put_invalid_input_rejected(
    config_factory: Callable[..., Path],
    moto_server: MotoServer,
    table_name: str,
    arguments: tuple[str, str],
    expected: str,
) -> None:
    config = config_factory()
    run_cli("table", "create", "--config", str(config))
    now = int(time.time())
    values = {
        "--target": "lobby",
        "--event-id": "e1",
        "--title": "Meeting",
        "--starts-at": str(now),
        "--ends-at": str(now + HOUR),
    }
    option, value = arguments
    values[option] = value
    flat = [part for pair in values.items() for part in pair]

    result = run_cli("events", "put", "--config", str(config), *flat)

    assert result.returncode == 2
    assert expected in stderr_line(result)
    assert "Traceback" not in result.stderr


async def test_events_list_marks_invalid_items(
    config_factory: Callable[..., Path], moto_server: MotoServer, table_name: str
) -> None:
    config = config_factory()
    run_cli("table", "create", "--config", str(config))
    now = time.time()
    await put_raw_items(
        moto_server.endpoint_url,
        table_name,
        [
            event_item("lobby", "good", now, now + HOUR),
            event_item("lobby", "bad", now, now - 1),
        ],
    )

    listing = run_cli("events", "list", "--config", str(config))

    lines = {
        line["event_id"]: line for line in map(json.loads, listing.stdout.splitlines())
    }
    assert listing.returncode == 0
    assert "invalid_reason" not in lines["good"]
    assert "not after starts_at" in lines["bad"]["invalid_reason"]


def test_sync_dry_run_prints_payloads(config_factory: Callable[..., Path]) -> None:
    config = config_factory()
    run_cli("table", "create", "--config", str(config))
    put_event(config, "lobby", "e1")
    put_event(config, "room-101", "e2")

    result = run_cli("sync", "--dry-run", "--config", str(config))

    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 0
    assert sorted(line["topic"] for line in lines) == [
        "events/lobby",
        "events/room-101",
    ]
    assert all(line["payload"]["version"] == 1 for line in lines)
    assert all("event" in json.loads(line) for line in result.stderr.splitlines())


@pytest.mark.skipif(
    shutil.which("mosquitto_sub") is None, reason="mosquitto_sub is not installed"
)
def test_sync_then_mosquitto_sub_prints_payload(
    config_factory: Callable[..., Path], broker: MosquittoBroker, pki: Pki
) -> None:
    config = config_factory()
    run_cli("table", "create", "--config", str(config))
    put_event(config, "lobby", "e1")

    result = run_cli("sync", "--config", str(config))
    subscriber = subprocess.run(
        [
            "mosquitto_sub",
            "-h", broker.host,
            "-p", str(broker.port),
            "--cafile", str(pki.ca_cert),
            "--cert", str(pki.client_cert),
            "--key", str(pki.client_key_pkcs1),
            "-t", "events/lobby",
            "-C", "1",
            "-W", "5",
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )  # fmt: skip

    assert result.returncode == 0
    assert subscriber.returncode == 0
    payload = json.loads(subscriber.stdout)
    assert payload["target"] == "lobby"
    assert [event["id"] for event in payload["events"]] == ["e1"]


def test_sync_exits_nonzero_when_broker_down(
    config_factory: Callable[..., Path], broker: MosquittoBroker
) -> None:
    config = config_factory(
        mqtt={
            "connect_timeout_seconds": 1,
            "reconnect_min_seconds": 0.2,
            "reconnect_max_seconds": 0.5,
        }
    )
    run_cli("table", "create", "--config", str(config))
    put_event(config, "lobby", "e1")
    broker.stop()

    result = run_cli("sync", "--config", str(config))

    failures = [
        json.loads(line)
        for line in result.stdout.splitlines()
        if '"sync_failed"' in line
    ]
    assert result.returncode == 1
    assert len(failures) == 1
    assert "not connected" in failures[0]["error"]


def test_config_error_missing_file(tmp_path: Path) -> None:
    result = run_cli("sync", "--config", str(tmp_path / "nope.toml"))

    assert result.returncode == 2
    assert "not found" in stderr_line(result)
    assert "nope.toml" in stderr_line(result)


@pytest.mark.parametrize(
    ("section", "values", "expected"),
    [
        ("sync", {"lookahead": "7x"}, "sync.lookahead"),
        ("sync", {"cron": "0 9 * * 8"}, "day of week"),
        ("sync", {"cron": "0 9 * * 1", "interval_seconds": 30}, "not both"),
        ("sync", {"timezone": "Mars/Olympus"}, "unknown time zone"),
        ("sync", {"on_empty": "drop"}, "sync.on_empty"),
        ("mqtt", {"topic_template": "events/+/{target}"}, "mqtt.topic_template"),
        ("mqtt", {"port": 0}, "mqtt.port"),
        ("mqtt", {"qos": 2}, "mqtt.qos"),
        ("mqtt", {"hots": "typo"}, "unknown setting"),
        ("log", {"format": "xml"}, "log.format"),
    ],
)
def test_config_error_names_setting(
    config_factory: Callable[..., Path],
    section: str,
    values: dict[str, Any],
    expected: str,
) -> None:
    config = config_factory(**{section: values})

    result = run_cli("sync", "--dry-run", "--config", str(config))

    assert result.returncode == 2
    assert expected in stderr_line(result)
    assert "Traceback" not in result.stderr


def test_config_error_from_environment(config_factory: Callable[..., Path]) -> None:
    config = config_factory()

    result = run_cli(
        "sync", "--config", str(config), env={"EVENTSYNC_MQTT__PORT": "eighty"}
    )

    assert result.returncode == 2
    assert "mqtt.port" in stderr_line(result)


def test_config_environment_overrides_file(
    config_factory: Callable[..., Path], tmp_path: Path
) -> None:
    config = config_factory()

    result = run_cli(
        "sync",
        "--dry-run",
        env={
            "EVENTSYNC_CONFIG": str(config),
            "EVENTSYNC_DYNAMODB__TABLE": "no_such_table",
        },
    )

    assert result.returncode == 1
    assert "no_such_table" in result.stderr


def test_config_error_invalid_toml(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[mqtt\nhost = 1\n")

    result = run_cli("sync", "--config", str(config))

    assert result.returncode == 2
    assert "not valid TOML" in stderr_line(result)


@pytest.mark.parametrize("setting", ["ca_file", "cert_file", "key_file"])
def test_config_error_missing_certificate(
    config_factory: Callable[..., Path], tmp_path: Path, setting: str
) -> None:
    config = config_factory(mqtt={setting: str(tmp_path / "missing.pem")})

    result = run_cli("sync", "--config", str(config))

    assert result.returncode == 2
    assert f"mqtt.{setting}" in stderr_line(result)
    assert "missing.pem" in stderr_line(result)


def test_config_error_key_not_matching(
    config_factory: Callable[..., Path], pki: Pki
) -> None:
    _, other_key = pki.issue_client("other")
    config = config_factory(mqtt={"key_file": str(other_key)})

    result = run_cli("sync", "--config", str(config))

    assert result.returncode == 2
    assert "cannot be loaded as a pair" in stderr_line(result)


def test_config_relative_paths_from_config_folder(
    config_factory: Callable[..., Path], pki: Pki, tmp_path: Path
) -> None:
    folder = tmp_path / "conf"
    (folder / "certificates").mkdir(parents=True)
    for source, name in (
        (pki.ca_cert, "ca.crt"),
        (pki.client_cert, "client.crt"),
        (pki.client_key_pkcs1, "client.key"),
    ):
        shutil.copy(source, folder / "certificates" / name)
    original = config_factory().read_text()
    text = original.replace(str(pki.ca_cert), "certificates/ca.crt")
    text = text.replace(str(pki.client_cert), "certificates/client.crt")
    text = text.replace(str(pki.client_key_pkcs1), "certificates/client.key")
    (folder / "config.toml").write_text(text)
    run_cli("table", "create", "--config", str(folder / "config.toml"))

    result = run_cli("sync", "--config", str(folder / "config.toml"))

    assert result.returncode == 0, result.stderr + result.stdout


def test_health_without_heartbeat_fails(
    config_factory: Callable[..., Path], tmp_path: Path
) -> None:
    config = config_factory(health={"heartbeat_file": str(tmp_path / "beat")})

    result = run_cli("health", "--config", str(config))

    assert result.returncode == 1
    assert "not found" in stderr_line(result)


def test_health_stale_heartbeat_fails(
    config_factory: Callable[..., Path], tmp_path: Path
) -> None:
    beat = tmp_path / "beat"
    beat.touch()
    old = time.time() - 1000
    os.utime(beat, (old, old))
    config = config_factory(health={"heartbeat_file": str(beat)})

    stale = run_cli("health", "--config", str(config), "--max-age", "500")
    fresh = run_cli("health", "--config", str(config), "--max-age", "5000")

    assert stale.returncode == 1
    assert "over the maximum of 500 s" in stderr_line(stale)
    assert fresh.returncode == 0


def test_scan_sees_cli_items(
    config_factory: Callable[..., Path], moto_server: MotoServer, table_name: str
) -> None:
    config = config_factory()
    run_cli("table", "create", "--config", str(config))
    put_event(config, "lobby", "e1", "--expires-at", "1900000000")

    items = asyncio.run(scan_raw_items(moto_server.endpoint_url, table_name))

    assert items[0]["expires_at"] == {"N": "1900000000"}
    assert items[0]["starts_at"]["N"].isdigit()
