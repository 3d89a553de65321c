"""Start the services, seed the table, run the children and report the ratios."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bench import dataset, report
from bench.child import ChildConfig
from bench.driver import SyncChildDriver
from bench.emulator import (
    EmulatorError,
    create_emulator,
    dynalite_installed,
    install_dynalite,
    resolve_choice,
)
from bench.processes import BenchmarkError, ChildProcess, run_child
from bench.pyspy import INSTALL_HINT as PYSPY_INSTALL_HINT
from bench.pyspy import ProfilerError, PySpyRecorder, categorize, find_py_spy
from tests.support.broker import BrokerStartError, MosquittoBroker
from tests.support.dynamo import (
    MotoServerError,
    create_events_table,
    dynamodb_client,
    isolate_aws_environment,
    put_raw_items,
)
from tests.support.pki import create_pki

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DOCS = REPOSITORY_ROOT / "docs" / "benchmarks.md"
# Concurrent BatchWriteItem streams while seeding; each sends 25 items a call.
SEED_STREAMS = 4
# eventsync's upper bound for mqtt.max_in_flight.
MAX_IN_FLIGHT = 1000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Benchmark eventsync's cold, warm and 1%%-change syncs against a bare"
            " aiobotocore scan, a bare aiomqtt publish loop and a naive sync"
            " without a cache, on a local DynamoDB emulator and mosquitto."
        ),
    )
    parser.add_argument(
        "--events",
        type=int,
        default=100_000,
        help="events in the table (default 100000)",
    )
    parser.add_argument(
        "--targets",
        type=int,
        default=10_000,
        help="targets the events are spread over (default 10000)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of each measured phase; the report gives the median (default 3)",
    )
    parser.add_argument(
        "--in-flight",
        type=int,
        default=20,
        help="publishes awaiting PUBACK at once, for eventsync and the baselines (default 20, eventsync's default)",
    )
    parser.add_argument(
        "--change-fraction",
        type=float,
        default=0.01,
        help="fraction of the targets changed before each change sync (default 0.01)",
    )
    parser.add_argument(
        "--emulator",
        choices=("auto", "dynalite", "moto"),
        default="auto",
        help="DynamoDB emulator; auto takes dynalite when node is on PATH (default auto)",
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="seed of the generated events (default 1)"
    )
    parser.add_argument(
        "--write-docs",
        nargs="?",
        const=str(DEFAULT_DOCS),
        default=None,
        metavar="PATH",
        help=f"write the results into PATH between its generated-section markers (default {DEFAULT_DOCS.relative_to(REPOSITORY_ROOT)})",
    )
    parser.add_argument(
        "--profile-syncs",
        type=int,
        default=0,
        metavar="N",
        help="after the measured warm syncs, run N more under py-spy and report where"
        f" their time goes (default 0; needs py-spy: {PYSPY_INSTALL_HINT})",
    )
    parser.add_argument(
        "--json", metavar="PATH", help="also write the raw results as JSON to PATH"
    )
    parser.add_argument(
        "--keep-workdir",
        action="store_true",
        help="keep the temporary folder with the logs, certificates and payloads",
    )
    return parser


@dataclass
class Timeline:
    """Wall time of each step of the whole run, for the run-time breakdown."""

    steps: list[tuple[str, float]] = field(default_factory=list)
    _started: float = field(default_factory=time.perf_counter)

    def mark(self, step: str) -> None:
        now = time.perf_counter()
        self.steps.append((step, now - self._started))
        self._started = now


async def seed(endpoint_url: str, items: list[dict[str, Any]]) -> None:
    """Write the items with BatchWriteItem in 25-item calls over a few streams."""
    await create_events_table(endpoint_url, dataset.TABLE_NAME)
    streams = [items[index::SEED_STREAMS] for index in range(SEED_STREAMS)]
    await asyncio.gather(
        *(put_raw_items(endpoint_url, dataset.TABLE_NAME, stream) for stream in streams)
    )


async def capacity_scan(endpoint_url: str) -> dict[str, Any]:
    """Scan with Select=COUNT and ReturnConsumedCapacity=TOTAL, eventually consistent.

    Returns the item count, the pages, and the capacity units the emulator
    reported, for comparison with the estimate from item sizes.
    """
    pages = 0
    items = 0
    units = 0.0
    async with dynamodb_client(endpoint_url) as client:
        paginator = client.get_paginator("scan")
        async for page in paginator.paginate(
            TableName=dataset.TABLE_NAME,
            Select="COUNT",
            ReturnConsumedCapacity="TOTAL",
            ConsistentRead=False,
        ):
            pages += 1
            items += page.get("Count", 0)
            units += page.get("ConsumedCapacity", {}).get("CapacityUnits", 0.0)
    return {"pages": pages, "items": items, "reported_read_units": units}


async def benchmark(arguments: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    timeline = Timeline()
    pki = create_pki(workdir / "pki")
    broker = MosquittoBroker(workdir / "broker", pki)
    emulator = create_emulator(arguments.emulator, workdir / "emulator")
    results: dict[str, Any] = {
        "parameters": {
            "events": arguments.events,
            "targets": arguments.targets,
            "repeats": arguments.repeats,
            "in_flight": arguments.in_flight,
            "change_fraction": arguments.change_fraction,
            "seed": arguments.seed,
        },
    }
    broker.start()
    try:
        emulator.start()
        try:
            results["emulator"] = emulator.version()
            timeline.mark("start PKI, mosquitto and the emulator")
            return await _measure(
                arguments, workdir, pki, broker, emulator, results, timeline
            )
        finally:
            emulator.stop()
    finally:
        broker.stop()


async def _measure(
    arguments: argparse.Namespace,
    workdir: Path,
    pki: Any,
    broker: MosquittoBroker,
    emulator: Any,
    results: dict[str, Any],
    timeline: Timeline,
) -> dict[str, Any]:
    endpoint_url = emulator.endpoint_url
    table = dataset.generate(
        arguments.events, arguments.targets, arguments.seed, time.time()
    )
    rounds = dataset.change_rounds(
        table, arguments.change_fraction, arguments.repeats, arguments.seed
    )
    sizes = [dataset.item_size(item) for item in table.items]
    print(
        f"seeding {len(table.items)} events over {len(table.targets)} targets into {results['emulator']} ...",
        flush=True,
    )
    await seed(endpoint_url, table.items)
    timeline.mark("seed the table")

    capacity = await capacity_scan(endpoint_url)
    if capacity["items"] != len(table.items):
        raise BenchmarkError(
            f"the table holds {capacity['items']} items, expected {len(table.items)}"
        )
    results["table"] = {
        "items": len(table.items),
        "targets": len(table.targets),
        "item_bytes_total": sum(sizes),
        "item_bytes_mean": statistics.fmean(sizes),
        "item_bytes_max": max(sizes),
        "scan_read_units_eventual": dataset.scan_read_units(sizes, consistent=False),
        "scan_read_units_strong": dataset.scan_read_units(sizes, consistent=True),
        **{f"emulator_{name}": value for name, value in capacity.items()},
    }
    timeline.mark("capacity scan (Select=COUNT)")

    config = ChildConfig(
        endpoint_url=endpoint_url,
        table=dataset.TABLE_NAME,
        broker_host=broker.host,
        broker_port=broker.port,
        pki={
            name: str(value)
            for name, value in vars(pki).items()
            if isinstance(value, Path)
        },
        in_flight=arguments.in_flight,
        repeats=arguments.repeats,
        payload_file=str(workdir / "payloads.pickle"),
        change_rounds=len(rounds),
        profile_syncs=arguments.profile_syncs,
    )

    print(
        "eventsync: cold, warm and change syncs, each cold one after a bare publish"
        " loop and each warm one after a bare scan ...",
        flush=True,
    )
    profiler = None
    if arguments.profile_syncs:
        profiler = PySpyRecorder(workdir / "warm.pyspy.txt", workdir / "py-spy.log")
    async with AsyncExitStack() as stack:
        scan_child = await stack.enter_async_context(
            ChildProcess("scan_child", config, workdir / "scan_child.log")
        )
        publish_child = await stack.enter_async_context(
            ChildProcess("publish_child", config, workdir / "publish_child.log")
        )
        await scan_child.expect("ready")
        await publish_child.expect("ready")
        driver = SyncChildDriver(
            endpoint_url,
            table,
            rounds,
            broker,
            pki,
            stack,
            scan_child,
            publish_child,
            profiler,
        )
        messages = await run_child(
            "sync_child", config, workdir / "sync_child.log", driver
        )
        for child in (scan_child, publish_child):
            await child.send("quit")
            await child.finish()
    syncs = [message for message in messages if message["event"] == "sync"]
    results["eventsync"] = {
        phase: [sync for sync in syncs if sync["phase"] == phase]
        for phase in ("cold", "warm", "change")
    }
    by_event = {message["event"]: message for message in messages}
    results["eventsync_started_rss_mb"] = by_event["started"]["rss_mb"]
    results["eventsync_connected_rss_mb"] = by_event["connected"]["rss_mb"]
    results["eventsync_max_rss_mb"] = by_event["done"]["max_rss_mb"]
    results["change_checks"] = driver.checks
    results["scan"] = driver.scans
    results["scan_max_rss_mb"] = scan_child.messages[-1]["max_rss_mb"]
    results["publish"] = driver.publishes
    results["publish_max_rss_mb"] = publish_child.messages[-1]["max_rss_mb"]
    if profiler is not None:
        categories, samples = categorize(profiler.output_path)
        results["profile"] = {
            "syncs": arguments.profile_syncs,
            "samples": samples,
            "categories": categories,
        }
    _check_eventsync(results, len(table.targets))
    timeline.mark("eventsync child with the bare scans and publish loops")

    print("naive sync ...", flush=True)
    naive = await run_child("naive_child", config, workdir / "naive_child.log")
    results["naive"] = [message for message in naive if message["event"] == "sync"]
    results["naive_max_rss_mb"] = naive[-1]["max_rss_mb"]
    timeline.mark("naive sync child")

    results["timeline"] = timeline.steps
    return results


def _check_eventsync(results: dict[str, Any], targets: int) -> None:
    for sync in results["eventsync"]["cold"]:
        if sync["published"] != targets or sync["failed"]:
            raise BenchmarkError(
                f"cold sync published {sync['published']} of {targets} topics, {sync['failed']} failed"
            )
    for sync in results["eventsync"]["warm"]:
        if sync["published"] or sync["failed"]:
            raise BenchmarkError(
                f"warm sync published {sync['published']} topics, expected none"
            )


def check_arguments(
    parser: argparse.ArgumentParser, arguments: argparse.Namespace
) -> None:
    """Exit with status 2 and a usage message when the sizes cannot work together."""
    if arguments.targets < 1:
        parser.error(f"--targets must be at least 1, got {arguments.targets}")
    if arguments.events < arguments.targets:
        parser.error(
            f"--events ({arguments.events}) must be at least --targets"
            f" ({arguments.targets}): every target needs one event"
        )
    if arguments.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {arguments.repeats}")
    if arguments.profile_syncs < 0:
        parser.error(
            f"--profile-syncs must be 0 or more, got {arguments.profile_syncs}"
        )
    if not 1 <= arguments.in_flight <= MAX_IN_FLIGHT:
        parser.error(
            f"--in-flight must be 1 to {MAX_IN_FLIGHT} (eventsync's limit),"
            f" got {arguments.in_flight}"
        )
    if not 0 < arguments.change_fraction <= 1:
        parser.error(
            f"--change-fraction must be above 0 and at most 1, got {arguments.change_fraction}"
        )
    # Each change sync changes its own targets, so the rounds must fit.
    per_round = max(1, round(arguments.targets * arguments.change_fraction))
    if per_round * arguments.repeats > arguments.targets:
        parser.error(
            f"{arguments.repeats} change syncs of {per_round} targets each need"
            f" {per_round * arguments.repeats} targets, but --targets is {arguments.targets}:"
            " lower --change-fraction or --repeats"
        )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    check_arguments(parser, arguments)
    if sys.platform != "linux":
        # The children read their RSS from /proc/self/status.
        print(
            "python -m bench: runs on Linux only, because it reads /proc/self/status",
            file=sys.stderr,
        )
        return 2
    started = time.perf_counter()
    load_at_start = os.getloadavg()
    try:
        if arguments.profile_syncs:
            find_py_spy()
        arguments.emulator = resolve_choice(arguments.emulator)
        # npm runs before the AWS environment is isolated, which removes the
        # proxy variables that npm may need to reach its registry.
        if arguments.emulator == "dynalite" and not dynalite_installed():
            print("installing dynalite: npm ci in bench/ ...", flush=True)
            install_dynalite()
    except (EmulatorError, ProfilerError) as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="eventsync-bench-"))
    # Dummy credentials, no AWS configuration files, no instance metadata; a
    # client without an explicit endpoint goes to a closed loopback port.
    monkeypatch = pytest.MonkeyPatch()
    isolate_aws_environment(monkeypatch, workdir / "empty-aws-config")
    try:
        results = asyncio.run(benchmark(arguments, workdir))
    except (
        BenchmarkError,
        EmulatorError,
        BrokerStartError,
        MotoServerError,
        ProfilerError,
    ) as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        print(f"python -m bench: logs are in {workdir}", file=sys.stderr)
        return 1
    finally:
        monkeypatch.undo()
    results["total_seconds"] = time.perf_counter() - started
    results["machine"] = report.describe_machine()
    results["machine"]["load_average_start"] = load_at_start
    results["command"] = "python -m bench " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )

    text = report.render(results)
    print(text)
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(results, indent=2) + "\n")
    failed_checks = [check for check in results["change_checks"] if not check["exact"]]
    if arguments.write_docs and not failed_checks:
        report.write_docs(Path(arguments.write_docs), text)
        print(f"wrote the results into {arguments.write_docs}")
    if arguments.keep_workdir or failed_checks:
        print(f"logs, certificates and payloads are in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    for check in failed_checks:
        print(
            f"python -m bench: change sync {check['run']} published {check['published']}"
            f" topics and a subscriber received {check['delivered']}, but"
            f" {check['changed_targets']} targets changed; missing {check['missing']},"
            f" unexpected {check['unexpected']}",
            file=sys.stderr,
        )
    if failed_checks and arguments.write_docs:
        print(
            f"python -m bench: {arguments.write_docs} left unchanged because a change check failed",
            file=sys.stderr,
        )
    return 1 if failed_checks else 0
