"""Settings: validation, environment overrides, paths and durations."""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import InvalidRegionError
from botocore.utils import validate_region_name
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from eventsync.cli import main
from eventsync.config import (
    CRON_HORIZON_DAYS,
    DynamoDBSettings,
    load_core_settings,
    load_settings,
    parse_duration,
    unknown_environment_variables,
)
from eventsync.errors import ConfigError
from eventsync.schedule import first_fire_day, parse_crontab
from tests.support.daemon import write_config

MQTT = {
    "host": "broker.example",
    "ca_file": "certificates/ca.crt",
    "cert_file": "certificates/client.crt",
    "key_file": "certificates/client.key",
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Remove EVENTSYNC_* variables and work in an empty folder."""
    for name in [name for name in os.environ if name.startswith("EVENTSYNC_")]:
        monkeypatch.delenv(name)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)


def write(folder: Path, **sections: dict[str, Any]) -> Path:
    """Write config.toml in `folder` with the [mqtt] essentials and `sections`."""
    folder.mkdir(parents=True, exist_ok=True)
    content: dict[str, dict[str, Any]] = {"mqtt": dict(MQTT)}
    for section, values in sections.items():
        content.setdefault(section, {}).update(values)
    return write_config(folder / "config.toml", content)


def config_error(path: Path | None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(None if path is None else str(path))
    return str(caught.value)


def test_load_settings_defaults(tmp_path: Path) -> None:
    settings = load_settings(str(write(tmp_path)))

    assert settings.dynamodb.table == "active_events"
    assert settings.mqtt.port == 8883
    assert settings.mqtt.topic_template == "events/{target}"
    assert settings.sync.period_seconds == 60
    assert settings.sync.lookahead == 7 * 86400
    assert settings.sync.grace == 0
    assert settings.sync.shutdown_timeout == 20
    assert settings.log.format == "json"


REJECTED_SETTINGS: list[tuple[str, dict[str, Any], str, str]] = [
    ("dynamodb", {"table": "x"}, "dynamodb.table", "should match pattern"),
    ("dynamodb", {"table": "bad table"}, "dynamodb.table", "'bad table'"),
    (
        "dynamodb",
        {"endpoint_url": "localhost:4566"},
        "dynamodb.endpoint_url",
        "must be an http:// or https:// URL",
    ),
    ("dynamodb", {"max_attempts": 0}, "dynamodb.max_attempts", "greater than"),
    ("dynamodb", {"max_attempts": 21}, "dynamodb.max_attempts", "less than"),
    (
        "dynamodb",
        {"consistent_read": "sometimes"},
        "dynamodb.consistent_read",
        "valid boolean",
    ),
    (
        "dynamodb",
        {"read_timeout_seconds": 0},
        "dynamodb.read_timeout_seconds",
        "greater than 0",
    ),
    ("mqtt", {"host": ""}, "mqtt.host", "at least 1 character"),
    ("mqtt", {"port": 65536}, "mqtt.port", "less than or equal to 65535"),
    ("mqtt", {"port": "eighty"}, "mqtt.port", "valid integer"),
    ("mqtt", {"client_id": "a b"}, "mqtt.client_id", "must not contain whitespace"),
    ("mqtt", {"client_id": "c" * 129}, "mqtt.client_id", "at most 128"),
    ("mqtt", {"client_id": "a+"}, "mqtt.client_id", "'+'"),
    ("mqtt", {"keepalive": 4}, "mqtt.keepalive", "greater than or equal to 5"),
    (
        "mqtt",
        {"max_payload_bytes": 511},
        "mqtt.max_payload_bytes",
        "greater than or equal to 512",
    ),
    ("mqtt", {"max_publish_rate": -1}, "mqtt.max_publish_rate", "greater than"),
    ("mqtt", {"max_in_flight": 0}, "mqtt.max_in_flight", "greater than"),
    (
        "mqtt",
        {"publish_timeout_seconds": 301},
        "mqtt.publish_timeout_seconds",
        "less than",
    ),
    (
        "mqtt",
        {"reconnect_min_seconds": 10, "reconnect_max_seconds": 5},
        "mqtt",
        "reconnect_max_seconds (5.0) is below reconnect_min_seconds (10.0)",
    ),
    (
        "mqtt",
        {"topic_template": "events/{target}/"},
        "mqtt.topic_template",
        "must not have an empty topic level",
    ),
    (
        "mqtt",
        {"topic_template": "events"},
        "mqtt.topic_template",
        "must contain {target} exactly once",
    ),
    ("mqtt", {"ca_file": None}, "mqtt.ca_file", "missing"),
    ("mqtt", {"host": None}, "mqtt.host", "missing: set it in"),
    ("sync", {"interval_seconds": 0.5}, "sync.interval_seconds", "greater than"),
    ("sync", {"interval_seconds": 86401}, "sync.interval_seconds", "less than"),
    ("sync", {"cron": "0 9 * *"}, "sync.cron", "expected 5 fields"),
    ("sync", {"grace": "-5s"}, "sync.grace", "invalid duration '-5s'"),
    ("sync", {"lookahead": "1h 30m"}, "sync.lookahead", "invalid duration"),
    ("sync", {"lookahead": "3650d"}, "sync.lookahead", "under 10 years"),
    ("sync", {"lookahead": True}, "sync.lookahead", "invalid duration True"),
    ("sync", {"shutdown_timeout": ""}, "sync.shutdown_timeout", "invalid duration"),
    (
        "sync",
        {"max_events_per_topic": 0},
        "sync.max_events_per_topic",
        "greater than",
    ),
    ("sync", {"timezone": "Europe/Atlantis"}, "sync.timezone", "unknown time zone"),
    ("sync", {"timezone": "../../etc/passwd"}, "sync.timezone", "unknown time zone"),
    ("sync", {"timezone": "Europe"}, "sync.timezone", "unknown time zone"),
    ("sync", {"on_empty": "delete"}, "sync.on_empty", "'empty' or 'clear'"),
    ("log", {"level": "verbose"}, "log.level", "'debug', 'info', 'warning'"),
    ("health", {"heartbeat": "/tmp/beat"}, "health.heartbeat", "unknown setting"),
    ("metrics", {"port": 9100}, "metrics", "unknown setting"),
    # Region names as botocore accepts them, and no empty one.
    ("dynamodb", {"region": "us east 1"}, "dynamodb.region", "AWS region name"),
    ("dynamodb", {"region": "-eu-west-1"}, "dynamodb.region", "AWS region name"),
    ("dynamodb", {"region": "123"}, "dynamodb.region", "AWS region name"),
    ("dynamodb", {"region": "a" * 64}, "dynamodb.region", "AWS region name"),
    ("dynamodb", {"region": "eu-west-1\n"}, "dynamodb.region", "AWS region name"),
    ("dynamodb", {"region": ""}, "dynamodb.region", "must not be empty"),
    # Endpoints that botocore rejects only at client creation or first request.
    (
        "dynamodb",
        {"endpoint_url": "http://127.0.0.1:99999"},
        "dynamodb.endpoint_url",
        "has an invalid port",
    ),
    (
        "dynamodb",
        {"endpoint_url": "http://127.0.0.1:0"},
        "dynamodb.endpoint_url",
        "has an invalid port",
    ),
    (
        "dynamodb",
        {"endpoint_url": "http://localhost:http"},
        "dynamodb.endpoint_url",
        "has an invalid port",
    ),
    ("dynamodb", {"endpoint_url": "http://:80"}, "dynamodb.endpoint_url", "no host"),
    (
        "dynamodb",
        {"endpoint_url": "http://under_score:4566"},
        "dynamodb.endpoint_url",
        "invalid host name 'under_score'",
    ),
    (
        "dynamodb",
        {"endpoint_url": "http://user:secret@localhost:4566"},
        "dynamodb.endpoint_url",
        "must not contain a user name or password",
    ),
    (
        "dynamodb",
        {"endpoint_url": "ftp://localhost"},
        "dynamodb.endpoint_url",
        "must be an http:// or https:// URL",
    ),
    (
        "dynamodb",
        {"endpoint_url": "http://local host:4566"},
        "dynamodb.endpoint_url",
        "must not contain spaces",
    ),
    # TOML values are typed, so the wrong type is an error, not a conversion.
    ("dynamodb", {"consistent_read": "yes"}, "dynamodb.consistent_read", "boolean"),
    ("dynamodb", {"consistent_read": 1}, "dynamodb.consistent_read", "boolean"),
    ("dynamodb", {"max_attempts": True}, "dynamodb.max_attempts", "valid integer"),
    (
        "dynamodb",
        {"connect_timeout_seconds": True},
        "dynamodb.connect_timeout_seconds",
        "valid number",
    ),
    ("mqtt", {"port": True}, "mqtt.port", "valid integer (got True)"),
    ("mqtt", {"port": "8883"}, "mqtt.port", "valid integer"),
    ("mqtt", {"port": 8883.0}, "mqtt.port", "valid integer"),
    ("mqtt", {"qos": True}, "mqtt.qos", "must be 0 or 1, got True"),
    ("mqtt", {"qos": 1.0}, "mqtt.qos", "must be 0 or 1, got 1.0"),
    ("mqtt", {"qos": "1"}, "mqtt.qos", "0 or 1"),
    ("mqtt", {"max_publish_rate": True}, "mqtt.max_publish_rate", "valid number"),
    (
        "mqtt",
        {"republish_after_reconnect": "true"},
        "mqtt.republish_after_reconnect",
        "valid boolean",
    ),
    ("sync", {"interval_seconds": True}, "sync.interval_seconds", "valid number"),
    (
        "sync",
        {"max_events_per_topic": "100"},
        "sync.max_events_per_topic",
        "valid integer",
    ),
    ("mqtt", {"host": "   "}, "mqtt.host", "without spaces"),
    ("mqtt", {"host": "broker .example"}, "mqtt.host", "without spaces"),
    (
        "mqtt",
        {"max_publish_rate": 0.001},
        "mqtt.max_publish_rate",
        "at least 1 publish per second",
    ),
    (
        "mqtt",
        {"max_publish_rate": 1e-300},
        "mqtt.max_publish_rate",
        "at least 1 publish per second",
    ),
    ("mqtt", {"alpn": "a" * 256}, "mqtt.alpn", "1 to 255 characters"),
    ("mqtt", {"alpn": "mqtt-\u00e9"}, "mqtt.alpn", "must be ASCII"),
    # An empty path would resolve to the configuration file's folder.
    ("mqtt", {"ca_file": ""}, "mqtt.ca_file", "must be a file path"),
    ("mqtt", {"key_file": "  "}, "mqtt.key_file", "must be a file path"),
    ("mqtt", {"cert_file": 5}, "mqtt.cert_file", "must be a file path, got 5"),
    ("health", {"heartbeat_file": ""}, "health.heartbeat_file", "must be a file path"),
    ("sync", {"cron": "0 0 30 2 *"}, "sync.cron", "'0 0 30 2 *' never fires"),
    ("sync", {"cron": "0 0 31 4,6,9,11 *"}, "sync.cron", "never fires"),
    # A day-of-week field that starts with * does not widen the day-of-month.
    ("sync", {"cron": "0 0 30 2 */2"}, "sync.cron", "never fires"),
]


@pytest.mark.parametrize(
    ("section", "values", "setting", "reason"),
    REJECTED_SETTINGS,
    ids=[f"{section} {values}" for section, values, _, _ in REJECTED_SETTINGS],
)
def test_load_settings_rejects_setting(
    tmp_path: Path, section: str, values: dict[str, Any], setting: str, reason: str
) -> None:
    """Test that one bad value gives one ConfigError line naming its setting."""
    path = write(tmp_path, **{section: values})

    message = config_error(path)

    assert message.startswith(f"invalid setting {setting}: ")
    assert reason in message
    assert "\n" not in message


ACCEPTED_SETTINGS: list[tuple[str, dict[str, Any]]] = [
    ("dynamodb", {"region": "eu-west-1"}),
    ("dynamodb", {"region": "local"}),
    ("dynamodb", {"endpoint_url": "http://[::1]:4566"}),
    ("dynamodb", {"endpoint_url": "http://localstack:4566/"}),
    ("dynamodb", {"endpoint_url": "https://dynamodb.eu-west-1.amazonaws.com"}),
    ("dynamodb", {"consistent_read": True}),
    ("mqtt", {"max_publish_rate": 0}),
    ("mqtt", {"max_publish_rate": 1}),
    ("mqtt", {"alpn": ""}),
    ("mqtt", {"alpn": "a" * 255}),
    ("mqtt", {"qos": 0}),
    ("sync", {"interval_seconds": 30}),
    # Feb 29 comes within any 5 years this century.
    ("sync", {"cron": "0 0 29 2 *"}),
    # Both day fields restricted: Mondays fire although Feb 30 never comes.
    ("sync", {"cron": "0 0 30 2 1"}),
]


@pytest.mark.parametrize(
    ("section", "values"),
    ACCEPTED_SETTINGS,
    ids=[f"{section} {values}" for section, values in ACCEPTED_SETTINGS],
)
def test_load_settings_accepts_setting(
    tmp_path: Path, section: str, values: dict[str, Any]
) -> None:
    path = write(tmp_path, **{section: values})

    loaded = getattr(load_settings(str(path)), section)

    for key, value in values.items():
        assert getattr(loaded, key) == value


def test_load_settings_lists_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path, mqtt={"port": 0}, sync={"grace": "soon"})

    lines = config_error(path).splitlines()

    assert len(lines) == 2
    assert lines[0].startswith("invalid setting mqtt.port: ")
    assert lines[1].startswith("invalid setting sync.grace: ")


def test_load_settings_missing_mqtt_section(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[sync]\ninterval_seconds = 30\n")

    message = config_error(path)

    assert message == (
        "invalid setting mqtt: missing section: set mqtt.host, mqtt.ca_file, "
        f"mqtt.cert_file, mqtt.key_file in [mqtt] of {path}, or as "
        "EVENTSYNC_MQTT__HOST, EVENTSYNC_MQTT__CA_FILE, EVENTSYNC_MQTT__CERT_FILE, "
        "EVENTSYNC_MQTT__KEY_FILE"
    )


def test_load_core_settings_without_mqtt_section(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[dynamodb]\ntable = "operator_events"\n')

    settings = load_core_settings(str(path))

    assert settings.mqtt is None
    assert settings.dynamodb.table == "operator_events"


def test_load_core_settings_checks_mqtt_section(tmp_path: Path) -> None:
    path = write(tmp_path, mqtt={"port": 0})

    with pytest.raises(ConfigError) as caught:
        load_core_settings(str(path))

    assert str(caught.value).startswith("invalid setting mqtt.port: ")


def test_load_settings_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b'[mqtt]\nhost = "caf\xe9"\n')

    message = config_error(path)

    assert message == (
        f"configuration file {str(path)!r} is not UTF-8 text: byte 18 cannot be decoded"
    )


def test_load_settings_file_not_found(tmp_path: Path) -> None:
    message = config_error(tmp_path / "absent.toml")

    assert "absent.toml" in message
    assert "not found: pass --config PATH or set EVENTSYNC_CONFIG" in message


def test_load_settings_file_is_folder(tmp_path: Path) -> None:
    message = config_error(tmp_path)

    assert "cannot be read" in message
    assert str(tmp_path) in message


def test_load_settings_environment_config_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVENTSYNC_CONFIG", str(tmp_path / "absent.toml"))

    message = config_error(None)

    assert "absent.toml" in message
    assert "not found" in message


def test_load_settings_default_file_may_be_absent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in MQTT.items():
        monkeypatch.setenv(f"EVENTSYNC_MQTT__{name.upper()}", value)

    settings = load_settings()

    assert settings.mqtt.host == "broker.example"
    assert settings.mqtt.ca_file == Path.cwd() / "certificates/ca.crt"


def test_load_settings_reads_default_file(tmp_path: Path) -> None:
    write(Path.cwd(), mqtt={"host": "default.example"})

    settings = load_settings()

    assert settings.mqtt.host == "default.example"


def test_load_settings_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, mqtt={"port": 8883}, sync={"grace": "1m"})
    monkeypatch.setenv("EVENTSYNC_MQTT__PORT", "443")
    monkeypatch.setenv("EVENTSYNC_SYNC__GRACE", "2h")
    monkeypatch.setenv("EVENTSYNC_LOG__LEVEL", "DEBUG")

    settings = load_settings(str(path))

    assert settings.mqtt.port == 443
    assert settings.sync.grace == 7200
    assert settings.log.level == "debug"


def test_load_settings_environment_keeps_other_file_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, mqtt={"client_id": "from-file", "keepalive": 30})
    monkeypatch.setenv("EVENTSYNC_MQTT__HOST", "env.example")

    settings = load_settings(str(path))

    assert settings.mqtt.host == "env.example"
    assert settings.mqtt.client_id == "from-file"
    assert settings.mqtt.keepalive == 30


def test_load_settings_environment_error_names_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path)
    monkeypatch.setenv("EVENTSYNC_SYNC__LOOKAHEAD", "7 days")

    message = config_error(path)

    assert message.startswith("invalid setting sync.lookahead: invalid duration")


def test_load_settings_environment_text_converted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that environment text becomes the number or boolean a setting takes."""
    path = write(tmp_path)
    monkeypatch.setenv("EVENTSYNC_MQTT__QOS", "0")
    monkeypatch.setenv("EVENTSYNC_MQTT__PORT", "8884")
    monkeypatch.setenv("EVENTSYNC_MQTT__MAX_PUBLISH_RATE", "2.5")
    monkeypatch.setenv("EVENTSYNC_DYNAMODB__CONSISTENT_READ", "true")
    monkeypatch.setenv("EVENTSYNC_SYNC__INTERVAL_SECONDS", "30")

    settings = load_settings(str(path))

    assert settings.mqtt.qos == 0
    assert type(settings.mqtt.qos) is int
    assert settings.mqtt.port == 8884
    assert settings.mqtt.max_publish_rate == 2.5
    assert settings.dynamodb.consistent_read is True
    assert settings.sync.interval_seconds == 30


@pytest.mark.parametrize(
    ("variable", "value", "setting", "reason"),
    [
        ("EVENTSYNC_MQTT__QOS", "2", "mqtt.qos", "0 or 1"),
        ("EVENTSYNC_MQTT__PORT", "8883.5", "mqtt.port", "valid integer"),
        ("EVENTSYNC_DYNAMODB__CONSISTENT_READ", "sometimes", "dynamodb", "boolean"),
        (
            "EVENTSYNC_MQTT__MAX_PUBLISH_RATE",
            "0.5",
            "mqtt.max_publish_rate",
            "at least 1",
        ),
        ("EVENTSYNC_MQTT__HOST", " ", "mqtt.host", "without spaces"),
        ("EVENTSYNC_MQTT__CA_FILE", "", "mqtt.ca_file", "must be a file path"),
        ("EVENTSYNC_HEALTH__HEARTBEAT_FILE", "", "health.heartbeat_file", "file path"),
        ("EVENTSYNC_DYNAMODB__REGION", "", "dynamodb.region", "must not be empty"),
        ("EVENTSYNC_MQTT", '{"port": true}', "mqtt.port", "valid integer"),
    ],
)
def test_load_settings_environment_rejects_value(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    setting: str,
    reason: str,
) -> None:
    path = write(tmp_path)
    monkeypatch.setenv(variable, value)

    message = config_error(path)

    assert message.startswith(f"invalid setting {setting}")
    assert reason in message
    assert "\n" not in message


def test_load_settings_environment_section_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, mqtt={"client_id": "from-file"})
    monkeypatch.setenv("EVENTSYNC_MQTT", '{"port": 8884, "qos": 0}')

    settings = load_settings(str(path))

    assert settings.mqtt.port == 8884
    assert settings.mqtt.qos == 0
    assert settings.mqtt.client_id == "from-file"


