"""The parent's side of the eventsync child: baselines between its syncs, table changes, checks."""

from __future__ import annotations

import contextlib
from contextlib import AsyncExitStack
from typing import Any

from bench import dataset
from bench.processes import ChildProcess
from bench.pyspy import PySpyRecorder
from tests.support.broker import MosquittoBroker
from tests.support.dynamo import put_raw_items
from tests.support.mqtt import MessageCollector, subscribe_collect

# How many missing or unexpected topics a failed change check lists.
MAX_TOPICS_SHOWN = 5


class SyncChildDriver:
    """Handle the eventsync child's messages, running what must happen between its syncs.

    Before a cold sync it runs one bare publish loop, and before a warm sync
    one bare scan, so that each baseline run sits next to the eventsync run it
    is compared with. Before a change sync it changes the table. A subscriber
    on `events/#` records every message the broker delivers live, so a change
    sync that published a topic it should not have is caught at the broker,
    not only in eventsync's own report. With a `profiler`, it also attaches
    py-spy to the child for its profiled warm syncs.
    """

    def __init__(
        self,
        endpoint_url: str,
        table: dataset.Table,
        rounds: list[list[str]],
        broker: MosquittoBroker,
        pki: Any,
        stack: AsyncExitStack,
        scan_child: ChildProcess,
        publish_child: ChildProcess,
        profiler: PySpyRecorder | None = None,
    ) -> None:
        self._endpoint_url = endpoint_url
        self._scan_child = scan_child
        self._publish_child = publish_child
        self._table = table
        self._rounds = rounds
        self._broker = broker
        self._pki = pki
        self._stack = stack
        self._profiler = profiler
        self._collector: MessageCollector | None = None
        self._live_seen = 0
        self.checks: list[dict[str, Any]] = []
        self.scans: list[dict[str, Any]] = []
        self.publishes: list[dict[str, Any]] = []

    async def __call__(self, message: dict[str, Any], child: ChildProcess) -> None:
        event = message.get("event")
        if event == "before":
            phase = message["phase"]
            if phase == "cold":
                self.publishes.append(
                    await self._publish_child.request("publish", "publish")
                )
            elif phase == "warm":
                self.scans.append(await self._scan_child.request("scan", "scan"))
            elif phase == "change":
                await self._change_table(message["run"])
            await child.send("go")
        elif event == "profile_ready":
            assert self._profiler is not None
            await self._profiler.start(child.pid)
            await child.send("go")
        elif event == "profile_done":
            assert self._profiler is not None
            await self._profiler.stop()
            await child.send("go")
        elif event == "sync" and message.get("phase") == "change":
            await self._check(message)

    async def _change_table(self, run: int) -> None:
        if self._collector is None:
            self._collector = await self._stack.enter_async_context(
                subscribe_collect(
                    self._broker.host, self._broker.port, self._pki, "events/#"
                )
            )
            # The broker first sends every retained message; wait until it is done.
            await self._collector.wait_quiet(quiet_seconds=1.0, timeout_seconds=300)
            self._live_seen = len(self._collector.live())
        items = list(dataset.changed_items(self._table, self._rounds[run], run))
        await put_raw_items(self._endpoint_url, dataset.TABLE_NAME, items)

    async def _check(self, message: dict[str, Any]) -> None:
        assert self._collector is not None
        run = message["run"]
        expected = {
            dataset.TOPIC_TEMPLATE.render(target) for target in self._rounds[run]
        }
        # Every PUBACK has arrived when the sync returns, but the broker may
        # still be delivering to the subscriber.
        with contextlib.suppress(TimeoutError):
            await self._collector.wait_for_count(
                self._live_seen + len(expected), timeout_seconds=30
            )
        await self._collector.wait_quiet(quiet_seconds=1.0, timeout_seconds=60)
        live = self._collector.live()
        received = [received.topic for received in live[self._live_seen :]]
        self._live_seen = len(live)
        # Sorted lists keep the results JSON-serializable; a few names suffice
        # to show what went wrong.
        missing = sorted(expected - set(received))
        unexpected = sorted(set(received) - expected)
        self.checks.append(
            {
                "run": run,
                "changed_targets": len(expected),
                "published": message["published"],
                "delivered": len(received),
                "missing": missing[:MAX_TOPICS_SHOWN],
                "unexpected": unexpected[:MAX_TOPICS_SHOWN],
                "exact": not missing
                and not unexpected
                and len(received) == len(expected)
                and message["published"] == len(expected),
            }
        )
