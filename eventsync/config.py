"""Settings: `config.toml` overridden by `EVENTSYNC_<SECTION>__<KEY>` variables."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import tomllib
import types
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from eventsync.errors import ConfigError
from eventsync.topics import TopicTemplate

ENV_PREFIX = "EVENTSYNC_"
CONFIG_ENV_VAR = "EVENTSYNC_CONFIG"
DEFAULT_CONFIG_PATH = Path("config.toml")
# AWS IoT Core limits a message payload to 128 KiB.
AWS_IOT_MAX_PAYLOAD_BYTES = 131_072
# ALPN protocol that AWS IoT Core expects for MQTT with client certificates on 443.
AWS_IOT_ALPN = "x-amzn-mqtt-ca"

# A cron expression must fire within this many days of start-up (5 years, with
# their leap days), so that one that never fires, such as `0 0 30 2 *`, is rejected.
CRON_HORIZON_DAYS = 5 * 365 + 2
# botocore 1.43 (`botocore.utils.validate_region_name`) accepts a region only
# when it matches this host-label pattern, because it builds endpoint host
# names from it. botocore also accepts "", which names no region at all.
_REGION_PATTERN = re.compile(r"(?![0-9]+$)(?!-)[a-zA-Z0-9-]{1,63}(?<!-)")
# One DNS label of a host name, as botocore's `is_valid_endpoint_url` checks it.
_HOST_LABEL = re.compile(r"(?!-)[a-zA-Z0-9-]{1,63}(?<!-)")

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


def _parse_path(value: Any) -> Path:
    if isinstance(value, Path):
        return value
    # An empty path would resolve to the configuration file's folder.
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a file path, got {value!r}")
    return Path(value)


# A path setting: text that is not empty, or a Path. Strict validation alone
# would reject text.
FilePath = Annotated[Path, BeforeValidator(_parse_path)]


def check_endpoint_url(value: str) -> str:
    """Check an http:// or https:// URL with a host, and a port from 1 to 65535 if any.

    Raises ValueError for what botocore rejects only when the client is created
    or the first request is sent.
    """
    if any(character.isspace() or not character.isprintable() for character in value):
        raise ValueError(
            f"must not contain spaces or control characters, got {value!r}"
        )
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"must not contain a user name or password, got {value!r}; "
            "AWS credentials come from the AWS chain"
        )
    host = parts.hostname
    if not host:
        raise ValueError(f"has no host, got {value!r}")
    if not _is_host(host):
        raise ValueError(f"has an invalid host name {host!r}, got {value!r}")
    try:
        port_is_valid = parts.port != 0
    except ValueError:
        port_is_valid = False
    if not port_is_valid:
        raise ValueError(
            f"has an invalid port, got {value!r}; use a port from 1 to 65535"
        )
    return value


def _is_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        labels = host.removesuffix(".").split(".")
        return len(host) <= 255 and all(
            _HOST_LABEL.fullmatch(label) for label in labels
        )
    return True


class _Section(BaseModel):
    # Strict, so that a TOML value of the wrong type is an error: `port = true`
    # is not port 1, and `consistent_read = "yes"` is not true. Environment
    # variables are text, so _EnvironmentSource converts them first.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


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

    @field_validator("region")
    @classmethod
    def _check_region(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value:
            raise ValueError(
                "must not be empty; leave it out to take the region from AWS_REGION"
            )
        if not _REGION_PATTERN.fullmatch(value):
            raise ValueError(
                f"must be an AWS region name such as 'eu-west-1', got {value!r}"
            )
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        return value if value is None else check_endpoint_url(value)


class MqttSettings(_Section):
    host: str = Field(min_length=1)
    port: int = Field(default=8883, ge=1, le=65535)
    client_id: str = Field(default="eventsync", min_length=1, max_length=128)
    ca_file: FilePath
    cert_file: FilePath
    key_file: FilePath
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

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        if any(character.isspace() for character in value):
            raise ValueError(
                f"must be a host name or address without spaces, got {value!r}"
            )
        return value

    @field_validator("qos", mode="before")
    @classmethod
    def _check_qos_type(cls, value: Any) -> Any:
        # In strict mode Literal[0, 1] still takes True and 1.0, which equal 1.
        if isinstance(value, bool | float):
            raise ValueError(f"must be 0 or 1, got {value!r}")
        return value

    @field_validator("max_publish_rate")
    @classmethod
    def _check_publish_rate(cls, value: float) -> float:
        # A rate below 1 is almost surely a mistake: at 0.001 a sync of 10
        # changed topics takes about 3 hours, and at 1e-300 it never ends.
        if 0 < value < 1:
            raise ValueError(
                f"must be 0 (no limit) or at least 1 publish per second, got {value!r}"
            )
        return value

    @field_validator("alpn")
    @classmethod
    def _check_alpn(cls, value: str | None) -> str | None:
        # TLS carries each ALPN protocol name in 1 to 255 bytes, and Python's
        # ssl module encodes the names as ASCII.
        if value and len(value) > 255:
            raise ValueError(
                f'must be 1 to 255 characters, or "" for no ALPN, got {len(value)} characters'
            )
        if value and not value.isascii():
            raise ValueError(f"must be ASCII text, got {value!r}")
        return value

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
    # Whether a table without a single valid event may empty the topics that
    # earlier syncs published; off, such a sync leaves them as they are.
    allow_empty_table: bool = False
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
        if value is None:
            return value
        from eventsync.schedule import first_fire_day, parse_crontab

        spec = parse_crontab(value)
        if first_fire_day(spec, date.today(), CRON_HORIZON_DAYS) is None:
            raise ValueError(
                f"cron expression {value!r} never fires in the next 5 years: "
                "no date matches its day-of-month, month and day-of-week fields"
            )
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
    heartbeat_file: FilePath | None = None


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


class _EnvironmentSource(PydanticBaseSettingsSource):
    """EVENTSYNC_* variables, with text converted for number and boolean settings.

    Variables are text and the sections validate strictly, so this source turns
    "8883" into 8883 and "true" into True with pydantic's lax rules. Text that
    does not convert stays text, and the strict check then reports it.
    """

    def __init__(
        self, settings_cls: type[BaseSettings], environment: PydanticBaseSettingsSource
    ) -> None:
        super().__init__(settings_cls)
        self._environment = environment

    def get_field_value(
        self, field: FieldInfo, field_name: str
    ) -> tuple[Any, str, bool]:
        return self._environment.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        try:
            data = self._environment()
        except SettingsError as exc:
            # pydantic-settings raises this for a section variable such as
            # EVENTSYNC_MQTT whose value is not valid JSON.
            raise ConfigError(
                _describe_environment_error(self.settings_cls, exc)
            ) from None
        fields = self.settings_cls.model_fields
        return {
            name: _convert_section_text(fields[name], values)
            if name in fields
            else values
            for name, values in data.items()
        }


def _convert_section_text(section: FieldInfo, values: Any) -> Any:
    model = _without_none(section.annotation)
    if not (isinstance(values, dict) and isinstance(model, type)):
        return values
    if not issubclass(model, BaseModel):
        return values
    converted = dict(values)
    for key, value in values.items():
        field = model.model_fields.get(key)
        if field is None or not isinstance(value, str):
            continue
        adapter = _TEXT_ADAPTERS.get(_scalar_type(field.annotation))
        if adapter is None:
            continue
        # Text that does not convert is left for the strict check to report.
        with contextlib.suppress(ValidationError):
            converted[key] = adapter.validate_python(value)
    return converted


_TEXT_ADAPTERS: dict[Any, TypeAdapter[Any]] = {
    bool: TypeAdapter(bool),
    int: TypeAdapter(int),
    float: TypeAdapter(float),
}


def _without_none(annotation: Any) -> Any:
    """Return T for `T | None`, else the annotation itself."""
    if get_origin(annotation) in (Union, types.UnionType):
        arguments = [item for item in get_args(annotation) if item is not type(None)]
        if len(arguments) == 1:
            return arguments[0]
    return annotation


def _scalar_type(annotation: Any) -> Any:
    """Return the type of a field's values: int for `Literal[0, 1]`, float for `float | None`."""
    annotation = _without_none(annotation)
    if get_origin(annotation) is Literal:
        kinds = {type(item) for item in get_args(annotation)}
        if len(kinds) == 1:
            return kinds.pop()
    return annotation


