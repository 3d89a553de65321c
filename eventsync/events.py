"""The event model, and the parsing of DynamoDB items into events.

Items arrive in DynamoDB's typed form (`{"title": {"S": "Standup"}}`), as the
low-level client returns them. Parsing the typed form directly is cheaper than
deserializing every item first, and it lets an error name the type it found.
"""

from __future__ import annotations

import hashlib
import json
import marshal
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Any

from eventsync.encoding import envelope_size, format_utc
from eventsync.errors import InvalidItemError
from eventsync.topics import TopicTemplate, target_problem, topic_problem

JsonValue = None | bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"]

MAX_EVENT_ID_LENGTH = 128
# The range that `YYYY-MM-DDTHH:MM:SSZ` can show: 1970-01-01 up to 9999-12-31.
MIN_EPOCH_SECONDS = 0
MAX_EPOCH_SECONDS = 253_402_300_799
# DynamoDB nests maps and lists 32 levels deep at most.
MAX_DATA_DEPTH = 32
_MAX_TIME_TEXT_LENGTH = 64
_TYPE_NAMES = {
    "S": "String",
    "N": "Number",
    "B": "Binary",
    "BOOL": "Boolean",
    "NULL": "Null",
    "M": "Map",
    "L": "List",
    "SS": "String Set",
    "NS": "Number Set",
    "BS": "Binary Set",
}
# The encoding of eventsync.encoding.encode_json, built once: json.dumps with
# options other than the defaults builds a new encoder on every call.
_JSON_ENCODER = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False
)
# marshal format 2 writes no back-references, so equal items give equal bytes.
_MARSHAL_VERSION = 2
# Epoch-second Numbers up to this many ASCII digits convert to int exactly,
# which skips the Decimal round trip of the general case.
_MAX_PLAIN_DIGITS = 15


@dataclass(frozen=True, slots=True)
class Event:
    """One valid event of one target, with times in whole epoch seconds (UTC)."""

    target: str
    event_id: str
    starts_at: int
    ends_at: int
    expires_at: float | None
    # The event's compact JSON as it appears in a payload's `events` list.
    encoded: bytes


# Per target: why it is invalid (None when valid), and how many bytes a
# payload of that target leaves for one event.
TargetCheck = tuple[str | None, int]


@dataclass(frozen=True, slots=True)
class ItemRules:
    """The settings an item is checked against besides its own fields."""

    timezone: tzinfo
    topic_template: TopicTemplate
    max_payload_bytes: int


def parse_item(
    item: Mapping[str, Any],
    rules: ItemRules,
    target_checks: dict[str, TargetCheck] | None = None,
) -> Event:
    """Check one DynamoDB item against the item rules and build its event.

    `target_checks` keeps the checks of each target seen, for the items of a
    scan to share; it must be used with one `rules` only. Raises
    InvalidItemError naming the item and the first rule it breaks.
    """
    target = _key_text(item, "target")
    event_id = _key_text(item, "event_id")

    def invalid(reason: str) -> InvalidItemError:
        return InvalidItemError(target, event_id, reason)

    check = None if target_checks is None else target_checks.get(target)
    if check is None:
        check = check_target(target, rules)
        if target_checks is not None:
            target_checks[target] = check
    problem, room = check
    if problem is not None:
        raise invalid(problem)
    if not 1 <= len(event_id) <= MAX_EVENT_ID_LENGTH:
        raise invalid(
            f"event_id must be 1 to {MAX_EVENT_ID_LENGTH} characters, got {len(event_id)}"
        )

    try:
        title = _string(item, "title")
        if title is None:
            raise ValueError("title is missing")
        if not title.strip():
            raise ValueError("title is empty")
        starts_at = _instant(item, "starts_at", rules.timezone)
        ends_at = _instant(item, "ends_at", rules.timezone)
        if ends_at <= starts_at:
            raise ValueError(
                f"ends_at {format_utc(ends_at)} is not after starts_at {format_utc(starts_at)}"
            )
        description = _string(item, "description")
        location = _string(item, "location")
        data = _data(item)
        expires_at = _expires_at(item)
    except ValueError as exc:
        raise invalid(str(exc)) from None

    fields: dict[str, JsonValue] = {
        "id": event_id,
        "title": title,
        "starts_at": format_utc(starts_at),
        "ends_at": format_utc(ends_at),
    }
    if description is not None:
        fields["description"] = description
    if location is not None:
        fields["location"] = location
    if data is not None:
        fields["data"] = data
    try:
        encoded = _JSON_ENCODER.encode(fields).encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (from a `\ud800` escape) cannot be written as UTF-8.
        raise invalid("a text field is not valid Unicode") from None
    except ValueError:
        # Python writes no int of more than sys.get_int_max_str_digits() digits.
        raise invalid("a Number in data has too many digits for JSON") from None

    if len(encoded) > room:
        raise invalid(
            f"event is {len(encoded)} bytes as JSON, more than the {room} bytes "
            f"a payload of at most {rules.max_payload_bytes} bytes leaves for it"
        )
    return Event(target, event_id, starts_at, ends_at, expires_at, encoded)