def test_load_settings_environment_section_bad_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path)
    monkeypatch.setenv("EVENTSYNC_MQTT", "{bad")

    message = config_error(path)

    assert message.startswith("invalid setting mqtt: EVENTSYNC_MQTT is not valid JSON")
    assert "\n" not in message


def test_load_settings_environment_unknown_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path)
    monkeypatch.setenv("EVENTSYNC_MQTT__HOTS", "typo.example")

    message = config_error(path)

    assert message == (
        "invalid setting mqtt.hots: unknown setting (check its spelling and section)"
    )


def test_load_settings_resolves_relative_paths(tmp_path: Path) -> None:
    folder = tmp_path / "conf"
    path = write(folder, health={"heartbeat_file": "state/heartbeat"})

    settings = load_settings(str(path))

    assert settings.mqtt.ca_file == folder / "certificates/ca.crt"
    assert settings.mqtt.cert_file == folder / "certificates/client.crt"
    assert settings.mqtt.key_file == folder / "certificates/client.key"
    assert settings.health.heartbeat_file == folder / "state/heartbeat"


def test_load_settings_resolves_relative_config_path(tmp_path: Path) -> None:
    write(Path.cwd() / "conf")

    settings = load_settings("conf/config.toml")

    assert settings.mqtt.ca_file == Path.cwd() / "conf/certificates/ca.crt"
    assert settings.mqtt.ca_file.is_absolute()


