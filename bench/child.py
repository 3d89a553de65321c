"""Code the benchmark children share: configuration, commands and the bare publish loop.

Each child runs as `python -m bench.NAME CONFIG_JSON` from the repository
root, writes its log to stderr, reports one JSON object per line on stdout,
and reads the parent's commands, one per line, on stdin.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from eventsync.config import DynamoDBSettings, MqttSettings, Settings
from tests.support.dynamo import REGION
from tests.support.mqtt import client_ssl_context
from tests.support.pki import KeyFormat, Pki

# The client key format eventsync is configured with; AWS IoT Core hands out PKCS#1.
KEY_FORMAT: KeyFormat = "pkcs1"


@dataclass(frozen=True)
class ChildConfig:
    """The parameters the parent passes to every child."""

    endpoint_url: str
    table: str
    broker_host: str
    broker_port: int
    pki: dict[str, str]
    in_flight: int
    repeats: int
    payload_file: str
    change_rounds: int
    # Unmeasured warm syncs that the parent profiles with py-spy; 0 for none.
    profile_syncs: int = 0

    @classmethod
    def from_argv(cls) -> ChildConfig:
        if len(sys.argv) != 2:
            raise SystemExit(f"usage: python -m {sys.argv[0]} CONFIG_JSON")
        return cls(**json.loads(sys.argv[1]))

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    def load_pki(self) -> Pki:
        paths = {name: Path(path) for name, path in self.pki.items()}
        return Pki(**paths)  # type: ignore[arg-type]


def eventsync_settings(config: ChildConfig, client_id: str) -> Settings:
    """Build eventsync's settings for the benchmark broker and table.

    The publish rate limit is off, the window of publishes awaiting PUBACK is
    the baseline's, and the publish timeout (300 s, the maximum) never fires.
    """
    pki = config.load_pki()
    return Settings(
        dynamodb=DynamoDBSettings(
            table=config.table, region=REGION, endpoint_url=config.endpoint_url
        ),
        mqtt=MqttSettings(
            host=config.broker_host,
            port=config.broker_port,
            client_id=client_id,
            ca_file=pki.ca_cert,
            cert_file=pki.client_cert,
            key_file=pki.client_key(KEY_FORMAT),
            max_publish_rate=0,
            max_in_flight=config.in_flight,
            publish_timeout_seconds=300,
            connect_timeout_seconds=30,
        ),
    )


def bare_client(config: ChildConfig, client_id: str) -> aiomqtt.Client:
    """Create an aiomqtt client with the test PKI's client certificate."""
    client = aiomqtt.Client(
        config.broker_host,
        config.broker_port,
        identifier=client_id,
        tls_context=client_ssl_context(config.load_pki(), KEY_FORMAT),
        timeout=30,
        # The semaphore in publish_all is the window; paho's own matches it.
        max_inflight_messages=config.in_flight,
    )
    # aiomqtt logs a warning per publish above this many pending calls.
    client.pending_calls_threshold = config.in_flight
    return client


async def publish_all(
    client: aiomqtt.Client, messages: Iterable[tuple[str, bytes]], in_flight: int
) -> tuple[int, int]:
    """Publish every message retained at QoS 1, `in_flight` awaiting PUBACK at once.

    Returns the number acknowledged and the number that failed.
    """
    slots = asyncio.Semaphore(in_flight)
    tasks: set[asyncio.Task[None]] = set()
    outcome = {"acknowledged": 0, "failed": 0}

    async def publish(topic: str, body: bytes) -> None:
        try:
            await client.publish(topic, body, qos=1, retain=True)
        except aiomqtt.MqttError:
            outcome["failed"] += 1
        else:
            outcome["acknowledged"] += 1
        finally:
            slots.release()

    for topic, body in messages:
        await slots.acquire()
        task = asyncio.create_task(publish(topic, body))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)
    return outcome["acknowledged"], outcome["failed"]


async def read_command() -> str:
    """Wait for the parent's next command on stdin; return "" at the end of input."""
    loop = asyncio.get_running_loop()
    line: str = await loop.run_in_executor(None, sys.stdin.readline)
    return line.strip()


def fail(message: str) -> Any:
    """Report a failure to the parent and exit with status 1."""
    sys.stdout.write(json.dumps({"event": "error", "message": message}) + "\n")
    sys.stdout.flush()
    raise SystemExit(1)
