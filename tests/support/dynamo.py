"""A local moto DynamoDB server, an isolated AWS environment and raw table access.

The table functions take items in DynamoDB's typed JSON form, for example
`{"target": {"S": "lobby"}, "event_id": {"S": "e1"}}`, so tests can write items
that the package's own parser would reject.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.client
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import AioSession, get_session

from . import LOOPBACK, file_size, find_free_port, read_from, spawn, terminate

REGION = "us-east-1"
DUMMY_ACCESS_KEY_ID = "testing"
DUMMY_SECRET_ACCESS_KEY = "testing"

# BatchWriteItem accepts at most 25 put or delete requests per call. moto does
# not enforce the limit, so the chunking below is what real DynamoDB requires.
BATCH_WRITE_MAX_ITEMS = 25
_BATCH_WRITE_MAX_ATTEMPTS = 8
_BATCH_WRITE_FIRST_DELAY_SECONDS = 0.05

# Any AWS client that is not given an endpoint goes here instead of to AWS.
# Port 9 (discard) is normally closed, so such a client fails at once with a
# connection error on loopback.
UNREACHABLE_ENDPOINT_URL = "http://127.0.0.1:9"

_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
_MAX_PORT_ATTEMPTS = 3


def isolate_aws_environment(monkeypatch: pytest.MonkeyPatch, empty_file: Path) -> None:
    """Remove every AWS_* and proxy variable and set dummy credentials.

    After this, botocore finds the dummy keys, never calls the EC2 instance
    metadata service, reads no profile or shared credentials, and sends any
    request without an explicit endpoint to UNREACHABLE_ENDPOINT_URL.
    `empty_file` replaces ~/.aws/config and ~/.aws/credentials.
    """
    empty_file.write_text("")
    for name in list(os.environ):
        upper = name.upper()
        if upper.startswith("AWS_") or upper in _PROXY_VARIABLES:
            monkeypatch.delenv(name)

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DUMMY_ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty_file))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty_file))
    monkeypatch.setenv("AWS_ENDPOINT_URL", UNREACHABLE_ENDPOINT_URL)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost,::1")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost,::1")


class MotoServerError(RuntimeError):
    """moto_server exited or did not respond to HTTP requests in time."""


class MotoServer:
    """A `moto.server` process on a free port of 127.0.0.1."""

    def __init__(self, workdir: Path, *, start_timeout_seconds: float = 30.0) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.output_path = workdir / "moto_server.log"
        self._start_timeout_seconds = start_timeout_seconds
        self._process: subprocess.Popen[bytes] | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """TCP port of the HTTP endpoint on 127.0.0.1."""
        if self._port is None:
            raise RuntimeError("moto_server has no port yet: call start() first")
        return self._port

    @property
    def endpoint_url(self) -> str:
        """URL to pass as `endpoint_url` to an AWS client."""
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> None:
        """Start moto_server and wait until it responds to an HTTP request.

        Retries on a new port when the chosen one was taken before moto bound it.
        Raises MotoServerError with moto's output when it exits or does not
        respond within the start timeout.
        """
        for attempt in range(1, _MAX_PORT_ATTEMPTS + 1):
            self._port = find_free_port()
            output_offset = file_size(self.output_path)
            process = spawn(
                [
                    sys.executable,
                    "-m",
                    "moto.server",
                    "-H",
                    LOOPBACK,
                    "-p",
                    str(self._port),
                ],
                self.output_path,
            )
            self._process = process
            if self._wait_until_ready(process):
                return

            exit_status = process.poll()
            terminate(process)
            self._process = None
            output = read_from(self.output_path, output_offset)
            if "Address already in use" in output and attempt < _MAX_PORT_ATTEMPTS:
                continue
            if exit_status is not None:
                problem = f"exited with status {exit_status}"
            else:
                problem = f"did not respond within {self._start_timeout_seconds} s"
            raise MotoServerError(
                f"moto_server on {self.endpoint_url} {problem}\n"
                f"--- {self.output_path} ---\n{output}"
            )

    def stop(self) -> None:
        """Send SIGTERM, then SIGKILL after 5 s."""
        if self._process is not None:
            terminate(self._process)
            self._process = None

    def reset(self) -> None:
        """Delete every table and item in the server."""
        connection = http.client.HTTPConnection(LOOPBACK, self.port, timeout=10)
        try:
            connection.request("POST", "/moto-api/reset")
            response = connection.getresponse()
            response.read()
        finally:
            connection.close()
        if response.status != 200:
            raise MotoServerError(f"moto reset returned HTTP {response.status}")

    def log_text(self) -> str:
        """Return moto_server's output so far."""
        return self.output_path.read_text(errors="replace")

    def _wait_until_ready(self, process: subprocess.Popen[bytes]) -> bool:
        deadline = time.monotonic() + self._start_timeout_seconds
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            if self._responds_to_http():
                return True
            time.sleep(0.1)
        return False

    def _responds_to_http(self) -> bool:
        # http.client ignores proxy variables, unlike urllib.
        connection = http.client.HTTPConnection(LOOPBACK, self.port, timeout=1)
        try:
            connection.request("GET", "/moto-api/config")
            response = connection.getresponse()
            response.read()
        except OSError:
            return False
        finally:
            connection.close()
        # A success status on moto's own API path (moto 5.2 returns 201) distinguishes
        # moto from another server that took the port first.
        return 200 <= response.status < 300


