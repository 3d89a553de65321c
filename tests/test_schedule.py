"""Crontab expressions: the triggers fire when crontab(5) would run the job."""

from __future__ import annotations

import calendar
import os
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from eventsync.config import load_settings
from eventsync.errors import ConfigError
from eventsync.schedule import build_trigger, crontab_trigger, parse_crontab
from tests.support.daemon import write_config

MONTH_NAMES = [name.lower() for name in calendar.month_abbr[1:]]
# crontab(5) numbers weekdays from Sunday = 0.
WEEKDAY_NAMES = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]


def fire_times(
    expression: str, start: datetime, count: int, zone: tzinfo = UTC
) -> list[datetime]:
    """Return the first `count` fire times at or after `start`.

    Each call passes the previous fire time, as APScheduler's scheduler does.
    """
    trigger = crontab_trigger(expression, zone)
    times: list[datetime] = []
    previous = None
    while len(times) < count:
        following = trigger.get_next_fire_time(previous, previous or start)
        if following is None:
            break
        times.append(following)
        previous = following
    return times


def test_crontab_trigger_monday_is_1() -> None:
    """Test `0 9 * * 1`, which APScheduler 3.11's own from_crontab runs on Tuesdays."""
    start = datetime(2026, 1, 1, tzinfo=UTC)

    times = fire_times("0 9 * * 1", start, 5)

    assert [moment.strftime("%a %H:%M") for moment in times] == ["Mon 09:00"] * 5
    assert times[0] == datetime(2026, 1, 5, 9, tzinfo=UTC)


def test_crontab_trigger_monday_in_zone() -> None:
    zone = ZoneInfo("Europe/Berlin")
    start = datetime(2026, 3, 20, tzinfo=zone)

    times = fire_times("0 9 * * mon", start, 3, zone)

    assert times == [
        datetime(2026, 3, 23, 9, tzinfo=zone),
        datetime(2026, 3, 30, 9, tzinfo=zone),
        datetime(2026, 4, 6, 9, tzinfo=zone),
    ]
    assert times[1].astimezone(UTC).hour == 7


@pytest.mark.parametrize("sunday", ["0", "7", "sun", "SUN", "6-7"])
def test_crontab_trigger_sunday_numbers(sunday: str) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)

    times = fire_times(f"30 6 * * {sunday}", start, 2)

    assert times[0] == datetime(2026, 1, 3 if sunday == "6-7" else 4, 6, 30, tzinfo=UTC)
    assert times[1] == datetime(
        2026, 1, 4 if sunday == "6-7" else 11, 6, 30, tzinfo=UTC
    )


def test_crontab_trigger_day_fields_or() -> None:
    # January 2026: the 1st is a Thursday, and the Mondays are 5, 12, 19, 26.
    start = datetime(2026, 1, 1, tzinfo=UTC)

    times = fire_times("0 8 1 * 1", start, 6)

    # February 2026 starts on a Sunday, which matches the day of month alone.
    assert [moment.day for moment in times] == [1, 5, 12, 19, 26, 1]
    assert times[-1].month == 2


def test_crontab_trigger_star_day_field_and() -> None:
    # A day field that starts with `*` does not count as restricted, so the
    # other day field must match too. Here that means odd days that are Mondays.
    start = datetime(2026, 1, 1, tzinfo=UTC)

    times = fire_times("0 8 */2 * 1", start, 3)

    assert [moment.date() for moment in times] == [
        date(2026, 1, 5),
        date(2026, 1, 19),
        date(2026, 2, 9),
    ]


def test_crontab_trigger_leap_day() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)

    times = fire_times("0 0 29 feb *", start, 2)

    assert times == [
        datetime(2028, 2, 29, tzinfo=UTC),
        datetime(2032, 2, 29, tzinfo=UTC),
    ]


def test_crontab_trigger_every_minute() -> None:
    start = datetime(2026, 1, 1, 23, 58, 30, tzinfo=UTC)

    times = fire_times("* * * * *", start, 3)

    assert times == [
        datetime(2026, 1, 1, 23, 59, tzinfo=UTC),
        datetime(2026, 1, 2, 0, 0, tzinfo=UTC),
        datetime(2026, 1, 2, 0, 1, tzinfo=UTC),
    ]


def test_build_trigger_prefers_cron() -> None:
    trigger = build_trigger(None, "0 9 * * 1", UTC)

    following = trigger.get_next_fire_time(None, datetime(2026, 1, 1, tzinfo=UTC))

    assert following == datetime(2026, 1, 5, 9, tzinfo=UTC)


