"""Settings: `config.toml` overridden by `EVENTSYNC_<SECTION>__<KEY>` variables."""

from __future__ import annotations

import os
import re
import ssl
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from eventsync.errors import ConfigError
from eventsync.topics import TopicTemplate

CONFIG_ENV_VAR = "EVENTSYNC_CONFIG"
DEFAULT_CONFIG_PATH = Path("config.toml")
# AWS IoT Core limits a message payload to 128 KiB.
AWS_IOT_MAX_PAYLOAD_BYTES = 131_072
# ALPN protocol that AWS IoT Core expects for MQTT with client certificates on 443.
AWS_IOT_ALPN = "x-amzn-mqtt-ca"

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: Any) -> float:
    """Read a duration as seconds: a number, or text such as `90s`, `15m`, `1h30m`, `7d`."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if re.fullmatch(r"[0-9]+(\.[0-9]+)?", text):
            seconds = float(text)
        elif text and re.fullmatch(rf"(?:{_DURATION_PART.pattern})+", text):
            seconds = sum(
                float(number) * _UNIT_SECONDS[unit]
                for number, unit in _DURATION_PART.findall(text)
            )
        else:
            raise ValueError(
                f"invalid duration {value!r}: use seconds, or a number with a unit "
                "s, m, h, d or w, such as '90s', '15m', '1h30m' or '7d'"
            )
    else:
        raise ValueError(f"invalid duration {value!r}")
    if not 0 <= seconds < 10 * 365 * 86400:
        raise ValueError(
            f"invalid duration {value!r}: must be 0 or more and under 10 years"
        )
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DynamoDBSettings(_Section):
    table: str = Field(default="active_events", pattern=r"^[A-Za-z0-9_.\-]{3,255}$")
    # None takes the region from the AWS chain (AWS_REGION, AWS_DEFAULT_REGION).
    region: str | None = None
    # An HTTP endpoint such as LocalStack's; None means the AWS endpoint of the region.
    endpoint_url: str | None = None
    consistent_read: bool = False
    # Attempts per request, first one included, in botocore's "standard" retry mode.
    max_attempts: int = Field(default=5, ge=1, le=20)
    connect_timeout_seconds: float = Field(default=5, gt=0, le=300)
    read_timeout_seconds: float = Field(default=10, gt=0, le=300)

    @field_validator("endpoint_url")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value


class MqttSettings(_Section):
    host: str = Field(min_length=1)
    port: int = Field(default=8883, ge=1, le=65535)
    client_id: str = Field(default="eventsync", min_length=1, max_length=128)
    ca_file: Path
    cert_file: Path
    key_file: Path
    topic_template: str = "events/{target}"
    # AWS IoT Core supports QoS 0 and 1. With QoS 0 there is no PUBACK, so a
    # message counts as delivered once it is written to the socket.
    qos: Literal[0, 1] = 1
    keepalive: int = Field(default=60, ge=5, le=1200)
    max_payload_bytes: int = Field(
        default=AWS_IOT_MAX_PAYLOAD_BYTES, ge=512, le=268_435_455
    )
    # AWS IoT Core accepts 100 publishes per second per connection and silently
    # drops the excess. 0 turns the limit off.
    max_publish_rate: float = Field(default=80, ge=0, le=100_000, allow_inf_nan=False)
    max_in_flight: int = Field(default=20, ge=1, le=1000)
    publish_timeout_seconds: float = Field(default=10, gt=0, le=300)
    connect_timeout_seconds: float = Field(default=10, gt=0, le=300)
    reconnect_min_seconds: float = Field(default=1, gt=0, le=3600)
    reconnect_max_seconds: float = Field(default=60, gt=0, le=3600)
    # None picks x-amzn-mqtt-ca on port 443 and no ALPN on other ports.
    alpn: str | None = None
    # AWS IoT Core keeps retained messages across reconnects. A broker that may
    # lose them (mosquitto without persistence, restarted) needs every topic
    # published again after a reconnect.
    republish_after_reconnect: bool = False
    # For development brokers whose certificate names another host. The chain
    # is still verified; only the host name check is off, and every start logs
    # a warning while it is.
    insecure_skip_hostname_verification: bool = False

    @field_validator("topic_template")
    @classmethod
    def _check_template(cls, value: str) -> str:
        TopicTemplate.parse(value)
        return value

    @field_validator("client_id")
    @classmethod
    def _check_client_id(cls, value: str) -> str:
        if any(character.isspace() or character in "+#\x00" for character in value):
            raise ValueError(
                f"must not contain whitespace, '+', '#' or NUL, got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _check_backoff(self) -> MqttSettings:
        if self.reconnect_max_seconds < self.reconnect_min_seconds:
            raise ValueError(
                f"reconnect_max_seconds ({self.reconnect_max_seconds}) is below "
                f"reconnect_min_seconds ({self.reconnect_min_seconds})"
            )
        return self

    @property
    def template(self) -> TopicTemplate:
        return TopicTemplate.parse(self.topic_template)

    @property
    def effective_alpn(self) -> str | None:
        if self.alpn is not None:
            return self.alpn or None
        return AWS_IOT_ALPN if self.port == 443 else None


class SyncSettings(_Section):
    # One of interval_seconds and cron; with neither, the interval is 60 seconds.
    interval_seconds: float | None = Field(default=None, ge=1, le=86400)
    cron: str | None = None
    lookahead: Duration = 7 * 86400
    grace: Duration = 0
    max_events_per_topic: int = Field(default=100, ge=1, le=10_000)
    timezone: str = "UTC"
    # What a target that vanished from the table gets: a payload with no events,
    # or a zero-byte retained message that deletes the retained message.
    on_empty: Literal["empty", "clear"] = "empty"
    # ECS stops a task with SIGKILL 30 seconds after SIGTERM by default.
    shutdown_timeout: Duration = 20

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise ValueError(
                f"unknown time zone {value!r}: use an IANA name such as 'Europe/Berlin'"
            ) from None
        return value

    @field_validator("cron")
    @classmethod
    def _check_cron(cls, value: str | None) -> str | None:
        if value is not None:
            from eventsync.schedule import parse_crontab

            parse_crontab(value)
        return value

    @model_validator(mode="after")
    def _check_schedule(self) -> SyncSettings:
        if self.interval_seconds is not None and self.cron is not None:
            raise ValueError("set either interval_seconds or cron, not both")
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def period_seconds(self) -> float | None:
        """Seconds between syncs, or None when a cron expression schedules them."""
        if self.cron is not None:
            return None
        return self.interval_seconds if self.interval_seconds is not None else 60.0


class HealthSettings(_Section):
    # A file whose modification time the daemon sets after each completed sync.
    heartbeat_file: Path | None = None


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"

    @field_validator("level", "format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


_toml_data: ContextVar[dict[str, Any]] = ContextVar("_toml_data")


class _TomlSource(PydanticBaseSettingsSource):
    """Settings from the TOML file that `load_settings` read."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return _toml_data.get({}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return _toml_data.get({})


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="EVENTSYNC_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    dynamodb: DynamoDBSettings = DynamoDBSettings()
    mqtt: MqttSettings
    sync: SyncSettings = SyncSettings()
    health: HealthSettings = HealthSettings()
    log: LogSettings = LogSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Earlier sources win: environment variables override the file.
        return (init_settings, env_settings, _TomlSource(settings_cls))


