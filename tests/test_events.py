"""Item parsing: every malformed item is rejected by name, and nothing else escapes."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from functools import partial
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventsync.encoding import envelope_size
from eventsync.errors import InvalidItemError
from eventsync.events import (
    MAX_EPOCH_SECONDS,
    Event,
    ItemParser,
    ItemRules,
    check_target,
    parse_item,
)
from eventsync.topics import TopicTemplate, target_problem
from tests.support.factories import event_item

STARTS = 1_800_000_000
ENDS = STARTS + 3600
RULES = ItemRules(
    timezone=ZoneInfo("UTC"),
    topic_template=TopicTemplate.parse("events/{target}"),
    max_payload_bytes=131_072,
)
FUZZ_SETTINGS = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def valid_item(**attributes: Any) -> dict[str, Any]:
    """Build the typed item of a one-hour event on lobby, with attributes replaced."""
    item = event_item("lobby", "standup", STARTS, ENDS, title="Standup")
    item.update(attributes)
    return item


def without(*names: str) -> dict[str, Any]:
    item = valid_item()
    for name in names:
        del item[name]
    return item


def rejection(item: dict[str, Any], rules: ItemRules = RULES) -> InvalidItemError:
    with pytest.raises(InvalidItemError) as caught:
        parse_item(item, rules)
    return caught.value


def nested_map(levels: int) -> dict[str, Any]:
    """Build a typed value `levels` deep: Maps around one String."""
    value: dict[str, Any] = {"S": "leaf"}
    for _ in range(levels - 1):
        value = {"M": {"child": value}}
    return value


# (case id, item, expected target, expected event_id, part of the reason)
MALFORMED_ITEMS: list[tuple[str, dict[str, Any], str, str, str]] = [
    ("target missing", without("target"), "?", "standup", "target is missing"),
    ("event_id missing", without("event_id"), "lobby", "?", "event_id is missing"),
    ("both keys missing", without("target", "event_id"), "?", "?", "target is missing"),
    (
        "target a Number",
        valid_item(target={"N": "7"}),
        "?",
        "standup",
        "target is a Number, not a String",
    ),
    (
        "event_id a Binary",
        valid_item(event_id={"B": b"x"}),
        "lobby",
        "?",
        "event_id is a Binary, not a String",
    ),
    (
        "target a malformed attribute",
        valid_item(target="lobby"),
        "?",
        "standup",
        "target is a malformed attribute, not a String",
    ),
    (
        "target with two type codes",
        valid_item(target={"S": "lobby", "N": "1"}),
        "?",
        "standup",
        "target is a malformed attribute, not a String",
    ),
    ("title missing", without("title"), "lobby", "standup", "title is missing"),
    (
        "title blank",
        valid_item(title={"S": " \t"}),
        "lobby",
        "standup",
        "title is empty",
    ),
    (
        "title a Number",
        valid_item(title={"N": "1"}),
        "lobby",
        "standup",
        "title must be a String, got a Number",
    ),
    (
        "title with two type codes",
        valid_item(title={"S": "a", "N": "1"}),
        "lobby",
        "standup",
        "title must be a String, got a malformed attribute",
    ),
    (
        "title of an unknown type code",
        valid_item(title={"X": "a"}),
        "lobby",
        "standup",
        "attribute of type 'X'",
    ),
    (
        "starts_at missing",
        without("starts_at"),
        "lobby",
        "standup",
        "starts_at is missing",
    ),
    ("ends_at missing", without("ends_at"), "lobby", "standup", "ends_at is missing"),
    (
        "starts_at a Boolean",
        valid_item(starts_at={"BOOL": True}),
        "lobby",
        "standup",
        "starts_at must be an ISO 8601 String or a Number of epoch seconds, got a Boolean",
    ),
    (
        "ends_at a Map",
        valid_item(ends_at={"M": {}}),
        "lobby",
        "standup",
        "ends_at must be an ISO 8601 String or a Number of epoch seconds, got a Map",
    ),
    (
        "starts_at unparsable text",
        valid_item(starts_at={"S": "next tuesday"}),
        "lobby",
        "standup",
        "starts_at is not an ISO 8601 time: 'next tuesday'",
    ),
    (
        "starts_at an impossible date",
        valid_item(starts_at={"S": "2026-02-30T09:00:00Z"}),
        "lobby",
        "standup",
        "starts_at is not an ISO 8601 time",
    ),
    (
        "starts_at text too long",
        valid_item(starts_at={"S": "2026-12-04T09:00:00" + " " * 60}),
        "lobby",
        "standup",
        "starts_at is not an ISO 8601 time: 79 characters long",
    ),
    (
        "ends_at an unparsable Number",
        valid_item(ends_at={"N": "soon"}),
        "lobby",
        "standup",
        "ends_at is not a number: 'soon'",
    ),
    (
        "ends_at before starts_at",
        valid_item(starts_at={"N": str(ENDS)}, ends_at={"N": str(STARTS)}),
        "lobby",
        "standup",
        "ends_at 2027-01-15T08:00:00Z is not after starts_at 2027-01-15T09:00:00Z",
    ),
    (
        "ends_at equal to starts_at",
        valid_item(ends_at={"N": str(STARTS)}),
        "lobby",
        "standup",
        "is not after starts_at",
    ),
    (
        "starts_at before 1970 as a Number",
        valid_item(starts_at={"N": "-1"}),
        "lobby",
        "standup",
        "starts_at -1 is outside the years 1970 to 9999",
    ),
    (
        "starts_at before 1970 as text",
        valid_item(starts_at={"S": "1969-12-31T23:59:59Z"}),
        "lobby",
        "standup",
        "outside the years 1970 to 9999",
    ),
    (
        "ends_at after 9999 as a Number",
        valid_item(ends_at={"N": str(MAX_EPOCH_SECONDS + 1)}),
        "lobby",
        "standup",
        "outside the years 1970 to 9999",
    ),
    (
        "ends_at after 9999 through its offset",
        valid_item(ends_at={"S": "9999-12-31T23:59:59-01:00"}),
        "lobby",
        "standup",
        "outside the years 1970 to 9999",
    ),
    (
        "starts_at NaN",
        valid_item(starts_at={"N": "NaN"}),
        "lobby",
        "standup",
        "starts_at is not a finite number: 'NaN'",
    ),
    (
        "ends_at Infinity",
        valid_item(ends_at={"N": "Infinity"}),
        "lobby",
        "standup",
        "ends_at is not a finite number: 'Infinity'",
    ),
    (
        "starts_at minus Infinity",
        valid_item(starts_at={"N": "-Infinity"}),
        "lobby",
        "standup",
        "starts_at is not a finite number",
    ),
    (
        "starts_at a huge exponent",
        valid_item(starts_at={"N": "1E+400"}),
        "lobby",
        "standup",
        "outside the years 1970 to 9999",
    ),
    (
        "expires_at NaN",
        valid_item(expires_at={"N": "NaN"}),
        "lobby",
        "standup",
        "expires_at is not a finite number",
    ),
    (
        "expires_at Infinity",
        valid_item(expires_at={"N": "Infinity"}),
        "lobby",
        "standup",
        "expires_at is not a finite number",
    ),
    (
        "expires_at a String",
        valid_item(expires_at={"S": "2026-12-04T09:00:00Z"}),
        "lobby",
        "standup",
        "expires_at must be a Number of epoch seconds, got a String",
    ),
    (
        "expires_at an unparsable Number",
        valid_item(expires_at={"N": "later"}),
        "lobby",
        "standup",
        "expires_at is not a number: 'later'",
    ),
    (
        "description a Number",
        valid_item(description={"N": "3"}),
        "lobby",
        "standup",
        "description must be a String, got a Number",
    ),
    (
        "location a List",
        valid_item(location={"L": []}),
        "lobby",
        "standup",
        "location must be a String, got a List",
    ),
    (
        "location a NULL",
        valid_item(location={"NULL": True}),
        "lobby",
        "standup",
        "location must be a String, got a Null",
    ),
    (
        "data a String",
        valid_item(data={"S": "{}"}),
        "lobby",
        "standup",
        "data must be a Map, got a String",
    ),
    (
        "data a List",
        valid_item(data={"L": []}),
        "lobby",
        "standup",
        "data must be a Map, got a List",
    ),
    (
        "data with a String Set",
        valid_item(data={"M": {"tags": {"SS": ["a", "b"]}}}),
        "lobby",
        "standup",
        "data.tags is a String Set, which JSON cannot carry",
    ),
    (
        "data with a Number Set",
        valid_item(data={"M": {"sizes": {"NS": ["1"]}}}),
        "lobby",
        "standup",
        "data.sizes is a Number Set, which JSON cannot carry",
    ),
    (
        "data with a Binary Set",
        valid_item(data={"M": {"blobs": {"BS": [b"x"]}}}),
        "lobby",
        "standup",
        "data.blobs is a Binary Set, which JSON cannot carry",
    ),
    (
        "data with a Binary in a List",
        valid_item(data={"M": {"list": {"L": [{"S": "a"}, {"B": b"x"}]}}}),
        "lobby",
        "standup",
        "data.list[1] is a Binary, which JSON cannot carry",
    ),
    (
        "data with a NaN Number",
        valid_item(data={"M": {"x": {"N": "NaN"}}}),
        "lobby",
        "standup",
        "data.x is not a finite number",
    ),
    (
        "data with an Infinity Number",
        valid_item(data={"M": {"x": {"N": "-Infinity"}}}),
        "lobby",
        "standup",
        "data.x is not a finite number",
    ),
    (
        "data with a Number too large for JSON",
        valid_item(data={"M": {"x": {"N": "1E+400"}}}),
        "lobby",
        "standup",
        "data.x is too large for JSON",
    ),
    (
        "data with an unparsable Number",
        valid_item(data={"M": {"x": {"N": "many"}}}),
        "lobby",
        "standup",
        "data.x is not a number: 'many'",
    ),
    (
        "data nested 33 levels deep",
        valid_item(data=nested_map(33)),
        "lobby",
        "standup",
        "is nested more than 32 levels deep",
    ),
    (
        "event_id empty",
        valid_item(event_id={"S": ""}),
        "lobby",
        "",
        "event_id must be 1 to 128 characters, got 0",
    ),
    (
        "event_id of 129 characters",
        valid_item(event_id={"S": "e" * 129}),
        "lobby",
        "e" * 129,
        "event_id must be 1 to 128 characters, got 129",
    ),
    ("target empty", valid_item(target={"S": ""}), "", "standup", "target is empty"),
    (
        "target of 129 characters",
        valid_item(target={"S": "t" * 129}),
        "t" * 129,
        "standup",
        "target is 129 characters long, over the maximum of 128",
    ),
    (
        "title with a lone surrogate",
        valid_item(title={"S": "Stand\ud800up"}),
        "lobby",
        "standup",
        "a text field is not valid Unicode",
    ),
    (
        "event_id with a lone surrogate",
        valid_item(event_id={"S": "stand\udfffup"}),
        "lobby",
        "stand\udfffup",
        "a text field is not valid Unicode",
    ),
    (
        "data key with a lone surrogate",
        valid_item(data={"M": {"\udc80": {"S": "x"}}}),
        "lobby",
        "standup",
        "a text field is not valid Unicode",
    ),
    (
        "starts_at with a lone surrogate",
        valid_item(starts_at={"S": "2026-12-04T09:00:0\ud800"}),
        "lobby",
        "standup",
        "starts_at is not an ISO 8601 time",
    ),
    (
        "data too large for the payload",
        valid_item(data={"M": {"blob": {"S": "x" * 140_000}}}),
        "lobby",
        "standup",
        "more than the 130973 bytes a payload of at most 131072 bytes leaves for it",
    ),
]


@pytest.mark.parametrize(
    ("item", "target", "event_id", "reason"),
    [case[1:] for case in MALFORMED_ITEMS],
    ids=[case[0] for case in MALFORMED_ITEMS],
)
def test_parse_item_rejects_malformed_item(
    item: dict[str, Any], target: str, event_id: str, reason: str
) -> None:
    """Test that a malformed item raises InvalidItemError naming it and the reason."""
    error = rejection(item)

    assert error.target == target
    assert error.event_id == event_id
    assert reason in error.reason
    assert repr(target) in str(error)
    assert repr(event_id) in str(error)
    assert error.reason in str(error)


@pytest.mark.parametrize(
    "target",
    [
        "lob+by",
        "+",
        "lobby/#",
        "#",
        "$SYS",
        "$lobby",
        "lobby$",
        "a b",
        " lobby",
        "lobby\t",
        "lob\nby",
        "lob\x00by",
        "lob\u00a0by",
        "floor/room*",
        "room'1",
    ],
)
def test_parse_item_rejects_target_character(target: str) -> None:
    error = rejection(valid_item(target={"S": target}))

    assert error.target == target
    assert error.event_id == "standup"
    assert "target contains the character" in error.reason


def test_parse_item_rejects_target_lone_surrogate() -> None:
    """Test a target that UTF-8 cannot encode, such as a `\\ud800` JSON escape.

    Any exception other than InvalidItemError stops the whole scan, so every
    target on the table would go without an update.
    """
    error = rejection(valid_item(target={"S": "caf\ud800"}))

    assert error.target == "caf\ud800"
    assert "target contains the character" in error.reason


@pytest.mark.parametrize("target", ["a//b", "/lobby", "lobby/", "/", "a/b//"])
def test_parse_item_rejects_target_empty_level(target: str) -> None:
    error = rejection(valid_item(target={"S": target}))

    assert error.target == target
    assert "target has an empty level" in error.reason


def test_parse_item_rejects_eight_slash_topic() -> None:
    # events/{target} adds one slash, so seven in the target make eight.
    target = "/".join("abcdefgh")

    error = rejection(valid_item(target={"S": target}))

    assert error.target == target
    assert "has 8 '/' characters, over the AWS IoT Core maximum of 7" in error.reason


def test_parse_item_accepts_seven_slash_topic() -> None:
    target = "/".join("abcdefg")

    event = parse_item(valid_item(target={"S": target}), RULES)

    assert event.target == target


def test_parse_item_counts_template_slashes() -> None:
    rules = ItemRules(
        timezone=ZoneInfo("UTC"),
        topic_template=TopicTemplate.parse("site/floor/{target}/now"),
        max_payload_bytes=131_072,
    )
    accepted = "/".join("abcde")
    rejected = "/".join("abcdef")

    event = parse_item(valid_item(target={"S": accepted}), rules)
    error = rejection(valid_item(target={"S": rejected}), rules)

    assert event.target == accepted
    assert "has 8 '/' characters" in error.reason


def test_parse_item_rejects_topic_over_256_bytes() -> None:
    # 128 two-byte letters are 256 bytes, and `events/` adds 7 more.
    target = "é" * 128

    error = rejection(valid_item(target={"S": target}))

    assert error.target == target
    assert "is 263 bytes, over the AWS IoT Core maximum of 256" in error.reason


def test_parse_item_accepts_topic_of_256_bytes() -> None:
    rules = ItemRules(
        timezone=ZoneInfo("UTC"),
        topic_template=TopicTemplate.parse("e/{target}/" + "x" * 125),
        max_payload_bytes=131_072,
    )
    target = "t" * 128
    # The same number of characters, one of them two bytes long.
    wider = "t" * 127 + "é"

    event = parse_item(valid_item(target={"S": target}), rules)
    error = rejection(valid_item(target={"S": wider}), rules)

    assert event.target == target
    assert "is 257 bytes, over the AWS IoT Core maximum of 256" in error.reason


def test_parse_item_accepts_unicode_letters_in_target() -> None:
    event = parse_item(valid_item(target={"S": "büro/raum-3.ost:2_a"}), RULES)

    assert event.target == "büro/raum-3.ost:2_a"


def test_parse_item_accepts_128_character_keys() -> None:
    event = parse_item(
        valid_item(target={"S": "t" * 128}, event_id={"S": "e" * 128}), RULES
    )

    assert event.target == "t" * 128
    assert event.event_id == "e" * 128


def test_parse_item_builds_event_json_in_field_order() -> None:
    item = valid_item(
        data={
            "M": {
                "zeta": {"N": "2"},
                "alpha": {"L": [{"BOOL": True}, {"NULL": True}, {"N": "1.5"}]},
                "mid": {"M": {"b": {"S": "x"}, "a": {"N": "-0"}}},
            }
        },
        location={"S": "Hall"},
        description={"S": "Daily"},
        color={"S": "red"},
    )

    event = parse_item(item, RULES)

    assert event.encoded == (
        b'{"id":"standup","title":"Standup","starts_at":"2027-01-15T08:00:00Z",'
        b'"ends_at":"2027-01-15T09:00:00Z","description":"Daily","location":"Hall",'
        b'"data":{"alpha":[true,null,1.5],"mid":{"a":0,"b":"x"},"zeta":2}}'
    )


def test_parse_item_writes_non_ascii_as_utf8() -> None:
    event = parse_item(valid_item(title={"S": "Café ☕"}), RULES)

    assert '"title":"Café ☕"'.encode() in event.encoded


def test_parse_item_ignores_unknown_attributes() -> None:
    item = valid_item(color={"SS": ["red"]}, owner={"B": b"\x00"}, extra={"X": 1})

    event = parse_item(item, RULES)

    assert event == parse_item(valid_item(), RULES)


def test_parse_item_keeps_event_fields() -> None:
    event = parse_item(valid_item(), RULES)

    assert event.target == "lobby"
    assert event.event_id == "standup"
    assert event.starts_at == STARTS
    assert event.ends_at == ENDS
    assert event.expires_at is None


@pytest.mark.parametrize(
    ("starts_at", "expected"),
    [
        ({"S": "2026-12-04T09:00:00Z"}, 1_796_374_800),
        ({"S": "2026-12-04T10:00:00+01:00"}, 1_796_374_800),
        ({"S": "2026-12-04T09:00:00.999Z"}, 1_796_374_800),
        ({"S": "2026-12-04 09:00:00+00:00"}, 1_796_374_800),
        ({"N": "1796374800"}, 1_796_374_800),
        ({"N": "1796374800.999"}, 1_796_374_800),
        ({"N": "1.7963748E+9"}, 1_796_374_800),
        ({"N": "0"}, 0),
    ],
)
def test_parse_item_reads_starts_at_forms(
    starts_at: dict[str, str], expected: int
) -> None:
    item = valid_item(starts_at=starts_at, ends_at={"N": str(MAX_EPOCH_SECONDS)})

    event = parse_item(item, RULES)

    assert event.starts_at == expected


def test_parse_item_reads_last_representable_second() -> None:
    item = valid_item(ends_at={"S": "9999-12-31T23:59:59Z"})

    event = parse_item(item, RULES)

    assert event.ends_at == MAX_EPOCH_SECONDS


def test_parse_item_reads_naive_time_in_rules_zone() -> None:
    rules = ItemRules(
        timezone=ZoneInfo("Europe/Berlin"),
        topic_template=RULES.topic_template,
        max_payload_bytes=RULES.max_payload_bytes,
    )
    item = valid_item(
        starts_at={"S": "2026-01-05T09:00:00"}, ends_at={"S": "2026-07-06T09:00:00"}
    )

    event = parse_item(item, rules)

    assert event.starts_at == int(datetime(2026, 1, 5, 8, tzinfo=UTC).timestamp())
    assert event.ends_at == int(datetime(2026, 7, 6, 7, tzinfo=UTC).timestamp())


def test_parse_item_keeps_expires_at_in_the_past() -> None:
    # An expired item is still valid, because the payload, not the parser,
    # leaves it out.
    event = parse_item(valid_item(expires_at={"N": "1000.5"}), RULES)

    assert event.expires_at == 1000.5


def test_parse_item_keeps_expires_at_out_of_json() -> None:
    with_expiry = parse_item(valid_item(expires_at={"N": "1900000000"}), RULES)
    without_expiry = parse_item(valid_item(), RULES)

    assert with_expiry.expires_at == 1_900_000_000
    assert with_expiry.encoded == without_expiry.encoded


def test_parse_item_accepts_data_32_levels_deep() -> None:
    event = parse_item(valid_item(data=nested_map(32)), RULES)

    assert event.encoded.count(b'"child"') == 31


def test_parse_item_rejects_huge_integer_in_data() -> None:
    # Python 3.11 writes no int of more than sys.get_int_max_str_digits()
    # digits (4300 by default) as text, so the JSON encoder raises ValueError.
    item = valid_item(data={"M": {"x": {"N": "1" * 4301}}})

    error = rejection(item)

    assert error.target == "lobby"
    assert error.event_id == "standup"


def test_parse_item_event_room_boundary() -> None:
    rules = ItemRules(
        timezone=ZoneInfo("UTC"),
        topic_template=RULES.topic_template,
        max_payload_bytes=1024,
    )
    room = 1024 - envelope_size("lobby")
    base_size = len(parse_item(valid_item(description={"S": ""}), rules).encoded)
    fitting = valid_item(description={"S": "d" * (room - base_size)})
    oversized = valid_item(description={"S": "d" * (room - base_size + 1)})

    event = parse_item(fitting, rules)
    error = rejection(oversized, rules)

    assert len(event.encoded) == room
    assert f"event is {room + 1} bytes as JSON, more than the {room} bytes" in (
        error.reason
    )


def test_parse_item_shares_target_checks() -> None:
    checks: dict[str, tuple[str | None, int]] = {}

    first = parse_item(valid_item(), RULES, checks)
    second = parse_item(valid_item(event_id={"S": "lunch"}), RULES, checks)

    assert first.event_id == "standup"
    assert second.event_id == "lunch"
    assert checks == {"lobby": check_target("lobby", RULES)}


def test_check_target_returns_room() -> None:
    problem, room = check_target("lobby", RULES)

    assert problem is None
    assert room == 131_072 - envelope_size("lobby")


def test_check_target_reports_target_problem() -> None:
    problem, _ = check_target("a+b", RULES)

    assert problem == "target contains the character '+', which is not allowed"


def test_check_target_reports_topic_problem() -> None:
    problem, _ = check_target("/".join("abcdefgh"), RULES)

    assert problem is not None
    assert "over the AWS IoT Core maximum of 7" in problem


def test_check_target_room_counts_escaped_target() -> None:
    _, plain_room = check_target("ab", RULES)
    _, wide_room = check_target("éé", RULES)

    assert plain_room - wide_room == 2


# Typed DynamoDB values for the fuzz: every type code, well and badly formed.
# st.text leaves surrogates out even when its alphabet offers them, so text
# with lone surrogates is joined from single characters.
surrogates = st.characters(categories=["Cs"])
any_text = st.lists(
    st.one_of(st.characters(), surrogates, st.sampled_from("+#$/ \x00\t")),
    max_size=12,
).map("".join)
time_texts = st.one_of(
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)).map(
        datetime.isoformat
    ),
    st.datetimes(
        min_value=datetime(1969, 12, 30),
        max_value=datetime(2100, 1, 1),
        timezones=st.sampled_from([UTC, timezone(timedelta(hours=-12))]),
    ).map(datetime.isoformat),
    st.sampled_from(["2026-02-30T00:00:00Z", "9999-12-31T23:59:59-01:00", "T", ""]),
)
number_texts = st.one_of(
    st.integers(min_value=-(10**20), max_value=10**20).map(str),
    st.integers(min_value=0, max_value=MAX_EPOCH_SECONDS + 10).map(str),
    st.floats().map(repr),
    st.decimals().map(str),
    st.from_regex(
        r"-?[0-9]{1,20}(\.[0-9]{1,6})?([eE][+-]?[0-9]{1,4})?", fullmatch=True
    ),
    st.sampled_from(["NaN", "-NaN", "sNaN", "Infinity", "-Infinity", "", " 1", "1_0"]),
    any_text,
)
binary = st.binary(max_size=8)
scalar_values = st.one_of(
    st.builds(lambda text: {"S": text}, st.one_of(any_text, time_texts)),
    st.builds(lambda text: {"N": text}, number_texts),
    st.builds(lambda data: {"B": data}, binary),
    st.builds(lambda flag: {"BOOL": flag}, st.booleans()),
    st.just({"NULL": True}),
    st.builds(lambda texts: {"SS": texts}, st.lists(any_text, max_size=3)),
    st.builds(lambda texts: {"NS": texts}, st.lists(number_texts, max_size=3)),
    st.builds(lambda blobs: {"BS": blobs}, st.lists(binary, max_size=3)),
)
malformed_values = st.one_of(
    st.just({}),
    st.none(),
    any_text,
    st.integers(),
    st.lists(st.integers(), max_size=2),
    st.builds(lambda text: {"S": text, "N": "1"}, any_text),
    st.builds(
        lambda code, value: {code: value},
        st.sampled_from(["S", "N", "B", "BOOL", "NULL", "M", "L", "SS", "X", ""]),
        st.one_of(st.integers(), st.none(), st.binary(max_size=2), st.lists(st.none())),
    ),
)
typed_values = st.recursive(
    st.one_of(scalar_values, malformed_values),
    lambda children: st.one_of(
        st.builds(
            lambda entries: {"M": entries},
            st.dictionaries(any_text, children, max_size=3),
        ),
        st.builds(lambda elements: {"L": elements}, st.lists(children, max_size=3)),
    ),
    max_leaves=12,
)
ATTRIBUTE_NAMES = [
    "target",
    "event_id",
    "title",
    "starts_at",
    "ends_at",
    "description",
    "location",
    "data",
    "expires_at",
]
# Values that are valid for the named attribute, so that fuzzed items often
# get past their first check and reach the later ones.
plausible_values: dict[str, st.SearchStrategy[Any]] = {
    "target": st.builds(
        lambda text: {"S": text},
        st.one_of(
            st.from_regex(
                r"[a-z0-9_.:-]{1,6}(/[a-z0-9_.:-]{1,6}){0,8}", fullmatch=True
            ),
            any_text,
        ),
    ),
    "event_id": st.builds(lambda text: {"S": text}, st.text(min_size=0, max_size=130)),
    "title": st.builds(lambda text: {"S": text}, any_text),
    "starts_at": st.builds(
        lambda seconds: {"N": str(seconds)}, st.integers(0, MAX_EPOCH_SECONDS)
    ),
    "ends_at": st.one_of(
        st.builds(
            lambda seconds: {"N": str(seconds)}, st.integers(0, MAX_EPOCH_SECONDS)
        ),
        st.builds(lambda text: {"S": text}, time_texts),
    ),
    "description": st.builds(
        lambda text: {"S": text},
        st.one_of(
            any_text,
            # Long text, around the room of the smaller payload limits.
            st.builds(
                lambda size, character: character * size,
                st.integers(0, 1200),
                st.sampled_from("dé"),
            ),
        ),
    ),
    "location": st.builds(lambda text: {"S": text}, any_text),
    "data": st.builds(
        lambda entries: {"M": entries},
        st.dictionaries(any_text, typed_values, max_size=3),
    ),
    "expires_at": st.builds(lambda text: {"N": text}, number_texts),
}


@st.composite
def fuzzed_items(draw: st.DrawFn) -> dict[str, Any]:
    """Draw an item: a valid one with attributes removed, replaced or added."""
    item = valid_item(
        description={"S": "Daily"},
        location={"S": "Hall"},
        data={"M": {}},
        expires_at={"N": str(ENDS + 86400)},
    )
    for name in ATTRIBUTE_NAMES:
        # Weighted so that about one item in eight keeps only valid values.
        change = draw(
            st.sampled_from(["keep"] * 5 + ["plausible"] * 3 + ["typed", "remove"])
        )
        if change == "plausible":
            item[name] = draw(plausible_values[name])
        elif change == "typed":
            item[name] = draw(typed_values)
        elif change == "remove":
            del item[name]
    extra = draw(st.dictionaries(any_text, typed_values, max_size=2))
    for name, value in extra.items():
        item.setdefault(name, value)
    return item


item_rules = st.builds(
    ItemRules,
    timezone=st.sampled_from(
        [ZoneInfo("UTC"), ZoneInfo("America/New_York"), timezone(timedelta(hours=14))]
    ),
    topic_template=st.sampled_from(
        [
            TopicTemplate.parse("events/{target}"),
            TopicTemplate.parse("{target}"),
            TopicTemplate.parse("a/b/c/{target}/d"),
        ]
    ),
    max_payload_bytes=st.sampled_from([512, 2048, 131_072]),
)


@FUZZ_SETTINGS
@given(item=fuzzed_items(), rules=item_rules)
def test_parse_item_fuzz_returns_event_or_invalid(
    item: dict[str, Any], rules: ItemRules
) -> None:
    """Test that any typed item gives an Event or InvalidItemError, nothing else."""
    rejection: InvalidItemError | None = None
    try:
        event = parse_item(item, rules)
    except InvalidItemError as error:
        rejection = error
    if rejection is not None:
        assert rejection.reason
        assert isinstance(rejection.target, str)
        assert isinstance(rejection.event_id, str)
        return

    _, room = check_target(event.target, rules)
    fields = json.loads(event.encoded.decode("utf-8"))
    assert target_problem(event.target) is None
    assert 1 <= len(event.event_id) <= 128
    assert 0 <= event.starts_at < event.ends_at <= MAX_EPOCH_SECONDS
    assert len(event.encoded) <= room
    assert list(fields)[:4] == ["id", "title", "starts_at", "ends_at"]
    assert fields["id"] == event.event_id


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(0, 1200),
    character=st.sampled_from("dé☕"),
    max_payload_bytes=st.integers(512, 1500),
)
def test_parse_item_size_limit_exact(
    size: int, character: str, max_payload_bytes: int
) -> None:
    """Test that an event is valid exactly when its JSON fits the room of its payload."""
    item = valid_item(description={"S": character * size})
    rules = ItemRules(
        timezone=ZoneInfo("UTC"),
        topic_template=RULES.topic_template,
        max_payload_bytes=max_payload_bytes,
    )
    encoded_size = len(parse_item(item, RULES).encoded)
    room = max_payload_bytes - envelope_size("lobby")

    try:
        parse_item(item, rules)
        accepted = True
    except InvalidItemError:
        accepted = False

    assert accepted is (encoded_size <= room)


def outcome(parse: Callable[[], Event]) -> tuple[str, object]:
    """Return the event, or the class and message of what one parse raised."""
    try:
        return "event", parse()
    except Exception as error:
        return type(error).__name__, str(error)


plain_items = st.builds(
    lambda event_id, title, starts, length: event_item(
        "lobby", event_id, starts, starts + length, title=title
    ),
    st.sampled_from(["a", "b", "c"]),
    st.sampled_from(["Standup", "Review", " ", "Café"]),
    st.integers(0, 2_000_000_000),
    st.integers(-1, 7200),
)
scan_items = st.one_of(plain_items, fuzzed_items())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pool=st.lists(scan_items, min_size=1, max_size=6),
    scans=st.lists(
        st.lists(st.tuples(st.integers(0, 5), st.booleans()), max_size=8),
        min_size=2,
        max_size=4,
    ),
    rules=item_rules,
)
def test_item_parser_matches_parse_item_across_scans(
    pool: list[dict[str, Any]],
    scans: list[list[tuple[int, bool]]],
    rules: ItemRules,
) -> None:
    """Test that ItemParser gives what parse_item gives, scan after scan.

    Each scan reads pool items as new copies, and may first change one of
    them, so unchanged, changed and invalid items all come back.
    """
    parser = ItemParser(rules)
    for scan in scans:
        parser.start_scan()
        for index, change in scan:
            position = index % len(pool)
            if change:
                pool[position] = dict(pool[position], title={"S": f"v{index}"})
            item = copy.deepcopy(pool[position])

            expected = outcome(partial(parse_item, item, rules))
            actual = outcome(partial(parser.parse, item))

            assert actual == expected
        parser.finish_scan()


def test_item_parser_reuses_unchanged_event() -> None:
    parser = ItemParser(RULES)
    parser.start_scan()
    first = parser.parse(valid_item())
    parser.finish_scan()
    parser.start_scan()
    second = parser.parse(valid_item())
    parser.finish_scan()

    assert second is first


def test_item_parser_parses_changed_item() -> None:
    parser = ItemParser(RULES)
    parser.start_scan()
    parser.parse(valid_item())
    parser.finish_scan()
    parser.start_scan()

    changed = parser.parse(valid_item(title={"S": "Retro"}))

    assert changed == parse_item(valid_item(title={"S": "Retro"}), RULES)
    assert b'"title":"Retro"' in changed.encoded


def test_item_parser_rejects_invalid_item_every_scan() -> None:
    parser = ItemParser(RULES)
    item = valid_item(ends_at={"N": str(STARTS)})
    messages = []
    for _ in range(2):
        parser.start_scan()
        with pytest.raises(InvalidItemError) as caught:
            parser.parse(copy.deepcopy(item))
        parser.finish_scan()
        messages.append(str(caught.value))

    assert messages[0] == messages[1]
    assert "is not after starts_at" in messages[1]


def test_item_parser_forgets_items_of_earlier_scans() -> None:
    parser = ItemParser(RULES)
    parser.start_scan()
    first = parser.parse(valid_item())
    parser.finish_scan()
    parser.start_scan()
    parser.finish_scan()
    parser.start_scan()

    again = parser.parse(valid_item())

    assert again == first
    assert again is not first


def test_item_parser_restarted_scan_keeps_previous() -> None:
    parser = ItemParser(RULES)
    parser.start_scan()
    first = parser.parse(valid_item())
    parser.finish_scan()
    parser.start_scan()
    parser.parse(valid_item(title={"S": "Other"}))
    parser.start_scan()

    again = parser.parse(valid_item())

    assert again is first


def test_item_parser_parses_items_marshal_cannot_write() -> None:
    # marshal cannot write a Decimal, so this item skips the reuse by digest.
    item = valid_item(color={"X": Decimal("1")})
    parser = ItemParser(RULES)
    parser.start_scan()

    event = parser.parse(item)

    assert event == parse_item(valid_item(), RULES)


def test_item_parser_parses_mapping_that_is_not_dict() -> None:
    parser = ItemParser(RULES)
    parser.start_scan()

    event = parser.parse(MappingProxyType(valid_item()))

    assert event == parse_item(valid_item(), RULES)
