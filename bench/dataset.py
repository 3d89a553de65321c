"""The benchmark table: generated events, their DynamoDB item sizes and the 1% changes.

Items are in DynamoDB's typed JSON form, as `tests.support.dynamo.put_raw_items`
writes them. Every time-dependent instant of an item (its end, its entry into
the 7-day lookahead window, its expiry) stays out of a guard window around the
seeding time, so no payload changes by itself while the benchmark runs and a
warm sync has nothing to publish.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from eventsync.encoding import format_utc
from eventsync.topics import TopicTemplate

TABLE_NAME = "active_events"
# The topic of each target, as eventsync's default mqtt.topic_template renders it.
TOPIC_TEMPLATE = TopicTemplate.parse("events/{target}")
HOUR = 3600
DAY = 86_400
# eventsync's default sync.lookahead; instants `starts_at - LOOKAHEAD` are when
# an event enters its payload.
LOOKAHEAD_SECONDS = 7 * DAY
# No instant falls from GUARD_BEFORE before the seeding time to GUARD_AFTER
# after it, so a benchmark run shorter than GUARD_AFTER sees stable payloads.
GUARD_BEFORE_SECONDS = 10 * 60
GUARD_AFTER_SECONDS = 6 * HOUR
# DynamoDB returns at most 1 MB of items per Scan page (Scan API reference).
SCAN_PAGE_MAX_BYTES = 1024 * 1024
# A Scan consumes one read capacity unit per 4 KB of the items it reads in a
# page, strongly consistent, and half of that eventually consistent.
READ_UNIT_BYTES = 4096

_WORDS = [
    "standup",
    "planning",
    "review",
    "retro",
    "sync",
    "budget",
    "design",
    "security",
    "onboarding",
    "training",
    "workshop",
    "all-hands",
    "interview",
    "lunch",
    "demo",
    "roadmap",
    "audit",
    "support",
    "release",
    "incident",
    "customer",
    "partner",
    "board",
    "quarterly",
    "weekly",
]
_ROOMS = ("Hall", "Room 4.12", "Atrium", "Studio B", "Kitchen", "Lab 2")


@dataclass(frozen=True)
class Table:
    """The generated items, grouped so that changes can find an item per target."""

    items: list[dict[str, Any]]
    targets: list[str]
    # Index into `items` of one event per target that is inside the window
    # for the whole run, so changing its title always changes the payload.
    window_item_by_target: dict[str, int]
    seeded_at: int


def target_name(index: int) -> str:
    """Return the target of index `index`, such as `site-07/room-00042`."""
    return f"site-{index % 50:02d}/room-{index:05d}"


def generate(events: int, targets: int, seed: int, now: float) -> Table:
    """Generate `events` items spread evenly over `targets` targets."""
    if targets < 1 or events < targets:
        raise ValueError(
            f"invalid size: need at least one event per target, got {events} events"
            f" over {targets} targets"
        )
    rng = random.Random(seed)
    base = int(now)
    names = [target_name(index) for index in range(targets)]
    items: list[dict[str, Any]] = []
    window_item_by_target: dict[str, int] = {}
    for number in range(events):
        target_index = number % targets
        target = names[target_index]
        in_window = number < targets
        item = _event_item(rng, target, f"ev-{number:07d}", base, in_window=in_window)
        if in_window:
            window_item_by_target[target] = len(items)
        items.append(item)
    return Table(items, names, window_item_by_target, base)


def _event_item(
    rng: random.Random, target: str, event_id: str, base: int, *, in_window: bool
) -> dict[str, Any]:
    while True:
        if in_window:
            # Started up to 3 hours ago and ends 7 to 30 hours from now.
            starts_at = base - rng.randint(0, 3 * HOUR)
            ends_at = base + rng.randint(7 * HOUR, 30 * HOUR)
        else:
            starts_at = base + rng.randint(-2 * DAY, 12 * DAY)
            ends_at = starts_at + rng.choice((15, 30, 45, 60, 90, 120, 180)) * 60
        expires_at = ends_at + 30 * DAY if rng.random() < 0.5 else None
        instants = [ends_at, starts_at - LOOKAHEAD_SECONDS]
        if expires_at is not None:
            instants.append(expires_at)
        if not any(_in_guard(instant, base) for instant in instants):
            break

    item: dict[str, Any] = {
        "target": {"S": target},
        "event_id": {"S": event_id},
        "title": {"S": _title(rng)},
    }
    # Both time forms that eventsync reads: epoch seconds and ISO 8601 text.
    if rng.random() < 0.6:
        item["starts_at"] = {"N": str(starts_at)}
        item["ends_at"] = {"N": str(ends_at)}
    else:
        item["starts_at"] = {"S": format_utc(starts_at)}
        item["ends_at"] = {"S": format_utc(ends_at)}
    if rng.random() < 0.5:
        item["location"] = {"S": rng.choice(_ROOMS)}
    if rng.random() < 0.3:
        item["description"] = {"S": " ".join(rng.choices(_WORDS, k=12))}
    if rng.random() < 0.2:
        item["data"] = {
            "M": {
                "organizer": {"S": f"user{rng.randint(1, 5000)}@example.com"},
                "attendees": {"N": str(rng.randint(2, 40))},
                "online": {"BOOL": rng.random() < 0.5},
            }
        }
    if expires_at is not None:
        item["expires_at"] = {"N": str(expires_at)}
    return item


def _in_guard(instant: int, base: int) -> bool:
    return base - GUARD_BEFORE_SECONDS <= instant <= base + GUARD_AFTER_SECONDS


def _title(rng: random.Random) -> str:
    words = rng.sample(_WORDS, k=rng.randint(1, 3))
    return " ".join(words).capitalize() + f" #{rng.randint(1, 999)}"


def change_rounds(
    table: Table, fraction: float, rounds: int, seed: int
) -> list[list[str]]:
    """Pick `rounds` disjoint sets of targets, each `fraction` of all targets."""
    per_round = max(1, round(len(table.targets) * fraction))
    if per_round * rounds > len(table.targets):
        raise ValueError(
            f"cannot pick {rounds} disjoint sets of {per_round} targets"
            f" from {len(table.targets)} targets"
        )
    rng = random.Random(seed + 1)
    chosen = rng.sample(table.targets, per_round * rounds)
    return [
        sorted(chosen[index * per_round : (index + 1) * per_round])
        for index in range(rounds)
    ]


def changed_items(
    table: Table, targets: Sequence[str], round_number: int
) -> Iterator[dict[str, Any]]:
    """Yield, for each target, its in-window item with a new title."""
    for target in targets:
        item = dict(table.items[table.window_item_by_target[target]])
        title = item["title"]["S"]
        item["title"] = {"S": f"{title} (moved, change {round_number + 1})"}
        yield item


# Item size, following "DynamoDB item sizes and formats" in the DynamoDB
# Developer Guide. The guide gives the size of a Number only approximately,
# so these sizes are estimates.


def item_size(item: Mapping[str, Any]) -> int:
    """Return the estimated size of a typed item in bytes, as DynamoDB counts it."""
    return sum(
        len(name.encode("utf-8")) + _value_size(value) for name, value in item.items()
    )


def _value_size(value: Mapping[str, Any]) -> int:
    ((code, content),) = value.items()
    if code == "S":
        return len(content.encode("utf-8"))
    if code == "N":
        return _number_size(content)
    if code == "B":
        return len(content)
    if code in ("BOOL", "NULL"):
        return 1
    if code == "M":
        return 3 + sum(
            len(name.encode("utf-8")) + _value_size(element) + 1
            for name, element in content.items()
        )
    if code == "L":
        return 3 + sum(_value_size(element) + 1 for element in content)
    if code == "SS":
        return sum(len(element.encode("utf-8")) for element in content)
    if code == "NS":
        return sum(_number_size(element) for element in content)
    raise ValueError(f"unknown attribute type {code!r}")


def _number_size(text: str) -> int:
    digits = Decimal(text).normalize().as_tuple().digits
    significant = len(digits) if any(digits) else 1
    return math.ceil(significant / 2) + 1


def scan_read_units(sizes: Sequence[int], *, consistent: bool) -> float:
    """Estimate the read capacity units of one full Scan over items of `sizes`.

    Items are packed in order into pages of at most 1 MB. Each page consumes
    its total size rounded up to 4 KB, one unit per 4 KB when strongly
    consistent and half a unit when eventually consistent.
    """
    units = 0
    page = 0
    for size in sizes:
        if page and page + size > SCAN_PAGE_MAX_BYTES:
            units += math.ceil(page / READ_UNIT_BYTES)
            page = 0
        page += size
    if page:
        units += math.ceil(page / READ_UNIT_BYTES)
    return float(units) if consistent else units / 2
