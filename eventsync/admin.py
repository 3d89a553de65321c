"""Operator commands on the table: create it, and put, list and delete events."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, TextIO

from eventsync.config import CoreSettings, Settings
from eventsync.errors import InvalidItemError
from eventsync.events import parse_item
from eventsync.store import EventStore
from eventsync.sync import item_rules


def to_typed(value: Any, path: str = "data") -> dict[str, Any]:
    """Convert plain JSON into DynamoDB's typed form (`"x"` becomes `{"S": "x"}`)."""
    if isinstance(value, bool):
        return {"BOOL": value}
    if value is None:
        return {"NULL": True}
    if isinstance(value, str):
        return {"S": value}
    if isinstance(value, int | float):
        return {"N": str(value)}
    if isinstance(value, list):
        return {
            "L": [
                to_typed(element, f"{path}[{index}]")
                for index, element in enumerate(value)
            ]
        }
    if isinstance(value, dict):
        return {
            "M": {
                str(key): to_typed(element, f"{path}.{key}")
                for key, element in value.items()
            }
        }
    raise ValueError(
        f"{path} has a value of type {type(value).__name__}, which DynamoDB cannot store"
    )


def from_typed(attribute: Mapping[str, Any]) -> Any:
    """Convert a typed DynamoDB value into plain JSON, for listing items."""
    ((code, value),) = attribute.items()
    if code in ("S", "BOOL"):
        return value
    if code == "NULL":
        return None
    if code == "N":
        number = Decimal(value)
        return int(number) if number == number.to_integral_value() else float(number)
    if code == "M":
        return {key: from_typed(element) for key, element in value.items()}
    if code == "L":
        return [from_typed(element) for element in value]
    if code in ("SS", "NS"):
        return sorted(value)
    return f"<{code}>"


def time_attribute(text: str) -> dict[str, str]:
    """Store a time as a Number when it is one, else as an ISO 8601 String."""
    try:
        Decimal(text)
    except ArithmeticError:
        return {"S": text}
    return {"N": text}


def build_item(
    *,
    target: str,
    event_id: str,
    title: str,
    starts_at: str,
    ends_at: str,
    description: str | None = None,
    location: str | None = None,
    data: str | None = None,
    expires_at: str | None = None,
) -> dict[str, Any]:
    """Build a table item from command-line text; raise ValueError on bad JSON."""
    item: dict[str, Any] = {
        "target": {"S": target},
        "event_id": {"S": event_id},
        "title": {"S": title},
        "starts_at": time_attribute(starts_at),
        "ends_at": time_attribute(ends_at),
    }
    if description is not None:
        item["description"] = {"S": description}
    if location is not None:
        item["location"] = {"S": location}
    if data is not None:
        try:
            parsed = json.loads(data)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--data is not valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise ValueError(
                f"--data must be a JSON object, got {type(parsed).__name__}"
            )
        item["data"] = to_typed(parsed)
    if expires_at is not None:
        item["expires_at"] = {"N": expires_at}
    return item


def validate_item(item: Mapping[str, Any], settings: Settings | CoreSettings) -> None:
    """Check an item with the same rules the sync applies; raise InvalidItemError."""
    parse_item(item, item_rules(settings))


async def list_events(
    store: EventStore,
    settings: Settings | CoreSettings,
    target: str | None,
    output: TextIO = sys.stdout,
) -> int:
    """Print each item as one JSON line, with `invalid_reason` on the invalid ones.

    Returns the number of items printed.
    """
    if target is not None:
        pages = [await store.query_target(target)]
    else:
        pages = [page async for page in store.scan_pages()]
    rules = item_rules(settings)
    count = 0
    for page in pages:
        for item in sorted(page, key=_item_key):
            line = {name: from_typed(value) for name, value in sorted(item.items())}
            try:
                parse_item(item, rules)
            except InvalidItemError as exc:
                line["invalid_reason"] = exc.reason
            output.write(json.dumps(line, ensure_ascii=False) + "\n")
            count += 1
    return count


def _item_key(item: Mapping[str, Any]) -> tuple[str, str]:
    return (
        str(item.get("target", {}).get("S", "")),
        str(item.get("event_id", {}).get("S", "")),
    )