class ItemParser:
    """Parses the items of successive scans, reusing the events of unchanged items.

    An item that is the same as in the previous scan gets the previous scan's
    Event back without being parsed again, which makes a sync of an unchanged
    table cost little more than the scan itself. Items are matched by a
    128-bit BLAKE2b digest of their marshal serialization, which is about
    twice as fast as repr, and the same digest the published cache trusts.
    An item that is not a plain dict, or that marshal cannot serialize, is
    parsed every time, and so is an invalid item, which is rejected every
    time.
    """

    def __init__(self, rules: ItemRules) -> None:
        self.rules = rules
        self._previous: dict[bytes, Event] = {}
        self._current: dict[bytes, Event] = {}
        self._target_checks: dict[str, TargetCheck] = {}

    def start_scan(self) -> None:
        """Forget the events of an unfinished scan and the per-target checks."""
        self._current = {}
        self._target_checks = {}

    def finish_scan(self) -> None:
        """Keep the events of this scan, and only those, for the next one."""
        self._previous = self._current
        self._current = {}
        self._target_checks = {}

    def parse(self, item: Mapping[str, Any]) -> Event:
        """Return the event of `item`, as parse_item would; raise InvalidItemError."""
        if type(item) is not dict:
            return parse_item(item, self.rules, self._target_checks)
        try:
            serialized = marshal.dumps(item, _MARSHAL_VERSION)
        except ValueError:
            # Something marshal cannot write, such as a Decimal or a set.
            return parse_item(item, self.rules, self._target_checks)
        key = hashlib.blake2b(serialized, digest_size=16).digest()
        event = self._previous.get(key)
        if event is None:
            event = parse_item(item, self.rules, self._target_checks)
        self._current[key] = event
        return event


def check_target(target: str, rules: ItemRules) -> TargetCheck:
    """Return why `target` or its topic is invalid (None when valid), and its room.

    The room is how many bytes a payload of `target` leaves for one event.
    """
    problem = target_problem(target)
    if problem is None:
        problem = topic_problem(rules.topic_template.render(target))
    if problem is not None:
        # An invalid target may not even encode as UTF-8, so it gets no room.
        return problem, 0
    return None, rules.max_payload_bytes - envelope_size(target)


def _key_text(item: Mapping[str, Any], name: str) -> str:
    """Return a key attribute as text, even when it is missing or mistyped.

    The text names the item in the warning, so a broken key must not stop the
    warning from being written.
    """
    attribute = item.get(name)
    code, value = _typed(attribute)
    if code == "S" and type(value) is str:
        return value
    other_target = item.get("target") if name == "event_id" else item.get("event_id")
    other = _shown(other_target)
    if attribute is None:
        found = "missing"
    else:
        found = f"{_type_name(attribute)}, not a String"
    message = f"{name} is {found}"
    if name == "target":
        raise InvalidItemError("?", other, message)
    raise InvalidItemError(_shown(item.get("target")), "?", message)


def _shown(attribute: Any) -> str:
    if isinstance(attribute, Mapping) and isinstance(attribute.get("S"), str):
        return str(attribute["S"])
    return "?"


def _typed(attribute: Any) -> tuple[str, Any]:
    """Split a typed value such as `{"S": "x"}` into its type code and value."""
    # The low-level client returns plain dicts; the type check comes first
    # because it is much cheaper than the Mapping ABC check.
    if (type(attribute) is dict or isinstance(attribute, Mapping)) and len(
        attribute
    ) == 1:
        ((code, value),) = attribute.items()
        return str(code), value
    return "", None


def _type_name(attribute: Any) -> str:
    """Name the type of a typed value with its article, such as `a Map`."""
    code, _ = _typed(attribute)
    if not code:
        return "a malformed attribute"
    if code in _TYPE_NAMES:
        return f"a {_TYPE_NAMES[code]}"
    return f"an attribute of type {code!r}"


def _string(item: Mapping[str, Any], name: str) -> str | None:
    attribute = item.get(name)
    if attribute is None:
        return None
    code, value = _typed(attribute)
    if code == "S" and isinstance(value, str):
        return value
    raise ValueError(f"{name} must be a String, got {_type_name(attribute)}")


