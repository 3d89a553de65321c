"""Run eventsync's Syncer in this process: cold syncs, warm syncs, and syncs after changes.

First an unmeasured cold sync publishes every topic and streams the bodies it
sends to `payload_file`, so the bare publish loop sends the same bytes. It
also warms up the code paths and the connection, and leaves the broker holding
every topic, as it does before each measured cold run. Then the phases, each
measured on its own with this process's CPU time and peak RSS:

- cold: a new Syncer with an empty cache per run, so every topic is published;
- warm: the last cold Syncer again, with nothing changed in the table;
- change: the same Syncer after the parent changed 1% of the targets.

Before each measured run the child writes `{"event": "before", "phase": ...,
"run": ...}` and waits for `go` on stdin. Meanwhile the parent runs one bare
publish loop before a cold run and one bare scan before a warm run, so that on
a shared machine a baseline and the run it is compared with see the same load.
Before a change run, the parent changes the table.

With `profile_syncs`, unmeasured warm syncs run between the warm and the
change phase, after `{"event": "profile_ready"}` and before
`{"event": "profile_done"}`, each followed by a wait for the parent's line,
so that the parent can attach py-spy for them alone.
"""

from __future__ import annotations

import asyncio
import pickle
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from bench.child import ChildConfig, eventsync_settings, fail, read_command
from bench.measure import (
    Stopwatch,
    current_rss_mb,
    emit,
    gc_seconds,
    max_rss_mb,
    sample_dict,
)
from eventsync.config import Settings
from eventsync.logs import configure_logging
from eventsync.publisher import MqttConnection, OutgoingMessage, PublishCallback
from eventsync.store import EventStore
from eventsync.sync import Syncer, SyncReport


class PayloadRecorder:
    """Writes (topic, body) pairs to a file as a stream of pickles, one per message.

    Streaming keeps the recorded bodies out of this process's memory, whose
    peak RSS is one of the measured quantities.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._file: IO[bytes] | None = None
        self.count = 0

    def __enter__(self) -> Self:
        self._file = self._path.open("wb")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._file is not None:
            self._file.close()

    def record(self, message: OutgoingMessage) -> None:
        assert self._file is not None, "use the recorder in a with block"
        pickle.dump((message.topic, message.body), self._file)
        self.count += 1


class TimedConnection(MqttConnection):
    """An MqttConnection that times publish_many and can record what it sends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.publish_seconds = 0.0
        self.publish_cpu_seconds = 0.0
        self.publish_gc_seconds = 0.0
        self.recorder: PayloadRecorder | None = None

    async def publish_many(
        self, messages: Iterable[OutgoingMessage], on_result: PublishCallback
    ) -> None:
        if self.recorder is not None:
            messages = _recorded(messages, self.recorder)
        started = time.perf_counter()
        cpu_started = time.process_time()
        gc_started = gc_seconds()
        try:
            await super().publish_many(messages, on_result)
        finally:
            self.publish_seconds += time.perf_counter() - started
            self.publish_cpu_seconds += time.process_time() - cpu_started
            self.publish_gc_seconds += gc_seconds() - gc_started


def _recorded(
    messages: Iterable[OutgoingMessage], recorder: PayloadRecorder
) -> Iterator[OutgoingMessage]:
    for message in messages:
        recorder.record(message)
        yield message


@asynccontextmanager
async def connected(
    config: ChildConfig,
) -> AsyncIterator[tuple[Settings, EventStore, TimedConnection]]:
    settings = eventsync_settings(config, client_id="bench-eventsync")
    async with (
        EventStore(settings.dynamodb) as store,
        TimedConnection(settings.mqtt) as connection,
    ):
        if not await connection.wait_connected(30):
            fail("eventsync did not connect to the broker within 30 s")
        yield settings, store, connection


async def record_payloads(
    settings: Settings,
    store: EventStore,
    connection: TimedConnection,
    path: Path,
) -> None:
    """Run one unmeasured cold sync and write every body it publishes to `path`."""
    with PayloadRecorder(path) as recorder:
        connection.recorder = recorder
        try:
            report = await Syncer(settings, store, connection).run()
        finally:
            connection.recorder = None
    if report.failed or recorder.count != report.topics:
        fail(
            f"the recording sync published {recorder.count} of {report.topics}"
            f" topics, {report.failed} failed"
        )


async def timed_sync(
    syncer: Syncer, connection: TimedConnection, phase: str, run: int
) -> dict[str, Any]:
    watch = Stopwatch()
    connection.publish_seconds = 0.0
    connection.publish_cpu_seconds = 0.0
    connection.publish_gc_seconds = 0.0
    watch.start()
    report: SyncReport = await syncer.run()
    sample = watch.stop()
    result = sample_dict(
        sample,
        phase=phase,
        run=run,
        published=report.published,
        unchanged=report.unchanged,
        failed=report.failed,
        topics=report.topics,
        events_read=report.events_read,
        invalid=report.invalid,
        publish_seconds=connection.publish_seconds,
        publish_cpu_seconds=connection.publish_cpu_seconds,
        publish_gc_seconds=connection.publish_gc_seconds,
    )
    emit({"event": "sync", **result})
    return result


async def wait_for_parent() -> None:
    """Wait for the parent's `go` on stdin."""
    command = await read_command()
    if command != "go":
        fail(f"expected 'go' from the parent, got {command!r}")


async def measured_sync(
    syncer: Syncer, connection: TimedConnection, phase: str, run: int
) -> dict[str, Any]:
    """Tell the parent that a measured sync comes next, wait for it, and run the sync."""
    emit({"event": "before", "phase": phase, "run": run})
    await wait_for_parent()
    return await timed_sync(syncer, connection, phase, run)


async def main() -> None:
    config = ChildConfig.from_argv()
    configure_logging("info", "json", stream=sys.stderr)
    syncer: Syncer | None = None
    emit({"event": "started", "rss_mb": current_rss_mb()})

    async with connected(config) as (settings, store, connection):
        emit({"event": "connected", "rss_mb": current_rss_mb()})
        await record_payloads(settings, store, connection, Path(config.payload_file))
        emit({"event": "recorded", "rss_mb": current_rss_mb()})
        for run in range(config.repeats):
            syncer = Syncer(settings, store, connection)
            await measured_sync(syncer, connection, "cold", run)

        assert syncer is not None, "repeats must be at least 1"
        for run in range(config.repeats):
            await measured_sync(syncer, connection, "warm", run)

        if config.profile_syncs:
            emit({"event": "profile_ready"})
            await wait_for_parent()
            for _ in range(config.profile_syncs):
                report = await syncer.run()
                if report.published:
                    fail(f"a profiled warm sync published {report.published} topics")
            emit({"event": "profile_done", "syncs": config.profile_syncs})
            await wait_for_parent()

        for run in range(config.change_rounds):
            await measured_sync(syncer, connection, "change", run)

    emit({"event": "done", "max_rss_mb": max_rss_mb()})


if __name__ == "__main__":
    asyncio.run(main())