def test_load_settings_resolves_environment_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "conf"
    path = write(folder)
    monkeypatch.setenv("EVENTSYNC_MQTT__KEY_FILE", "secrets/client.key")

    settings = load_settings(str(path))

    assert settings.mqtt.key_file == folder / "secrets/client.key"


def test_load_settings_keeps_absolute_paths(tmp_path: Path) -> None:
    absolute = tmp_path / "elsewhere" / "ca.crt"
    path = write(tmp_path / "conf", mqtt={"ca_file": str(absolute)})

    settings = load_settings(str(path))

    assert settings.mqtt.ca_file == absolute


def test_load_settings_expands_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write(tmp_path / "conf", mqtt={"ca_file": "~/ca.crt"})

    settings = load_settings(str(path))

    assert settings.mqtt.ca_file == tmp_path / "home" / "ca.crt"


def test_load_settings_interval_and_cron_exclusive(tmp_path: Path) -> None:
    path = write(tmp_path, sync={"interval_seconds": 30, "cron": "*/5 * * * *"})

    message = config_error(path)

    assert (
        message == "invalid setting sync: set either interval_seconds or cron, not both"
    )


def test_load_settings_environment_cron_clashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, sync={"interval_seconds": 30})
    monkeypatch.setenv("EVENTSYNC_SYNC__CRON", "0 9 * * 1")

    message = config_error(path)

    assert "not both" in message


