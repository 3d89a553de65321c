"""Bad settings and bad input that should stop with one line and exit status 2.

The cases run the real command line against a real mosquitto and moto
server, and no case may print a traceback.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from eventsync.config import MqttSettings
from eventsync.tls import build_ssl_context
from tests.support.daemon import run_cli, write_config
from tests.support.dynamo import MotoServer
from tests.support.pki import Pki

EXIT_FAILED = 1
EXIT_CONFIG = 2
# `run` with a bad setting exits within a second or two. A daemon that does
# not exit would run for ever, so the test stops it after this long, with a
# margin for a loaded machine.
RUN_EXIT_TIMEOUT_SECONDS = 15


@pytest.fixture
def table_only_config(moto_server: MotoServer, table_name: str, tmp_path: Path) -> Path:
    """A configuration with a [dynamodb] section and no [mqtt] section."""
    return write_config(
        tmp_path / "operator.toml",
        {
            "dynamodb": {
                "table": table_name,
                "region": "us-east-1",
                "endpoint_url": moto_server.endpoint_url,
            }
        },
    )


def assert_one_line_config_error(
    result: subprocess.CompletedProcess[str], setting: str
) -> None:
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.returncode == EXIT_CONFIG, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    assert setting in lines[0]


def run_daemon_until_exit(config: Path) -> subprocess.CompletedProcess[str]:
    """Run `eventsync run`, which must exit by itself on a bad setting."""
    try:
        return run_cli(
            "run", "--config", str(config), timeout_seconds=RUN_EXIT_TIMEOUT_SECONDS
        )
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout.decode(errors="replace") if exc.stdout else ""
        pytest.fail(
            f"eventsync run still running after {RUN_EXIT_TIMEOUT_SECONDS} s; "
            f"output:\n{output[-2000:]}"
        )


def put_event_arguments(config: Path, *extra: str) -> list[str]:
    return [
        "events",
        "put",
        "--config",
        str(config),
        "--target",
        "lobby",
        "--event-id",
        "e1",
        "--title",
        "Meeting",
        "--starts-at",
        "2030-01-01T09:00:00Z",
        "--ends-at",
        "2030-01-01T10:00:00Z",
        *extra,
    ]


@pytest.mark.parametrize(
    ("section", "values", "setting"),
    [
        ("dynamodb", {"region": "us east 1"}, "dynamodb.region"),
        ("dynamodb", {"region": ""}, "dynamodb.region"),
        ("dynamodb", {"endpoint_url": "http://127.0.0.1:99999"}, "endpoint_url"),
        ("dynamodb", {"endpoint_url": "http://:80"}, "endpoint_url"),
        ("sync", {"timezone": "Europe"}, "sync.timezone"),
        ("sync", {"timezone": "a" * 300}, "sync.timezone"),
        ("sync", {"cron": "0 0 30 2 *"}, "sync.cron"),
        ("mqtt", {"max_publish_rate": 1e-300}, "mqtt.max_publish_rate"),
        ("mqtt", {"max_publish_rate": 0.001}, "mqtt.max_publish_rate"),
        ("mqtt", {"host": "   "}, "mqtt.host"),
        ("mqtt", {"port": True}, "mqtt.port"),
        ("mqtt", {"alpn": "a" * 256}, "mqtt.alpn"),
        ("dynamodb", {"consistent_read": "yes"}, "dynamodb.consistent_read"),
        ("mqtt", {"ca_file": ""}, "mqtt.ca_file"),
    ],
)
def test_run_bad_setting_exits_2(
    config_factory: Callable[..., Path],
    section: str,
    values: dict[str, Any],
    setting: str,
) -> None:
    config = config_factory(**{section: values})

    result = run_daemon_until_exit(config)

    assert_one_line_config_error(result, setting)


def test_run_region_from_aws_chain_invalid(
    config_factory: Callable[..., Path],
) -> None:
    config = config_factory(dynamodb={"region": None})

    result = run_cli(
        "run",
        "--config",
        str(config),
        env={"AWS_REGION": "us east 1", "AWS_DEFAULT_REGION": "us east 1"},
        timeout_seconds=RUN_EXIT_TIMEOUT_SECONDS,
    )

    assert_one_line_config_error(result, "dynamodb.region")
    assert "'us east 1'" in result.stderr


def test_table_create_aws_endpoint_variable_invalid(
    config_factory: Callable[..., Path],
) -> None:
    config = config_factory(dynamodb={"endpoint_url": None})

    result = run_cli(
        "table",
        "create",
        "--config",
        str(config),
        env={"AWS_ENDPOINT_URL": "http://:80"},
    )

    assert_one_line_config_error(result, "cannot create the DynamoDB client")


def test_sync_encrypted_key_exits_2(
    config_factory: Callable[..., Path], pki: Pki, tmp_path: Path
) -> None:
    key = serialization.load_pem_private_key(pki.client_key_pkcs1.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    encrypted.chmod(0o600)
    config = config_factory(mqtt={"key_file": encrypted})

    # Without a password callback OpenSSL prompts for a pass phrase on the
    # terminal. With no terminal and no stdin it then fails with a traceback.
    result = subprocess.run(
        [sys.executable, "-m", "eventsync", "sync", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        check=False,
    )

    assert_one_line_config_error(result, "mqtt.key_file")
    assert "is encrypted" in result.stderr
    assert "Enter PEM pass phrase" not in result.stderr + result.stdout


def test_sync_ca_file_not_pem_prints_message(
    config_factory: Callable[..., Path], tmp_path: Path
) -> None:
    not_pem = tmp_path / "ca.crt"
    not_pem.write_text("not a certificate\n")
    config = config_factory(mqtt={"ca_file": not_pem})

    result = run_cli("sync", "--config", str(config))

    assert_one_line_config_error(result, "mqtt.ca_file")
    assert result.stderr.startswith(
        f"eventsync: invalid setting mqtt.ca_file: CA file {str(not_pem)!r} "
        "holds no usable certificate: "
    )


def test_build_ssl_context_error_prints_message(pki: Pki, tmp_path: Path) -> None:
    """Test that the error reads as its message, as the publisher logs it."""
    not_pem = tmp_path / "ca.crt"
    not_pem.write_text("not a certificate\n")
    settings = MqttSettings(
        host="localhost",
        ca_file=not_pem,
        cert_file=pki.client_cert,
        key_file=pki.client_key_pkcs1,
    )

    with pytest.raises(ssl.SSLError) as raised:
        build_ssl_context(settings)

    assert str(raised.value).startswith(
        f"CA file {str(not_pem)!r} holds no usable certificate: "
    )


def test_sync_env_qos_override_accepted(config_factory: Callable[..., Path]) -> None:
    config = config_factory()
    created = run_cli("table", "create", "--config", str(config))

    result = run_cli(
        "sync", "--dry-run", "--config", str(config), env={"EVENTSYNC_MQTT__QOS": "0"}
    )

    assert created.returncode == 0, created.stderr
    assert result.returncode == 0, result.stderr


def test_sync_env_section_bad_json_exits_2(config_factory: Callable[..., Path]) -> None:
    config = config_factory()

    result = run_cli("sync", "--config", str(config), env={"EVENTSYNC_MQTT": "{bad"})

    assert_one_line_config_error(result, "EVENTSYNC_MQTT")
    assert "not valid JSON" in result.stderr


def test_sync_config_file_not_utf8_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_bytes(b"\xff\xfe[mqtt]\n")

    result = run_cli("sync", "--config", str(config))

    assert_one_line_config_error(result, str(config))
    assert "not UTF-8" in result.stderr


def test_health_empty_heartbeat_path_rejected(
    config_factory: Callable[..., Path],
) -> None:
    config = config_factory(health={"heartbeat_file": ""})

    result = run_cli("health", "--config", str(config))

    assert_one_line_config_error(result, "health.heartbeat_file")


def test_health_env_empty_heartbeat_path_rejected(
    config_factory: Callable[..., Path], tmp_path: Path
) -> None:
    config = config_factory(health={"heartbeat_file": tmp_path / "beat"})

    result = run_cli(
        "health",
        "--config",
        str(config),
        env={"EVENTSYNC_HEALTH__HEARTBEAT_FILE": ""},
    )

    assert_one_line_config_error(result, "health.heartbeat_file")


@pytest.mark.parametrize("max_age", ["nan", "inf", "0", "-5"])
def test_health_max_age_invalid_exits_2(
    config_factory: Callable[..., Path], tmp_path: Path, max_age: str
) -> None:
    beat = tmp_path / "beat"
    beat.touch()
    config = config_factory(health={"heartbeat_file": beat})

    result = run_cli("health", "--config", str(config), "--max-age", max_age)

    assert "Traceback" not in result.stderr
    assert result.returncode == EXIT_CONFIG
    assert "--max-age" in result.stderr
    assert "healthy" not in result.stdout


def test_events_put_deep_data_exits_2(config_factory: Callable[..., Path]) -> None:
    config = config_factory()
    deep = "[" * 3000 + "]" * 3000

    result = run_cli(*put_event_arguments(config, "--data", f'{{"a": {deep}}}'))

    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.returncode == EXIT_CONFIG
    assert "--data" in result.stderr


def test_table_create_without_mqtt_section(table_only_config: Path) -> None:
    result = run_cli("table", "create", "--config", str(table_only_config))

    assert result.returncode == 0, result.stderr


def test_events_delete_without_mqtt_section(table_only_config: Path) -> None:
    created = run_cli("table", "create", "--config", str(table_only_config))

    result = run_cli(
        "events",
        "delete",
        "--config",
        str(table_only_config),
        "--target",
        "lobby",
        "--event-id",
        "absent",
    )

    assert created.returncode == 0, created.stderr
    assert result.returncode == EXIT_FAILED, result.stderr
    assert "no event target='lobby' event_id='absent' found" in result.stderr


def test_health_without_mqtt_section(table_only_config: Path, tmp_path: Path) -> None:
    beat = tmp_path / "beat"
    beat.touch()

    result = run_cli(
        "health",
        "--config",
        str(table_only_config),
        env={"EVENTSYNC_HEALTH__HEARTBEAT_FILE": str(beat)},
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("healthy")


def test_events_put_list_without_mqtt_section(table_only_config: Path) -> None:
    created = run_cli("table", "create", "--config", str(table_only_config))

    put = run_cli(*put_event_arguments(table_only_config))
    listed = run_cli("events", "list", "--config", str(table_only_config))

    assert created.returncode == 0, created.stderr
    assert put.returncode == 0, put.stderr
    assert listed.returncode == 0, listed.stderr
    assert '"event_id": "e1"' in listed.stdout


def test_events_put_without_mqtt_checks_default_template(
    table_only_config: Path,
) -> None:
    # events/ and eight levels make 8 slashes, one past AWS IoT Core's limit of 7.
    arguments = put_event_arguments(table_only_config)
    arguments[arguments.index("lobby")] = "a/b/c/d/e/f/g/h"

    result = run_cli(*arguments)

    assert result.returncode == EXIT_CONFIG
    assert "topic 'events/a/b/c/d/e/f/g/h' has 8 '/'" in result.stderr


def test_sync_without_mqtt_section_names_keys(table_only_config: Path) -> None:
    result = run_cli("sync", "--config", str(table_only_config))

    assert_one_line_config_error(result, "mqtt.host")
    assert "EVENTSYNC_MQTT__HOST" in result.stderr
    assert "mqtt.key_file" in result.stderr


def test_misspelt_environment_variable_warns(
    table_only_config: Path, tmp_path: Path
) -> None:
    beat = tmp_path / "beat"
    beat.touch()

    result = run_cli(
        "health",
        "--config",
        str(table_only_config),
        env={
            "EVENTSYNC_HEALTH__HEARTBEAT_FILE": str(beat),
            "EVENTSYNC_DYNAMODB_ENDPOINT_URL": "http://127.0.0.1:9",
        },
    )

    warnings = [
        json.loads(line)
        for line in result.stdout.splitlines()
        if "unknown_environment_variable" in line
    ]
    assert result.returncode == 0, result.stderr
    assert len(warnings) == 1
    assert warnings[0]["variable"] == "EVENTSYNC_DYNAMODB_ENDPOINT_URL"