def config_path(explicit: str | None) -> tuple[Path, bool]:
    """Return the configuration file to read and whether it must exist."""
    if explicit:
        return Path(explicit), True
    from_env = os.environ.get(CONFIG_ENV_VAR)
    if from_env:
        return Path(from_env), True
    return DEFAULT_CONFIG_PATH, False


def load_settings(explicit_path: str | None = None) -> Settings:
    """Read the settings and resolve relative file paths against the file's folder.

    Raises ConfigError with one line per problem, naming the setting or file.
    """
    path, required = config_path(explicit_path)
    data: dict[str, Any] = {}
    if path.is_file() or required:
        data = _read_toml(path)
    base = path.resolve().parent if path.is_file() else Path.cwd()

    token = _toml_data.set(data)
    try:
        settings = Settings()  # type: ignore[call-arg]
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None
    finally:
        _toml_data.reset(token)
    return _resolve_paths(settings, base)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(
            f"configuration file {str(path)!r} not found: pass --config PATH or set {CONFIG_ENV_VAR}"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"configuration file {str(path)!r} cannot be read: {exc.strerror}"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"configuration file {str(path)!r} is not valid TOML: {exc}"
        ) from None


def _describe(error: ValidationError, path: Path) -> str:
    lines = []
    for problem in error.errors(include_url=False):
        setting = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "missing":
            message = f"missing: set it in {path} or as EVENTSYNC_{setting.upper().replace('.', '__')}"
        elif problem["type"] == "extra_forbidden":
            message = "unknown setting (check its spelling and section)"
        elif "input" in problem and problem["type"] not in ("value_error",):
            message = f"{message} (got {problem['input']!r})"
        lines.append(f"invalid setting {setting}: {message}")
    return "\n".join(lines)


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    def resolved(path: Path) -> Path:
        expanded = path.expanduser()
        return expanded if expanded.is_absolute() else base / expanded

    mqtt = settings.mqtt.model_copy(
        update={
            "ca_file": resolved(settings.mqtt.ca_file),
            "cert_file": resolved(settings.mqtt.cert_file),
            "key_file": resolved(settings.mqtt.key_file),
        }
    )
    health = settings.health
    if health.heartbeat_file is not None:
        health = health.model_copy(
            update={"heartbeat_file": resolved(health.heartbeat_file)}
        )
    return settings.model_copy(update={"mqtt": mqtt, "health": health})


