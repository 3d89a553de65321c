"""Payload building: window, order, limits, next_change_at and the exact bytes."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from eventsync.encoding import PAYLOAD_TAIL_MAX, payload_head
from eventsync.events import MAX_EPOCH_SECONDS, Event, ItemRules, parse_item
from eventsync.payloads import (
    PayloadRules,
    build_payload,
    build_vanished_payload,
    payload_digest,
)
from eventsync.topics import TopicTemplate
from tests.support.factories import event_item

TARGET = "lobby"
TOPIC = "events/lobby"
DAY = 86400
UTC_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
PROPERTY_SETTINGS = settings(max_examples=200, deadline=None)


def make_event(
    event_id: str,
    starts_at: int,
    ends_at: int,
    *,
    expires_at: float | None = None,
    max_payload_bytes: int = 131_072,
    **attributes: Any,
) -> Event:
    """Build an event of lobby the way a scan does, through parse_item."""
    item = event_item(TARGET, event_id, starts_at, ends_at, **attributes)
    if expires_at is not None:
        item["expires_at"] = {"N": str(expires_at)}
    rules = ItemRules(
        timezone=ZoneInfo("UTC"),
        topic_template=TopicTemplate.parse("events/{target}"),
        max_payload_bytes=max_payload_bytes,
    )
    return parse_item(item, rules)


def payload_rules(
    lookahead: float = 7 * DAY,
    grace: float = 0,
    max_events: int = 100,
    max_payload_bytes: int = 131_072,
) -> PayloadRules:
    return PayloadRules(
        lookahead_seconds=lookahead,
        grace_seconds=grace,
        max_events=max_events,
        max_payload_bytes=max_payload_bytes,
    )


def build(events: list[Event], now: float, rules: PayloadRules) -> dict[str, Any]:
    """Build the payload and return its JSON document."""
    body = build_payload(TARGET, TOPIC, events, now, rules).body
    document: dict[str, Any] = json.loads(body)
    return document


def event_ids(events: list[Event], now: float, rules: PayloadRules) -> list[str]:
    return [event["id"] for event in build(events, now, rules)["events"]]


def epoch(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


def test_build_payload_readme_example() -> None:
    event = make_event(
        "standup",
        epoch("2026-12-04T09:00:00"),
        epoch("2026-12-04T09:15:00"),
        title="Standup",
        location={"S": "Hall"},
    )

    payload = build_payload(
        TARGET, TOPIC, [event], epoch("2026-12-04T08:00:00"), payload_rules()
    )

    assert payload.body == (
        b'{"version":1,"target":"lobby","events":[{"id":"standup","title":"Standup",'
        b'"starts_at":"2026-12-04T09:00:00Z","ends_at":"2026-12-04T09:15:00Z",'
        b'"location":"Hall"}],"next_change_at":"2026-12-04T09:15:00Z"}'
    )
    assert payload.topic == TOPIC
    assert payload.target == TARGET
    assert payload.event_count == 1
    assert payload.dropped == 0
    assert payload.vanished is False


def test_build_payload_key_order() -> None:
    events = [make_event(f"e{index}", 100 + index, 200) for index in range(3)]

    document = build(events, 150, payload_rules(max_events=2))

    assert list(document) == [
        "version",
        "target",
        "events",
        "next_change_at",
        "truncated",
    ]
    assert document["version"] == 1
    assert document["truncated"] is True


def test_build_payload_event_key_order() -> None:
    event = make_event(
        "e",
        100,
        200,
        data={"M": {"k": {"N": "1"}}},
        location={"S": "Hall"},
        description={"S": "Text"},
    )

    document = build([event], 150, payload_rules())

    assert list(document["events"][0]) == [
        "id",
        "title",
        "starts_at",
        "ends_at",
        "description",
        "location",
        "data",
    ]


def test_build_payload_is_compact_utf8() -> None:
    event = make_event("e", 100, 200, title="Café ☕", location={"S": "Salle 2"})

    body = build_payload(TARGET, TOPIC, [event], 150, payload_rules()).body

    assert "Café ☕".encode() in body
    assert b"\\u" not in body
    assert b'": ' not in body
    assert b", " not in body
    assert body.decode("utf-8")


def test_build_payload_without_events() -> None:
    payload = build_payload(TARGET, TOPIC, [], 150, payload_rules())

    assert payload.body == (
        b'{"version":1,"target":"lobby","events":[],"next_change_at":null}'
    )
    assert payload.event_count == 0
    assert payload.next_change_at is None


def test_build_payload_drops_event_ended_at_now() -> None:
    events = [make_event("ended", 100, 200), make_event("running", 100, 201)]

    ids = event_ids(events, 200, payload_rules())

    assert ids == ["running"]


def test_build_payload_grace_keeps_ended_event() -> None:
    events = [make_event("ended", 100, 200)]
    rules = payload_rules(grace=60)

    during_grace = event_ids(events, 259, rules)
    after_grace = event_ids(events, 260, rules)

    assert during_grace == ["ended"]
    assert after_grace == []


def test_build_payload_lookahead_edge() -> None:
    events = [make_event("inside", 1099, 2000), make_event("outside", 1100, 2000)]

    ids = event_ids(events, 100, payload_rules(lookahead=1000))

    assert ids == ["inside"]


def test_build_payload_drops_expired_event() -> None:
    events = [
        make_event("expired", 100, 200, expires_at=150),
        make_event("expiring", 100, 200, expires_at=150.5),
        make_event("lasting", 100, 200, expires_at=1_000_000),
    ]

    ids = event_ids(events, 150, payload_rules())

    assert ids == ["expiring", "lasting"]


def test_build_payload_sorts_by_start_then_id() -> None:
    events = [
        make_event("b", 120, 200),
        make_event("c", 110, 200),
        make_event("a", 120, 200),
        make_event("B", 120, 200),
    ]

    ids = event_ids(events, 150, payload_rules())

    assert ids == ["c", "B", "a", "b"]


def test_build_payload_truncates_furthest_first() -> None:
    events = [make_event(f"e{start}", start, 500) for start in (130, 110, 140, 120)]

    payload = build_payload(TARGET, TOPIC, events, 150, payload_rules(max_events=2))
    document = json.loads(payload.body)

    assert [event["id"] for event in document["events"]] == ["e110", "e120"]
    assert payload.dropped == 2
    assert payload.truncated is True
    assert document["truncated"] is True


def test_build_payload_truncates_to_bytes() -> None:
    events = [
        make_event(f"e{index}", 100 + index, 500, description={"S": "d" * 100})
        for index in range(5)
    ]

    payload = build_payload(
        TARGET, TOPIC, events, 150, payload_rules(max_payload_bytes=600)
    )

    assert payload.event_count == 2
    assert payload.dropped == 3
    assert len(payload.body) <= 600


def test_build_payload_next_change_at_event_end() -> None:
    events = [make_event("a", 100, 300), make_event("b", 100, 250)]

    payload = build_payload(TARGET, TOPIC, events, 150, payload_rules(grace=10))

    assert payload.next_change_at == 260


def test_build_payload_next_change_at_entry() -> None:
    events = [make_event("now", 100, 900), make_event("later", 700, 900)]

    payload = build_payload(TARGET, TOPIC, events, 150, payload_rules(lookahead=500))

    assert payload.next_change_at == 200


def test_build_payload_next_change_at_expiry_rounds_up() -> None:
    events = [make_event("a", 100, 900, expires_at=300.25)]

    payload = build_payload(TARGET, TOPIC, events, 150, payload_rules())

    assert payload.next_change_at == 301
    assert build(events, 150, payload_rules())["next_change_at"] == (
        "1970-01-01T00:05:01Z"
    )


def test_build_payload_skips_entry_after_expiry() -> None:
    # The event would enter the window at 400, but it expires at 350.
    events = [make_event("never", 700, 900, expires_at=350)]

    payload = build_payload(TARGET, TOPIC, events, 150, payload_rules(lookahead=300))

    assert payload.next_change_at is None


def test_build_payload_next_change_at_entry_at_now() -> None:
    """Test an event whose start is exactly `now` plus lookahead.

    It is outside the window at `now` and inside it a second later, so the
    payload at `now` has to show it or announce the change.
    """
    events = [make_event("now", 100, 900), make_event("later", 700, 900)]
    rules = payload_rules(lookahead=500)

    payload = build_payload(TARGET, TOPIC, events, 200, rules)
    event_shown = b'"id":"later"' in payload.body
    announced = payload.next_change_at is not None and payload.next_change_at <= 201

    assert event_ids(events, 201, rules) == ["now", "later"]
    assert event_shown or announced


def test_build_payload_next_change_at_dropped_event_end() -> None:
    """Test that next_change_at covers the end of the last dropped event.

    When the one dropped event ends, the payload loses its `truncated` flag.
    """
    events = [make_event("long", 0, 100), make_event("short", 10, 50)]
    rules = payload_rules(max_events=1)

    before = build_payload(TARGET, TOPIC, events, 20, rules)
    after = build_payload(TARGET, TOPIC, events, 50, rules)

    assert before.body != after.body
    assert before.next_change_at == 50


def test_build_payload_next_change_after_year_9999() -> None:
    # An open-ended event that ends at the last second `YYYY` can show.
    events = [make_event("always", 0, MAX_EPOCH_SECONDS)]

    document = build(events, 1_800_000_000, payload_rules(grace=DAY))

    assert UTC_TIME.fullmatch(document["next_change_at"])


def test_build_payload_limit_after_year_9999() -> None:
    """Test a payload whose one kept event fills the byte budget exactly.

    A five-digit year in next_change_at makes the tail one byte longer than
    the longest tail the budget allows for.
    """
    max_payload_bytes = 512
    budget = max_payload_bytes - len(payload_head(TARGET)) - len(PAYLOAD_TAIL_MAX)
    bare = make_event("always", 0, MAX_EPOCH_SECONDS, description={"S": ""})
    description = "d" * (budget - len(bare.encoded))
    events = [
        make_event(
            "always",
            0,
            MAX_EPOCH_SECONDS,
            description={"S": description},
            max_payload_bytes=max_payload_bytes,
        ),
        make_event("later", 10, 20_000_000_000),
    ]
    rules = payload_rules(lookahead=DAY, grace=DAY, max_payload_bytes=max_payload_bytes)

    payload = build_payload(TARGET, TOPIC, events, 1_800_000_000, rules)

    assert payload.event_count == 1
    assert payload.truncated is True
    assert len(payload.body) <= max_payload_bytes


def test_build_vanished_payload_empty_events() -> None:
    payload = build_vanished_payload(TARGET, TOPIC, clear=False)

    assert payload.body == (
        b'{"version":1,"target":"lobby","events":[],"next_change_at":null}'
    )
    assert payload.vanished is True
    assert payload.event_count == 0
    assert payload.next_change_at is None
    assert payload.topic == TOPIC


def test_build_vanished_payload_clear() -> None:
    payload = build_vanished_payload(TARGET, TOPIC, clear=True)

    assert payload.body == b""
    assert payload.vanished is True
    assert payload.truncated is False


def test_build_vanished_payload_escapes_target() -> None:
    payload = build_vanished_payload("büro/3", "events/büro/3", clear=False)

    assert json.loads(payload.body)["target"] == "büro/3"
    assert "büro".encode() in payload.body


def test_payload_digest_of_equal_and_different_bodies() -> None:
    first = payload_digest(b'{"a":1}')
    same = payload_digest(b'{"a":1}')
    other = payload_digest(b'{"a":2}')

    assert len(first) == 16
    assert first == same
    assert first != other


def test_payload_digest_property_matches_function() -> None:
    payload = build_payload(TARGET, TOPIC, [], 150, payload_rules())

    assert payload.digest == payload_digest(payload.body)


def test_payload_digest_differs_for_empty_and_cleared() -> None:
    empty = build_vanished_payload(TARGET, TOPIC, clear=False)
    cleared = build_vanished_payload(TARGET, TOPIC, clear=True)

    assert empty.digest != cleared.digest


@st.composite
def event_sets(draw: st.DrawFn, max_payload_bytes: int) -> list[Event]:
    """Draw up to seven events of lobby within the first 150 seconds of 1970."""
    ids = draw(
        st.lists(st.text("abAB", min_size=1, max_size=2), unique=True, max_size=7)
    )
    events = []
    for event_id in ids:
        # Shared start times make ties that only the event id orders.
        starts_at = draw(st.one_of(st.integers(0, 100), st.sampled_from([20, 40])))
        ends_at = draw(st.integers(starts_at + 1, 130))
        expires_at = draw(
            st.one_of(
                st.none(),
                st.integers(0, 140),
                st.integers(0, 280).map(lambda halves: halves / 2),
            )
        )
        description = draw(st.text("dé", max_size=100))
        events.append(
            make_event(
                event_id,
                starts_at,
                ends_at,
                expires_at=expires_at,
                max_payload_bytes=max_payload_bytes,
                description={"S": description},
            )
        )
    return events


@st.composite
def payload_cases(draw: st.DrawFn) -> tuple[list[Event], int, PayloadRules]:
    """Draw events, a whole-second `now` and rules with small limits."""
    max_payload_bytes = draw(st.sampled_from([512, 700, 1000, 131_072]))
    rules = payload_rules(
        lookahead=draw(st.integers(0, 60)),
        grace=draw(st.integers(0, 30)),
        max_events=draw(st.integers(1, 5)),
        max_payload_bytes=max_payload_bytes,
    )
    return draw(event_sets(max_payload_bytes)), draw(st.integers(0, 150)), rules


@PROPERTY_SETTINGS
@given(case=payload_cases(), data=st.data())
def test_build_payload_ignores_input_order(
    case: tuple[list[Event], int, PayloadRules], data: st.DataObject
) -> None:
    events, now, rules = case
    shuffled = data.draw(st.permutations(events))

    first = build_payload(TARGET, TOPIC, events, now, rules)
    second = build_payload(TARGET, TOPIC, shuffled, now, rules)

    assert second.body == first.body


@PROPERTY_SETTINGS
@given(case=payload_cases())
def test_build_payload_window_order_and_limits(
    case: tuple[list[Event], int, PayloadRules],
) -> None:
    events, now, rules = case
    in_window = sorted(
        (
            event
            for event in events
            if (event.expires_at is None or event.expires_at > now)
            and event.ends_at + rules.grace_seconds > now
            and event.starts_at < now + rules.lookahead_seconds
        ),
        key=lambda event: (event.starts_at, event.event_id),
    )

    payload = build_payload(TARGET, TOPIC, events, now, rules)
    document = json.loads(payload.body)
    kept = in_window[: payload.event_count]

    assert [event["id"] for event in document["events"]] == [
        event.event_id for event in kept
    ]
    assert payload.dropped == len(in_window) - len(kept)
    assert document.get("truncated", False) is (payload.dropped > 0)
    assert payload.event_count <= rules.max_events
    assert len(payload.body) <= rules.max_payload_bytes
    if payload.dropped and payload.event_count < rules.max_events:
        # Dropping was needed: one more event would break the byte limit.
        size_with_next = (
            len(payload_head(TARGET))
            + sum(len(event.encoded) + 1 for event in in_window[: len(kept) + 1])
            - 1
            + len(PAYLOAD_TAIL_MAX)
        )
        assert size_with_next > rules.max_payload_bytes


@st.composite
def current_events(draw: st.DrawFn, max_payload_bytes: int) -> list[Event]:
    """Draw up to eight events that are all in the window at 150 s."""
    ids = draw(
        st.lists(st.text("abAB", min_size=1, max_size=3), unique=True, max_size=8)
    )
    return [
        make_event(
            event_id,
            draw(st.integers(0, 100)),
            1000,
            max_payload_bytes=max_payload_bytes,
            description={"S": draw(st.text("dé", max_size=300))},
        )
        for event_id in ids
    ]


@PROPERTY_SETTINGS
@given(max_payload_bytes=st.integers(512, 2500), data=st.data())
def test_build_payload_fits_byte_limit(
    max_payload_bytes: int, data: st.DataObject
) -> None:
    """Test that the payload keeps as many events as fit, and never more bytes."""
    events = data.draw(current_events(max_payload_bytes))
    rules = payload_rules(lookahead=1000, max_payload_bytes=max_payload_bytes)
    ordered = sorted(events, key=lambda event: (event.starts_at, event.event_id))

    payload = build_payload(TARGET, TOPIC, events, 150, rules)
    kept = ordered[: payload.event_count]
    size_with_next = (
        len(payload_head(TARGET))
        + sum(len(event.encoded) + 1 for event in ordered[: len(kept) + 1])
        - 1
        + len(PAYLOAD_TAIL_MAX)
    )

    assert len(payload.body) <= max_payload_bytes
    assert payload.dropped == len(events) - len(kept)
    if payload.dropped:
        assert size_with_next > max_payload_bytes


def brute_force_next_change(
    events: list[Event], now: int, rules: PayloadRules, horizon: int
) -> int | None:
    """Return the first whole second after `now` at which the payload differs."""
    body = build_payload(TARGET, TOPIC, events, now, rules).body
    for instant in range(now + 1, horizon + 1):
        if build_payload(TARGET, TOPIC, events, instant, rules).body != body:
            return instant
    return None


@PROPERTY_SETTINGS
@given(case=payload_cases())
def test_build_payload_next_change_at_brute_force(
    case: tuple[list[Event], int, PayloadRules],
) -> None:
    """Test next_change_at against a second-by-second search for the next change.

    Event times stay under 141 s and grace under 31 s, so nothing changes after
    200 s.
    """
    events, now, rules = case

    payload = build_payload(TARGET, TOPIC, events, now, rules)

    assert payload.next_change_at == brute_force_next_change(events, now, rules, 200)