def test_load_settings_cron_alone(tmp_path: Path) -> None:
    path = write(tmp_path, sync={"cron": "0 9 * * 1-5"})

    settings = load_settings(str(path))

    assert settings.sync.cron == "0 9 * * 1-5"
    assert settings.sync.period_seconds is None


def test_load_settings_interval_alone(tmp_path: Path) -> None:
    path = write(tmp_path, sync={"interval_seconds": 15})

    settings = load_settings(str(path))

    assert settings.sync.period_seconds == 15


def test_load_settings_durations(tmp_path: Path) -> None:
    path = write(
        tmp_path, sync={"lookahead": "7d", "grace": "1h30m", "shutdown_timeout": 25}
    )

    settings = load_settings(str(path))

    assert settings.sync.lookahead == 7 * 86400
    assert settings.sync.grace == 5400
    assert settings.sync.shutdown_timeout == 25


@settings(max_examples=300, deadline=None)
@given(region=st.text(alphabet="abz09- _.\n", max_size=70))
def test_region_check_agrees_with_botocore(region: str) -> None:
    """Test that dynamodb.region takes what botocore takes, except "" and a final newline."""
    try:
        validate_region_name(region)
        botocore_accepts = region != "" and not region.endswith("\n")
    except InvalidRegionError:
        botocore_accepts = False

    try:
        DynamoDBSettings(region=region)
        accepted = True
    except ValidationError:
        accepted = False

    assert accepted == botocore_accepts


