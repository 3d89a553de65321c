"""The naive sync: scan, build every payload and publish every topic, with no cache.

It reads and builds with eventsync's own functions, so the payloads are the
same bytes, and publishes with the bare aiomqtt loop.
"""

from __future__ import annotations

import asyncio
import sys
import time

from bench.child import ChildConfig, bare_client, eventsync_settings, fail, publish_all
from bench.measure import Stopwatch, emit, max_rss_mb, sample_dict
from eventsync.logs import configure_logging
from eventsync.store import EventStore
from eventsync.sync import Syncer, item_rules, read_table


async def main() -> None:
    config = ChildConfig.from_argv()
    configure_logging("info", "json", stream=sys.stderr)
    settings = eventsync_settings(config, client_id="bench-naive")
    rules = item_rules(settings)
    async with (
        EventStore(settings.dynamodb) as store,
        bare_client(config, "bench-naive") as client,
    ):
        for run in range(config.repeats):
            watch = Stopwatch()
            watch.start()
            snapshot = await read_table(store, rules)
            # A Syncer without a connection only builds payloads; its
            # cache is new and empty, so it yields every target's payload.
            builder = Syncer(settings, store, None)
            messages = [
                (payload.topic, payload.body)
                for payload in builder.payloads(snapshot, time.time())
            ]
            acknowledged, failed = await publish_all(client, messages, config.in_flight)
            sample = watch.stop()
            if failed:
                fail(f"{failed} of {len(messages)} naive publishes failed")
            emit(
                {
                    "event": "sync",
                    **sample_dict(
                        sample,
                        run=run,
                        published=acknowledged,
                        events_read=snapshot.items_read,
                    ),
                }
            )
    emit({"event": "done", "max_rss_mb": max_rss_mb()})


if __name__ == "__main__":
    asyncio.run(main())
