"""The `eventsync` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

from eventsync import __version__
from eventsync.config import (
    CoreSettings,
    Settings,
    load_core_settings,
    load_settings,
    unknown_environment_variables,
)
from eventsync.errors import (
    ConfigError,
    InvalidItemError,
    NotConnectedError,
    StoreError,
)
from eventsync.logs import configure_logging, get_logger
from eventsync.tls import check_certificate_files

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2

log = get_logger("eventsync.cli")


def positive_seconds(text: str) -> float:
    """Parse a command-line number of seconds that is finite and above 0."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid number of seconds {text!r}"
        ) from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(
            f"invalid number of seconds {text!r}: must be finite and above 0"
        )
    return seconds


def build_parser() -> argparse.ArgumentParser:
    # --config is accepted before or after the command name.
    config_option = argparse.ArgumentParser(add_help=False)
    config_option.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="configuration file (default: $EVENTSYNC_CONFIG, else ./config.toml)",
    )

    parser = argparse.ArgumentParser(
        prog="eventsync",
        description="Publish the active events of a DynamoDB table as retained MQTT messages.",
        parents=[config_option],
    )
    parser.add_argument(
        "--version", action="version", version=f"eventsync {__version__}"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("run", parents=[config_option], help="run the daemon")

    sync = commands.add_parser(
        "sync", parents=[config_option], help="run one sync, then exit"
    )
    sync.add_argument(
        "--dry-run",
        action="store_true",
        help="print each topic and the payload it would get, as JSON lines, without connecting to the broker",
    )

    table = commands.add_parser(
        "table", parents=[config_option], help="manage the events table"
    )
    table_commands = table.add_subparsers(
        dest="table_command", required=True, metavar="COMMAND"
    )
    table_commands.add_parser(
        "create",
        parents=[config_option],
        help="create the table with TTL on expires_at (harmless if it exists)",
    )

    events = commands.add_parser(
        "events", parents=[config_option], help="put, list or delete events"
    )
    event_commands = events.add_subparsers(
        dest="events_command", required=True, metavar="COMMAND"
    )
    put = event_commands.add_parser(
        "put", parents=[config_option], help="write one event after checking it"
    )
    put.add_argument(
        "--target", required=True, help="display or group name, such as room-101"
    )
    put.add_argument(
        "--event-id", required=True, help="event id, unique within the target"
    )
    put.add_argument("--title", required=True)
    put.add_argument(
        "--starts-at",
        required=True,
        help="ISO 8601 time (sync.timezone when it has no offset) or epoch seconds",
    )
    put.add_argument(
        "--ends-at",
        required=True,
        help="ISO 8601 time or epoch seconds; after --starts-at",
    )
    put.add_argument("--description")
    put.add_argument("--location")
    put.add_argument(
        "--data", metavar="JSON", help="JSON object passed through to devices"
    )
    put.add_argument(
        "--expires-at",
        metavar="EPOCH_SECONDS",
        help="when DynamoDB TTL may delete the item",
    )
    put.add_argument(
        "--replace",
        action="store_true",
        help="overwrite an existing event with the same id",
    )

    listing = event_commands.add_parser(
        "list", parents=[config_option], help="print events as JSON lines"
    )
    listing.add_argument("--target", help="only this target's events")

    delete = event_commands.add_parser(
        "delete", parents=[config_option], help="delete one event"
    )
    delete.add_argument("--target", required=True)
    delete.add_argument("--event-id", required=True)

    health = commands.add_parser(
        "health",
        parents=[config_option],
        help="exit 0 when a sync completed recently, else 1",
    )
    health.add_argument(
        "--max-age",
        type=positive_seconds,
        metavar="SECONDS",
        help="the oldest heartbeat that counts as healthy, in seconds above 0 (default: two sync periods plus 300 s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        return _run_command(arguments)
    except ConfigError as exc:
        print(f"eventsync: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


def _run_command(arguments: argparse.Namespace) -> int:
    config = getattr(arguments, "config", None)
    # `table create`, `events` and `health` never connect to the broker, so
    # they run without [mqtt]; `events put` and `events list` then check
    # targets against the default topic template.
    if arguments.command == "health":
        core = load_core_settings(config)
        _configure_logging(arguments, core)
        return _health(core, arguments.max_age)
    if arguments.command == "table":
        core = load_core_settings(config)
        _configure_logging(arguments, core)
        return asyncio.run(_table_create(core))
    if arguments.command == "events":
        core = load_core_settings(config)
        _configure_logging(arguments, core)
        if arguments.events_command == "delete":
            return asyncio.run(_events_delete(arguments, core))
        return asyncio.run(_events(arguments, core))

    settings = load_settings(config)
    _configure_logging(arguments, settings)
    if arguments.command in ("run", "sync") and not getattr(
        arguments, "dry_run", False
    ):
        _check_tls_setup(settings)
    return asyncio.run(_dispatch(arguments, settings))


def _configure_logging(arguments: argparse.Namespace, settings: CoreSettings) -> None:
    # Commands that print data keep stdout for it and log to stderr.
    prints_data = arguments.command == "events" or getattr(arguments, "dry_run", False)
    configure_logging(
        settings.log.level,
        settings.log.format,
        stream=sys.stderr if prints_data else sys.stdout,
    )
    for variable in unknown_environment_variables():
        log.warning(
            "unknown_environment_variable",
            variable=variable,
            warning="it names no setting and is ignored; settings are "
            "EVENTSYNC_<SECTION>__<KEY>, with two underscores",
        )


def _check_tls_setup(settings: Settings) -> None:
    """Stop on unusable certificate files, and warn on risky TLS settings."""
    for warning in check_certificate_files(settings.mqtt):
        log.warning("certificate_warning", warning=warning)
    if settings.mqtt.insecure_skip_hostname_verification:
        log.warning(
            "insecure_tls",
            setting="mqtt.insecure_skip_hostname_verification",
            warning="the broker certificate's host name is not checked; "
            "use this with development brokers only",
        )


async def _dispatch(arguments: argparse.Namespace, settings: Settings) -> int:
    if arguments.command == "run":
        from eventsync.service import Daemon

        return await Daemon(settings).run()
    return await _sync(settings, dry_run=arguments.dry_run)


async def _sync(settings: Settings, *, dry_run: bool) -> int:
    from eventsync.publisher import MqttConnection
    from eventsync.store import EventStore
    from eventsync.sync import Syncer, item_rules, read_table

    try:
        async with EventStore(settings.dynamodb) as store:
            if dry_run:
                syncer = Syncer(settings, store, None)
                snapshot = await read_table(store, item_rules(settings))
                for payload in syncer.payloads(snapshot, time.time()):
                    body = json.loads(payload.body) if payload.body else None
                    line = {"topic": payload.topic, "payload": body}
                    sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
                return EXIT_OK
            async with MqttConnection(settings.mqtt) as connection:
                report = await Syncer(settings, store, connection).run()
    except (StoreError, NotConnectedError) as exc:
        log.error("sync_failed", error=str(exc))
        return EXIT_FAILED
    return EXIT_OK if report.ok else EXIT_FAILED


async def _table_create(settings: CoreSettings) -> int:
    from eventsync.store import EventStore

    try:
        async with EventStore(settings.dynamodb) as store:
            created = await store.create_table()
    except StoreError as exc:
        log.error("table_create_failed", table=settings.dynamodb.table, error=str(exc))
        return EXIT_FAILED
    log.info(
        "table_created" if created else "table_exists",
        table=settings.dynamodb.table,
        ttl_attribute="expires_at",
    )
    return EXIT_OK


async def _events(arguments: argparse.Namespace, settings: CoreSettings) -> int:
    from eventsync.admin import build_item, list_events, validate_item
    from eventsync.events import MAX_DATA_DEPTH
    from eventsync.store import EventStore

    item: dict[str, Any] | None = None
    if arguments.events_command == "put":
        try:
            item = build_item(
                target=arguments.target,
                event_id=arguments.event_id,
                title=arguments.title,
                starts_at=arguments.starts_at,
                ends_at=arguments.ends_at,
                description=arguments.description,
                location=arguments.location,
                data=arguments.data,
                expires_at=arguments.expires_at,
            )
            validate_item(item, settings)
        except InvalidItemError as exc:
            print(f"eventsync: invalid event: {exc.reason}", file=sys.stderr)
            return EXIT_CONFIG
        except ValueError as exc:
            print(f"eventsync: invalid event: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        except RecursionError:
            # Only --data nests, and both json.loads and the conversion to
            # DynamoDB's typed form recurse into each level.
            print(
                f"eventsync: invalid event: --data is nested too deeply; "
                f"DynamoDB stores {MAX_DATA_DEPTH} levels at most",
                file=sys.stderr,
            )
            return EXIT_CONFIG

    try:
        async with EventStore(settings.dynamodb) as store:
            if item is not None:
                await store.put_item(item, replace=arguments.replace)
                log.info(
                    "event_put", target=arguments.target, event_id=arguments.event_id
                )
                return EXIT_OK
            await list_events(store, settings, arguments.target)
            return EXIT_OK
    except StoreError as exc:
        print(f"eventsync: {exc}", file=sys.stderr)
        return EXIT_FAILED


async def _events_delete(arguments: argparse.Namespace, settings: CoreSettings) -> int:
    from eventsync.store import EventStore

    try:
        async with EventStore(settings.dynamodb) as store:
            deleted = await store.delete_item(arguments.target, arguments.event_id)
    except StoreError as exc:
        print(f"eventsync: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if not deleted:
        print(
            f"eventsync: no event target={arguments.target!r} event_id={arguments.event_id!r} found",
            file=sys.stderr,
        )
        return EXIT_FAILED
    log.info("event_deleted", target=arguments.target, event_id=arguments.event_id)
    return EXIT_OK


def _health(settings: CoreSettings, max_age: float | None) -> int:
    from eventsync.health import check_heartbeat, default_max_age_seconds

    path = settings.health.heartbeat_file
    if path is None:
        print(
            "eventsync: invalid setting health.heartbeat_file: not set, so there is no heartbeat to check",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    if max_age is None:
        max_age = default_max_age_seconds(settings.sync)
    healthy, message = check_heartbeat(path, max_age)
    print(message, file=sys.stdout if healthy else sys.stderr)
    return EXIT_OK if healthy else EXIT_FAILED
