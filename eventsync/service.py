"""The daemon: schedule syncs, and shut down cleanly on SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

from eventsync import __version__
from eventsync.config import Settings
from eventsync.errors import NotConnectedError, StoreError
from eventsync.health import touch_heartbeat
from eventsync.logs import get_logger
from eventsync.publisher import MqttConnection
from eventsync.schedule import SyncScheduler, build_trigger
from eventsync.store import EventStore
from eventsync.sync import Syncer

log = get_logger("eventsync.service")

_HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def runtime_stats() -> dict[str, int]:
    """Return task, open file and memory counts, for spotting leaks in long runs.

    The file and memory counts come from /proc and are left out elsewhere.
    """
    stats = {"tasks": len(asyncio.all_tasks())}
    try:
        stats["open_files"] = sum(1 for _ in Path("/proc/self/fd").iterdir())
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
        stats["rss_bytes"] = resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    return stats


def describe_schedule(settings: Settings) -> str:
    if settings.sync.cron is not None:
        return f"cron {settings.sync.cron!r} ({settings.sync.timezone})"
    return f"every {settings.sync.period_seconds:g} s"


class Daemon:
    """Runs a sync at start-up and then on the schedule, never two at once."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._stop = asyncio.Event()
        self._signals_received = 0
        self._syncer: Syncer | None = None
        self._connection: MqttConnection | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._sync_started_at = 0.0
        self._background: set[asyncio.Task[None]] = set()

    async def run(self) -> int:
        """Run until a signal requests a stop, and return the exit status."""
        settings = self._settings
        log.info(
            "startup",
            version=__version__,
            table=settings.dynamodb.table,
            region=settings.dynamodb.region,
            endpoint_url=settings.dynamodb.endpoint_url,
            broker_host=settings.mqtt.host,
            broker_port=settings.mqtt.port,
            client_id=settings.mqtt.client_id,
            topic_template=settings.mqtt.topic_template,
            schedule=describe_schedule(settings),
        )
        loop = asyncio.get_running_loop()
        for signum in _HANDLED_SIGNALS:
            loop.add_signal_handler(signum, self._on_signal, signum)
        try:
            async with AsyncExitStack() as stack:
                store = await stack.enter_async_context(EventStore(settings.dynamodb))
                connection = await stack.enter_async_context(
                    MqttConnection(settings.mqtt)
                )
                self._syncer = Syncer(settings, store, connection)
                self._connection = connection
                connection.on_connected = self._on_connected
                scheduler = SyncScheduler(
                    build_trigger(
                        settings.sync.interval_seconds,
                        settings.sync.cron,
                        settings.sync.zone,
                    ),
                    settings.sync.zone,
                    self._fire,
                )
                scheduler.start()
                await self._stop.wait()

                # Stop firing first, so that no sync starts while the last one drains.
                scheduler.stop()
                await self._drain()
                # Leaving the stack disconnects from the broker, then closes DynamoDB.
        finally:
            for signum in _HANDLED_SIGNALS:
                loop.remove_signal_handler(signum)
        log.info("shutdown_completed")
        return 0

    def _on_signal(self, signum: int) -> None:
        self._signals_received += 1
        name = signal.Signals(signum).name
        if self._signals_received == 1:
            # Stop first, so that a failing log write cannot keep the daemon running.
            self._stop.set()
            log.info("shutdown_started", signal=name)
            return
        log.warning("shutdown_forced", signal=name)
        with contextlib.suppress(OSError):
            sys.stdout.flush()
        # A second signal means the operator will not wait: exit without cleanup,
        # with the status a shell reports for a process killed by that signal.
        os._exit(128 + signum)

    def _on_connected(self) -> None:
        """Retry the topics a dropped connection left dirty without waiting for the schedule."""
        if self._syncer is None or self._syncer.cache.dirty_count() == 0:
            return
        if self._sync_task is not None and not self._sync_task.done():
            return
        task = asyncio.create_task(self._fire(), name="sync-after-reconnect")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _fire(self) -> None:
        """Start a sync unless one is still running; APScheduler calls this."""
        if self._stop.is_set():
            return
        if self._sync_task is not None and not self._sync_task.done():
            log.warning("sync_skipped", reason="the previous sync is still running")
            return
        self._sync_started_at = time.monotonic()
        self._sync_task = asyncio.create_task(self._sync_once(), name="sync")

    async def _sync_once(self) -> None:
        assert self._syncer is not None
        try:
            await self._syncer.run()
        except (StoreError, NotConnectedError) as exc:
            log.error("sync_failed", error=str(exc))
            return
        except Exception as exc:
            # The daemon must outlive a bug in one sync; the next one starts afresh.
            log.exception("sync_failed", error=f"{type(exc).__name__}: {exc}")
            return
        log.debug("runtime_stats", **runtime_stats())
        heartbeat = self._settings.health.heartbeat_file
        # A sync with nothing to publish completes without the broker, so a
        # broker that stays unreachable (an expired client certificate, say)
        # must stop the heartbeat for the health check to notice.
        connected = self._connection is not None and self._connection.is_connected
        if heartbeat is not None and connected:
            try:
                touch_heartbeat(heartbeat)
            except OSError as exc:
                log.error("heartbeat_failed", path=str(heartbeat), error=exc.strerror)

    async def _drain(self) -> None:
        task = self._sync_task
        if task is None or task.done():
            return
        timeout = self._settings.sync.shutdown_timeout
        log.info("shutdown_waiting_for_sync", timeout_seconds=timeout)
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if done:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        log.error(
            "sync_cancelled",
            reason="shutdown timeout",
            timeout_seconds=timeout,
            running_seconds=round(time.monotonic() - self._sync_started_at, 3),
        )