@contextlib.asynccontextmanager
async def dynamodb_client(endpoint_url: str) -> AsyncIterator[Any]:
    """Open an aiobotocore DynamoDB client for `endpoint_url` with dummy keys."""
    async with aws_session().create_client(
        "dynamodb",
        region_name=REGION,
        endpoint_url=endpoint_url,
        aws_access_key_id=DUMMY_ACCESS_KEY_ID,
        aws_secret_access_key=DUMMY_SECRET_ACCESS_KEY,
    ) as client:
        yield client


async def create_events_table(endpoint_url: str, table_name: str) -> None:
    """Create an on-demand table keyed by `target` (S) and `event_id` (S)."""
    async with dynamodb_client(endpoint_url) as client:
        await client.create_table(
            TableName=table_name,
            AttributeDefinitions=[
                {"AttributeName": "target", "AttributeType": "S"},
                {"AttributeName": "event_id", "AttributeType": "S"},
            ],
            KeySchema=[
                {"AttributeName": "target", "KeyType": "HASH"},
                {"AttributeName": "event_id", "KeyType": "RANGE"},
            ],
            BillingMode="PAY_PER_REQUEST",
        )
        waiter = client.get_waiter("table_exists")
        await waiter.wait(
            TableName=table_name, WaiterConfig={"Delay": 1, "MaxAttempts": 30}
        )


async def put_raw_items(
    endpoint_url: str, table_name: str, items: Iterable[Mapping[str, Any]]
) -> None:
    """Write typed-JSON items with BatchWriteItem, 25 per call.

    Unprocessed items are sent again with exponential backoff. Raises
    RuntimeError if some are still unprocessed after 8 attempts. DynamoDB
    rejects a call whose chunk has two items with the same key.
    """
    requests = [{"PutRequest": {"Item": dict(item)}} for item in items]
    async with dynamodb_client(endpoint_url) as client:
        for start in range(0, len(requests), BATCH_WRITE_MAX_ITEMS):
            chunk = requests[start : start + BATCH_WRITE_MAX_ITEMS]
            await _batch_write(client, table_name, chunk)


async def delete_raw_item(
    endpoint_url: str, table_name: str, key: Mapping[str, Any]
) -> None:
    """Delete the item with typed-JSON primary `key`, for example both key fields."""
    async with dynamodb_client(endpoint_url) as client:
        await client.delete_item(TableName=table_name, Key=dict(key))


async def scan_raw_items(endpoint_url: str, table_name: str) -> list[dict[str, Any]]:
    """Return every item of the table in typed-JSON form, following pagination."""
    items: list[dict[str, Any]] = []
    async with dynamodb_client(endpoint_url) as client:
        paginator = client.get_paginator("scan")
        async for page in paginator.paginate(TableName=table_name, ConsistentRead=True):
            items.extend(page.get("Items", []))
    return items


async def _batch_write(
    client: Any, table_name: str, requests: Sequence[dict[str, Any]]
) -> None:
    pending = list(requests)
    delay_seconds = _BATCH_WRITE_FIRST_DELAY_SECONDS
    for _ in range(_BATCH_WRITE_MAX_ATTEMPTS):
        response = await client.batch_write_item(RequestItems={table_name: pending})
        pending = response.get("UnprocessedItems", {}).get(table_name, [])
        if not pending:
            return
        await asyncio.sleep(delay_seconds)
        delay_seconds *= 2
    raise RuntimeError(
        f"BatchWriteItem left {len(pending)} items unprocessed in {table_name}"
        f" after {_BATCH_WRITE_MAX_ATTEMPTS} attempts"
    )


@functools.cache
def aws_session() -> AioSession:
    """Return the aiobotocore session that every client in this module uses.

    Sharing one session loads the DynamoDB service model once per run, and
    lets a test register event handlers that see these clients' calls.
    """
    return get_session()