def test_build_trigger_interval() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    trigger = build_trigger(90, None, UTC)

    first = trigger.get_next_fire_time(None, start)
    second = trigger.get_next_fire_time(first, first)

    assert second - first == timedelta(seconds=90)


@pytest.mark.parametrize(
    ("expression", "field", "values"),
    [
        ("*/15 * * * *", "minutes", {0, 15, 30, 45}),
        ("5/20 * * * *", "minutes", {5, 25, 45}),
        ("0 9-17/4 * * *", "hours", {9, 13, 17}),
        ("0 0 1,15,31 * *", "days", {1, 15, 31}),
        ("0 0 * jan-mar,Dec *", "months", {1, 2, 3, 12}),
        ("0 0 * * mon-fri", "weekdays", {1, 2, 3, 4, 5}),
        ("0 0 * * 5-7", "weekdays", {5, 6, 0}),
        ("0 0 * * */3", "weekdays", {0, 3, 6}),
    ],
)
def test_parse_crontab_field_values(
    expression: str, field: str, values: set[int]
) -> None:
    spec = parse_crontab(expression)

    assert getattr(spec, field) == values


@pytest.mark.parametrize(
    ("expression", "field", "text"),
    [
        ("60 * * * *", "minute", "60"),
        ("* 24 * * *", "hour", "24"),
        ("* * 0 * *", "day of month", "0"),
        ("* * 32 * *", "day of month", "32"),
        ("* * * 13 *", "month", "13"),
        ("* * * * 8", "day of week", "8"),
        ("*/0 * * * *", "minute", "*/0"),
        ("*/x * * * *", "minute", "*/x"),
        ("5-1 * * * *", "minute", "5-1"),
        ("* * * foo *", "month", "foo"),
        ("* * * * mon-funday", "day of week", "mon-funday"),
        ("mon * * * *", "minute", "mon"),
        ("* * * * jan", "day of week", "jan"),
        ("1,,2 * * * *", "minute", "''"),
        ("-1 * * * *", "minute", "-1"),
        ("1- * * * *", "minute", "1-"),
        ("*-5 * * * *", "minute", "*-5"),
        ("1.5 * * * *", "minute", "1.5"),
        ("² * * * *", "minute", "²"),
        ("٣ * * * *", "minute", "٣"),
        ("*/² * * * *", "minute", "*/²"),
    ],
)
def test_parse_crontab_rejects_field(expression: str, field: str, text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"invalid cron {field} field")) as (
        caught
    ):
        parse_crontab(expression)

    assert text in str(caught.value)


@pytest.mark.parametrize("expression", ["", "* * * *", "* * * * * *", "@daily"])
def test_parse_crontab_rejects_field_count(expression: str) -> None:
    with pytest.raises(ValueError, match="expected 5 fields") as caught:
        parse_crontab(expression)

    assert repr(expression) in str(caught.value)


def test_crontab_config_error_names_field_and_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [name for name in os.environ if name.startswith("EVENTSYNC_")]:
        monkeypatch.delenv(name)
    config = write_config(
        tmp_path / "config.toml",
        {
            "mqtt": {
                "host": "broker.example",
                "ca_file": "ca.crt",
                "cert_file": "client.crt",
                "key_file": "client.key",
            },
            "sync": {"cron": "0 25 * * 1"},
        },
    )

    with pytest.raises(ConfigError) as caught:
        load_settings(str(config))

    assert "invalid setting sync.cron" in str(caught.value)
    assert "invalid cron hour field '25'" in str(caught.value)


@dataclass(frozen=True)
class FieldSpec:
    """A drawn crontab field with its text and the values crontab(5) gives it."""

    text: str
    values: frozenset[int]


