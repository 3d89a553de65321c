"""Fixtures that start real services: a test PKI, mosquitto and moto_server.

Every test runs with dummy AWS credentials and no AWS configuration from the
machine, so an AWS client that is not given a local endpoint fails on loopback
instead of reaching real AWS or the EC2 instance metadata service.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import BrokerFactory, MosquittoBroker
from tests.support.daemon import DaemonProcess, write_config
from tests.support.dynamo import (
    MotoServer,
    create_events_table,
    isolate_aws_environment,
    put_raw_items,
)
from tests.support.factories import event_item
from tests.support.mqtt import unique_client_id
from tests.support.pki import Pki, create_pki

HOUR = 3600


@pytest.fixture(scope="session", autouse=True)
def dynamodb_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Isolate the AWS environment for the whole test run, then restore it.

    AWS_* and proxy variables are removed and dummy credentials are set. The
    config and credentials files point at an empty file, and instance metadata
    lookups are off. AWS_ENDPOINT_URL points at a closed loopback port, so a
    client created without `endpoint_url` fails instead of calling AWS.
    """
    empty_file = tmp_path_factory.mktemp("aws") / "empty"
    with pytest.MonkeyPatch.context() as monkeypatch:
        isolate_aws_environment(monkeypatch, empty_file)
        yield


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Test CA, broker and client certificates, shared by the whole test run."""
    return create_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def broker_factory(pki: Pki, tmp_path: Path) -> Iterator[BrokerFactory]:
    """Create mosquitto brokers on free ports and stop them all at teardown.

    Call it with extra mosquitto.conf lines, and with `start=False` to
    configure a broker that the test starts itself.
    """
    broker_numbers = itertools.count()
    with ExitStack() as stack:

        def create(
            extra_config: Sequence[str] = (), *, start: bool = True
        ) -> MosquittoBroker:
            workdir = tmp_path / f"broker-{next(broker_numbers)}"
            broker = MosquittoBroker(workdir, pki, extra_config=extra_config)
            # ExitStack runs every stop() at teardown, even if an earlier one raises.
            stack.callback(broker.stop)
            if start:
                broker.start()
            return broker

        yield create


@pytest.fixture
def broker(broker_factory: BrokerFactory) -> MosquittoBroker:
    """A started mosquitto broker with the default mutual-TLS configuration."""
    return broker_factory()


@pytest.fixture(scope="session")
def moto_server(
    dynamodb_env: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MotoServer]:
    """A moto DynamoDB server shared by the test run, so give each test its own table."""
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def table_name() -> str:
    """A table name no other test uses, such as active_events_1a2b3c4d."""
    return f"active_events_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def daemon_config(
    tmp_path: Path,
    broker: MosquittoBroker,
    pki: Pki,
    moto_server: MotoServer,
    table_name: str,
) -> Callable[..., Path]:
    """Write a daemon configuration for the test broker and table; sections override."""

    def create(**overrides: dict[str, Any]) -> Path:
        sections: dict[str, dict[str, Any]] = {
            "dynamodb": {
                "table": table_name,
                "region": "us-east-1",
                "endpoint_url": moto_server.endpoint_url,
                "max_attempts": 1,
            },
            "mqtt": {
                "host": broker.host,
                "port": broker.port,
                "client_id": unique_client_id("daemon"),
                "ca_file": pki.ca_cert,
                "cert_file": pki.client_cert,
                "key_file": pki.client_key_pkcs1,
                "reconnect_min_seconds": 0.2,
                "reconnect_max_seconds": 1,
            },
            "sync": {"interval_seconds": 1},
            "health": {"heartbeat_file": tmp_path / "heartbeat"},
        }
        for section, values in overrides.items():
            sections.setdefault(section, {}).update(values)
        return write_config(tmp_path / "config.toml", sections)

    return create


@pytest.fixture
def config_factory(
    tmp_path: Path,
    broker: MosquittoBroker,
    pki: Pki,
    moto_server: MotoServer,
    table_name: str,
) -> Callable[..., Path]:
    """Write a configuration for the test broker and table; sections override.

    It has no schedule or heartbeat, unlike `daemon_config`, so each setting
    under test keeps its default unless a test sets it.
    """

    def create(**overrides: dict[str, Any]) -> Path:
        sections: dict[str, dict[str, Any]] = {
            "dynamodb": {
                "table": table_name,
                "region": "us-east-1",
                "endpoint_url": moto_server.endpoint_url,
            },
            "mqtt": {
                "host": broker.host,
                "port": broker.port,
                "client_id": unique_client_id("cli"),
                "ca_file": pki.ca_cert,
                "cert_file": pki.client_cert,
                "key_file": pki.client_key_pkcs1,
            },
        }
        for section, values in overrides.items():
            sections.setdefault(section, {}).update(values)
        return write_config(tmp_path / "config.toml", sections)

    return create


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[[Path], DaemonProcess]]:
    """Start `eventsync run` processes; each is stopped at teardown."""
    daemons: list[DaemonProcess] = []

    def start(config_path: Path) -> DaemonProcess:
        daemon = DaemonProcess(config_path, tmp_path / f"daemon-{len(daemons)}.log")
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.stop()


@pytest.fixture
async def seeded_table(moto_server: MotoServer, table_name: str) -> str:
    """Create the test table with one current event for lobby and one for room-101."""
    now = time.time()
    await create_events_table(moto_server.endpoint_url, table_name)
    await put_raw_items(
        moto_server.endpoint_url,
        table_name,
        [
            event_item("lobby", "a", now - 60, now + HOUR),
            event_item("room-101", "b", now + 60, now + HOUR),
        ],
    )
    return table_name