def _instant(item: Mapping[str, Any], name: str, zone: tzinfo) -> int:
    """Read an ISO 8601 String or a Number of epoch seconds as whole epoch seconds."""
    attribute = item.get(name)
    if attribute is None:
        raise ValueError(f"{name} is missing")
    code, value = _typed(attribute)
    if (
        code == "N"
        and type(value) is str
        and len(value) <= _MAX_PLAIN_DIGITS
        and value.isascii()
        and value.isdigit()
    ):
        # Whole seconds in range come out as the general case computes them.
        whole = int(value)
        if MIN_EPOCH_SECONDS <= whole <= MAX_EPOCH_SECONDS:
            return whole
    if code == "N":
        seconds = _number(value, name)
    elif code == "S" and isinstance(value, str):
        seconds = _iso_seconds(value, name, zone)
    else:
        raise ValueError(
            f"{name} must be an ISO 8601 String or a Number of epoch seconds, "
            f"got {_type_name(attribute)}"
        )
    whole = math.floor(seconds)
    if not MIN_EPOCH_SECONDS <= whole <= MAX_EPOCH_SECONDS:
        raise ValueError(f"{name} {seconds} is outside the years 1970 to 9999")
    return whole


def _iso_seconds(text: str, name: str, zone: tzinfo) -> float:
    if len(text) > _MAX_TIME_TEXT_LENGTH:
        raise ValueError(f"{name} is not an ISO 8601 time: {len(text)} characters long")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{name} is not an ISO 8601 time: {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    try:
        return moment.timestamp()
    except (OverflowError, ValueError):
        raise ValueError(f"{name} {text!r} is outside the years 1970 to 9999") from None


def _number(text: Any, name: str) -> float:
    if not isinstance(text, str):
        raise ValueError(f"{name} is a malformed Number")
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{name} is not a number: {text[:40]!r}") from None
    if not value.is_finite():
        raise ValueError(f"{name} is not a finite number: {text[:40]!r}")
    if not MIN_EPOCH_SECONDS <= value <= MAX_EPOCH_SECONDS + 1:
        raise ValueError(f"{name} {text[:40]} is outside the years 1970 to 9999")
    return float(value)


def _expires_at(item: Mapping[str, Any]) -> float | None:
    attribute = item.get("expires_at")
    if attribute is None:
        return None
    code, value = _typed(attribute)
    if code != "N" or not isinstance(value, str):
        raise ValueError(
            f"expires_at must be a Number of epoch seconds, got {_type_name(attribute)}"
        )
    try:
        seconds = Decimal(value)
    except InvalidOperation:
        raise ValueError(f"expires_at is not a number: {value[:40]!r}") from None
    if not seconds.is_finite():
        raise ValueError("expires_at is not a finite number")
    return float(seconds)


def _data(item: Mapping[str, Any]) -> dict[str, JsonValue] | None:
    attribute = item.get("data")
    if attribute is None:
        return None
    code, _ = _typed(attribute)
    if code != "M":
        raise ValueError(f"data must be a Map, got {_type_name(attribute)}")
    value = _json_value(attribute, "data", 1)
    assert isinstance(value, dict)
    return value


def _json_value(attribute: Any, path: str, depth: int) -> JsonValue:
    """Convert a typed DynamoDB value into plain JSON, with map keys sorted.

    Sorted keys keep a payload byte-for-byte the same whatever order DynamoDB
    returns map entries in.
    """
    if depth > MAX_DATA_DEPTH:
        raise ValueError(f"{path} is nested more than {MAX_DATA_DEPTH} levels deep")
    code, value = _typed(attribute)
    if code == "S" and isinstance(value, str):
        return value
    if code == "N" and isinstance(value, str):
        return _json_number(value, path)
    if code == "BOOL" and isinstance(value, bool):
        return value
    if code == "NULL":
        return None
    if code == "M" and isinstance(value, Mapping):
        return {
            str(key): _json_value(value[key], f"{path}.{key}", depth + 1)
            for key in sorted(value)
        }
    if code == "L" and isinstance(value, list):
        return [
            _json_value(element, f"{path}[{index}]", depth + 1)
            for index, element in enumerate(value)
        ]
    raise ValueError(f"{path} is {_type_name(attribute)}, which JSON cannot carry")


def _json_number(text: str, path: str) -> int | float:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{path} is not a number: {text[:40]!r}") from None
    if not value.is_finite():
        raise ValueError(f"{path} is not a finite number")
    if (
        value == value.to_integral_value()
        and "e" not in text.lower()
        and "." not in text
    ):
        return int(value)
    # NOTE: a Number with more than 17 significant digits loses precision here,
    # because JSON readers on devices parse fractions as IEEE 754 doubles anyway.
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{path} is too large for JSON")
    return result
