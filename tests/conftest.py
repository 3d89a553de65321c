"""Fixtures that start real services: a test PKI, mosquitto and moto_server.

Every test runs with dummy AWS credentials and no AWS configuration from the
machine, so an AWS client that is not given a local endpoint fails on loopback
instead of reaching real AWS or the EC2 instance metadata service.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.support.broker import BrokerFactory, MosquittoBroker
from tests.support.dynamo import MotoServer, isolate_aws_environment
from tests.support.pki import Pki, create_pki


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
