"""Publish the payloads of eventsync's recording cold sync with a bare aiomqtt loop.

Same bytes, QoS 1, retained, and the same number awaiting PUBACK at once as
eventsync, with no rate limit, over one connection. The parent sends
`publish` right before each measured cold sync of eventsync, so that both see
the same load on a shared machine, and `quit` at the end. The first `publish`
reads the payload file, which exists only once eventsync's recording sync
ran, and publishes everything once unmeasured, as eventsync's measured cold
syncs follow its recording sync.
"""

from __future__ import annotations

import asyncio
import pickle
from pathlib import Path
from typing import Any

from bench.child import ChildConfig, bare_client, fail, publish_all, read_command
from bench.measure import Stopwatch, emit, max_rss_mb, sample_dict


def load_payloads(path: Path) -> list[tuple[str, bytes]]:
    """Read the (topic, body) pickles that the eventsync child streamed to `path`."""
    messages: list[tuple[str, bytes]] = []
    with path.open("rb") as file:
        while True:
            try:
                # The file is this benchmark's own output, written moments ago.
                pair: Any = pickle.load(file)  # noqa: S301
            except EOFError:
                return messages
            messages.append(pair)


async def main() -> None:
    config = ChildConfig.from_argv()
    messages: list[tuple[str, bytes]] = []
    async with bare_client(config, "bench-bare-publish") as client:
        emit({"event": "ready"})
        run = 0
        while (command := await read_command()) != "quit":
            if command != "publish":
                fail(f"expected 'publish' or 'quit' from the parent, got {command!r}")
            if not messages:
                messages = load_payloads(Path(config.payload_file))
                if not messages:
                    fail(f"no payloads in {config.payload_file}")
                await publish_all(client, messages, config.in_flight)
            watch = Stopwatch()
            watch.start()
            acknowledged, failed = await publish_all(client, messages, config.in_flight)
            sample = watch.stop()
            if failed:
                fail(f"{failed} of {len(messages)} bare publishes failed")
            emit(
                {
                    "event": "publish",
                    **sample_dict(
                        sample,
                        run=run,
                        published=acknowledged,
                        payload_bytes=sum(len(body) for _, body in messages),
                    ),
                }
            )
            run += 1
    emit({"event": "done", "max_rss_mb": max_rss_mb()})


if __name__ == "__main__":
    asyncio.run(main())