@st.composite
def cron_fields(
    draw: st.DrawFn, low: int, high: int, names: list[str] | None, name_base: int
) -> FieldSpec:
    """Draw a field as a list of `*`, `*/n`, numbers, names, ranges and steps."""
    texts: list[str] = []
    values: set[int] = set()
    for position in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(
                ["star", "value", "name", "range", "value step"]
                if position == 0
                else ["value", "name", "range", "value step"]
            )
        )
        if kind == "name" and names is None:
            kind = "value"
        step = draw(st.integers(1, high - low + 2))
        first = draw(st.integers(low, high))
        last = draw(st.integers(first, high))
        if kind == "star":
            with_step = draw(st.booleans())
            texts.append(f"*/{step}" if with_step else "*")
            values.update(range(low, high + 1, step if with_step else 1))
        elif kind == "value":
            texts.append(str(first))
            values.add(first)
        elif kind == "name":
            assert names is not None
            index = draw(st.integers(0, len(names) - 1))
            name = names[index]
            texts.append(draw(st.sampled_from([name, name.upper(), name.title()])))
            values.add(index + name_base)
        elif kind == "range":
            with_step = draw(st.booleans())
            texts.append(f"{first}-{last}/{step}" if with_step else f"{first}-{last}")
            values.update(range(first, last + 1, step if with_step else 1))
        else:
            # `a/n` runs from a to the end of the field, as cronie reads it.
            texts.append(f"{first}/{step}")
            values.update(range(first, high + 1, step))
    return FieldSpec(",".join(texts), frozenset(values))


@dataclass(frozen=True)
class Expression:
    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    day_field_star: bool
    weekday_field_star: bool

    def day_matches(self, day: date) -> bool:
        """Tell whether `day` matches, with either restricted day field enough."""
        if day.month not in self.months:
            return False
        day_match = day.day in self.days
        weekday_match = (day.weekday() + 1) % 7 in self.weekdays
        if self.day_field_star or self.weekday_field_star:
            return day_match and weekday_match
        return day_match or weekday_match


@st.composite
def expressions(draw: st.DrawFn) -> Expression:
    minute = draw(cron_fields(0, 59, None, 0))
    hour = draw(cron_fields(0, 23, None, 0))
    day = draw(cron_fields(1, 31, None, 0))
    month = draw(cron_fields(1, 12, MONTH_NAMES, 1))
    weekday = draw(cron_fields(0, 7, WEEKDAY_NAMES, 0))
    # For a day-of-month and month pair that no calendar has, APScheduler
    # searches every year up to 9999 for each fire time, which is slow, so
    # such pairs are left out.
    assume(
        any(
            number <= calendar.monthrange(2028, month_number)[1]
            for number in day.values
            for month_number in month.values
        )
    )
    return Expression(
        text=" ".join(field.text for field in (minute, hour, day, month, weekday)),
        minutes=minute.values,
        hours=hour.values,
        days=day.values,
        months=month.values,
        weekdays=frozenset(value % 7 for value in weekday.values),
        day_field_star=day.text.startswith("*"),
        weekday_field_star=weekday.text.startswith("*"),
    )


def scan_fire_times(
    expression: Expression, start: datetime, count: int, end: datetime
) -> list[datetime]:
    """Scan minute by minute from `start` for the first `count` matching minutes.

    A day that does not match is skipped whole, and so is an hour that does
    not, which changes nothing because neither can hold a matching minute.
    """
    times: list[datetime] = []
    moment = start
    while moment < end and len(times) < count:
        if not expression.day_matches(moment.date()):
            moment = datetime.combine(
                moment.date() + timedelta(days=1), datetime.min.time(), UTC
            )
        elif moment.hour not in expression.hours:
            moment = moment.replace(minute=0) + timedelta(hours=1)
        else:
            if moment.minute in expression.minutes:
                times.append(moment)
            moment += timedelta(minutes=1)
    return times


@settings(max_examples=150, deadline=None)
@given(
    expression=expressions(),
    start=st.datetimes(
        min_value=datetime(2024, 1, 1), max_value=datetime(2030, 12, 31)
    ).map(lambda moment: moment.replace(second=0, microsecond=0, tzinfo=UTC)),
)
def test_crontab_trigger_matches_minute_scan(
    expression: Expression, start: datetime
) -> None:
    """Test the trigger's next fire times against a scan with crontab(5) rules."""
    end = start + timedelta(days=3 * 366)
    count = 6

    expected = scan_fire_times(expression, start, count, end)
    actual = [
        moment for moment in fire_times(expression.text, start, count) if moment < end
    ]

    assert actual == expected


@settings(max_examples=150, deadline=None)
@given(
    expression=expressions(),
    moment=st.datetimes(
        min_value=datetime(2024, 1, 1), max_value=datetime(2030, 12, 31)
    ),
)
def test_crontab_spec_matches_rules(expression: Expression, moment: datetime) -> None:
    spec = parse_crontab(expression.text)

    expected = (
        expression.day_matches(moment.date())
        and moment.hour in expression.hours
        and moment.minute in expression.minutes
    )

    assert spec.matches(moment) is expected