def test_first_fire_day_finds_leap_day() -> None:
    spec = parse_crontab("0 0 29 2 *")

    day = first_fire_day(spec, date(2025, 3, 1), CRON_HORIZON_DAYS)

    assert day == date(2028, 2, 29)


def test_first_fire_day_never_fires() -> None:
    spec = parse_crontab("0 0 30 2 *")

    day = first_fire_day(spec, date(2025, 3, 1), CRON_HORIZON_DAYS)

    assert day is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("15m", 900),
        ("1h30m", 5400),
        ("7d", 604_800),
        ("2w", 1_209_600),
        ("1w2d3h4m5s", 604_800 + 2 * 86400 + 3 * 3600 + 4 * 60 + 5),
        ("1.5h", 5400),
        (" 10M ", 600),
        ("45", 45),
        ("0", 0),
        ("0s", 0),
        (30, 30),
        (2.5, 2.5),
        ("3649d", 3649 * 86400),
    ],
)
def test_parse_duration_reads(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "value",
    [
        "",
        "s",
        "7x",
        "-1s",
        "1h 30m",
        "h1",
        "1.h",
        "7 days",
        -1,
        True,
        None,
        [1],
        float("nan"),
        float("inf"),
        "3650d",
        10 * 365 * 86400,
    ],
)
def test_parse_duration_rejects(value: Any) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(value)


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(
        st.tuples(st.integers(0, 500), st.sampled_from("smhdw")), min_size=1, max_size=5
    )
)
def test_parse_duration_sums_parts(parts: list[tuple[int, str]]) -> None:
    unit_seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604_800}
    text = "".join(f"{number}{unit}" for number, unit in parts)
    expected = sum(number * unit_seconds[unit] for number, unit in parts)

    if expected < 10 * 365 * 86400:
        assert parse_duration(text) == expected
    else:
        with pytest.raises(ValueError, match="under 10 years"):
            parse_duration(text)


