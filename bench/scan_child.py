"""Scan the table with a bare aiobotocore paginator, once per `scan` command.

The request is eventsync's: the table name and ConsistentRead=False, with no
parsing beyond counting the items. One unmeasured scan comes first, as
eventsync's measured syncs follow an unmeasured one. The parent sends `scan`
right before each measured warm sync of eventsync, so that both see the same
load on a shared machine, and `quit` at the end.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiobotocore.session import get_session

from bench.child import ChildConfig, fail, read_command
from bench.measure import Stopwatch, emit, max_rss_mb, sample_dict
from tests.support.dynamo import REGION


async def scan_once(client: Any, table: str) -> tuple[int, int]:
    """Scan the whole table and return the number of items and of pages."""
    items = 0
    pages = 0
    paginator = client.get_paginator("scan")
    async for page in paginator.paginate(TableName=table, ConsistentRead=False):
        pages += 1
        items += len(page.get("Items", []))
    return items, pages


async def main() -> None:
    config = ChildConfig.from_argv()
    session = get_session()
    async with session.create_client(
        "dynamodb", region_name=REGION, endpoint_url=config.endpoint_url
    ) as client:
        await scan_once(client, config.table)
        emit({"event": "ready"})
        run = 0
        while (command := await read_command()) != "quit":
            if command != "scan":
                fail(f"expected 'scan' or 'quit' from the parent, got {command!r}")
            watch = Stopwatch()
            watch.start()
            items, pages = await scan_once(client, config.table)
            sample = watch.stop()
            emit(
                {
                    "event": "scan",
                    **sample_dict(sample, run=run, items=items, pages=pages),
                }
            )
            run += 1
    emit({"event": "done", "max_rss_mb": max_rss_mb()})


if __name__ == "__main__":
    asyncio.run(main())