def check_certificate_files(mqtt: MqttSettings, now: float | None = None) -> list[str]:
    """Load the CA, certificate and key once, so that a bad file stops start-up.

    Raises ConfigError naming the setting, the file and what is wrong with it:
    missing, unreadable, not PEM, a key that does not match the certificate, or
    a client certificate outside its validity period. Returns warnings that do
    not stop start-up, such as a private key that other users can read.
    """
    for setting, path in (
        ("mqtt.ca_file", mqtt.ca_file),
        ("mqtt.cert_file", mqtt.cert_file),
        ("mqtt.key_file", mqtt.key_file),
    ):
        try:
            with path.open("rb"):
                pass
        except FileNotFoundError:
            raise ConfigError(
                f"invalid setting {setting}: file {str(path)!r} not found"
            ) from None
        except IsADirectoryError:
            raise ConfigError(
                f"invalid setting {setting}: {str(path)!r} is a folder, not a file"
            ) from None
        except OSError as exc:
            raise ConfigError(
                f"invalid setting {setting}: file {str(path)!r} cannot be read: {exc.strerror}"
            ) from None

    from eventsync.tls import build_ssl_context, certificate_validity_problem

    try:
        build_ssl_context(mqtt)
    except ssl.SSLError as exc:
        raise ConfigError(f"invalid TLS files: {exc}") from None
    problem = certificate_validity_problem(mqtt.cert_file, now)
    if problem is not None:
        raise ConfigError(f"invalid setting mqtt.cert_file: {problem}")

    warnings = []
    mode = mqtt.key_file.stat().st_mode & 0o777
    if mode & 0o077:
        warnings.append(
            f"private key {str(mqtt.key_file)!r} is readable by other users "
            f"(mode {mode:o}); restrict it with chmod 600"
        )
    return warnings