def _describe_environment_error(
    settings_cls: type[BaseSettings], error: SettingsError
) -> str:
    for section in settings_cls.model_fields:
        variable = f"{ENV_PREFIX}{section}".upper()
        for name, text in os.environ.items():
            if name.upper() != variable:
                continue
            try:
                json.loads(text)
            except ValueError as exc:
                return (
                    f"invalid setting {section}: {name} is not valid JSON ({exc}); "
                    f"set a JSON object, or one variable per key such as {variable}__KEY"
                )
    return f"invalid environment variable: {error}"


class CoreSettings(BaseSettings):
    """The settings of the commands that never connect to the broker.

    `[mqtt]` may be absent here. When it is present it is checked all the same,
    so that a mistake in it shows up whatever command runs.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    dynamodb: DynamoDBSettings = DynamoDBSettings()
    mqtt: MqttSettings | None = None
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
        return (
            init_settings,
            _EnvironmentSource(settings_cls, env_settings),
            _TomlSource(settings_cls),
        )


class Settings(CoreSettings):
    """The settings of the commands that publish, or check items against the topic template."""

    mqtt: MqttSettings


_SettingsT = TypeVar("_SettingsT", bound=CoreSettings)


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
    return _load(explicit_path, Settings)


def load_core_settings(explicit_path: str | None = None) -> CoreSettings:
    """Read the settings as `load_settings` does, but let `[mqtt]` be absent."""
    return _load(explicit_path, CoreSettings)


def _load(explicit_path: str | None, settings_class: type[_SettingsT]) -> _SettingsT:
    path, required = config_path(explicit_path)
    data: dict[str, Any] = {}
    if path.is_file() or required:
        data = _read_toml(path)
    base = path.resolve().parent if path.is_file() else Path.cwd()

    token = _toml_data.set(data)
    try:
        settings = settings_class()
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, settings_class)) from None
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
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"configuration file {str(path)!r} is not UTF-8 text: "
            f"byte {exc.start} cannot be decoded"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"configuration file {str(path)!r} is not valid TOML: {exc}"
        ) from None


def _describe(
    error: ValidationError, path: Path, settings_class: type[CoreSettings]
) -> str:
    lines = []
    for problem in error.errors(include_url=False):
        setting = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "missing" and setting in settings_class.model_fields:
            message = _describe_missing_section(
                settings_class.model_fields[setting], setting, path
            )
        elif problem["type"] == "missing":
            message = f"missing: set it in {path} or as {_variable(setting)}"
        elif problem["type"] == "extra_forbidden":
            message = "unknown setting (check its spelling and section)"
        elif "input" in problem and problem["type"] not in ("value_error",):
            message = f"{message} (got {problem['input']!r})"
        lines.append(f"invalid setting {setting}: {message}")
    return "\n".join(lines)


def _describe_missing_section(section: FieldInfo, name: str, path: Path) -> str:
    model = _without_none(section.annotation)
    required = [
        f"{name}.{key}"
        for key, field in model.model_fields.items()
        if field.is_required()
    ]
    keys = ", ".join(required)
    variables = ", ".join(_variable(setting) for setting in required)
    return f"missing section: set {keys} in [{name}] of {path}, or as {variables}"


def _variable(setting: str) -> str:
    """Return the environment variable of a setting: EVENTSYNC_MQTT__HOST for mqtt.host."""
    return ENV_PREFIX + setting.upper().replace(".", "__")


def _resolve_paths(settings: _SettingsT, base: Path) -> _SettingsT:
    def resolved(path: Path) -> Path:
        expanded = path.expanduser()
        return expanded if expanded.is_absolute() else base / expanded

    mqtt = settings.mqtt
    if mqtt is not None:
        mqtt = mqtt.model_copy(
            update={
                "ca_file": resolved(mqtt.ca_file),
                "cert_file": resolved(mqtt.cert_file),
                "key_file": resolved(mqtt.key_file),
            }
        )
    health = settings.health
    if health.heartbeat_file is not None:
        health = health.model_copy(
            update={"heartbeat_file": resolved(health.heartbeat_file)}
        )
    return settings.model_copy(update={"mqtt": mqtt, "health": health})


def unknown_environment_variables(
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """Return the EVENTSYNC_ variables that name no section or setting.

    pydantic-settings ignores a variable whose section is misspelt, such as
    `EVENTSYNC_DYNAMODB_ENDPOINT_URL` with one underscore, and the default
    then applies silently, which for an endpoint means real AWS.
    """
    environment = os.environ if environ is None else environ
    known: dict[str, set[str]] = {
        name.upper(): {
            key.upper() for key in getattr(field.annotation, "model_fields", {})
        }
        for name, field in Settings.model_fields.items()
    }
    unknown = []
    for variable in environment:
        if not variable.startswith(ENV_PREFIX) or variable == CONFIG_ENV_VAR:
            continue
        section, separator, key = variable[len(ENV_PREFIX) :].partition("__")
        if section not in known or (separator and key not in known[section]):
            unknown.append(variable)
    return sorted(unknown)