@pytest.mark.parametrize(
    ("section", "values", "setting"),
    [
        ("sync", {"timezone": "Europe"}, "sync.timezone"),
        ("dynamodb", {"max_attempts": "many"}, "dynamodb.max_attempts"),
        ("mqtt", {"alpn": 443}, "mqtt.alpn"),
    ],
)
def test_cli_config_error_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    section: str,
    values: dict[str, Any],
    setting: str,
) -> None:
    """Test that the command line exits 2 with one stderr line naming the setting."""
    path = write(tmp_path, **{section: values})

    status = main(["sync", "--dry-run", "--config", str(path)])
    captured = capsys.readouterr()

    assert status == 2
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(f"eventsync: invalid setting {setting}: ")
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_unknown_environment_variables_found() -> None:
    environment = {
        "EVENTSYNC_CONFIG": "config.toml",
        "EVENTSYNC_MQTT__HOST": "broker",
        "EVENTSYNC_SYNC": "{}",
        "EVENTSYNC_DYNAMODB_ENDPOINT_URL": "http://127.0.0.1:9",
        "EVENTSYNC_SYNCS__INTERVAL_SECONDS": "5",
        "EVENTSYNC_MQTT__HOTS": "broker",
        "PATH": "/usr/bin",
    }

    unknown = unknown_environment_variables(environment)

    assert unknown == [
        "EVENTSYNC_DYNAMODB_ENDPOINT_URL",
        "EVENTSYNC_MQTT__HOTS",
        "EVENTSYNC_SYNCS__INTERVAL_SECONDS",
    ]
