"""Crontab expressions with crontab(5) meaning, and the APScheduler triggers for them.

APScheduler 3's `CronTrigger.from_crontab` numbers weekdays from Monday = 0, so
`0 9 * * 1` fires on Tuesdays there, and it always combines day of month and day
of week with AND. crontab(5) numbers them from Sunday = 0 (7 is Sunday too) and
fires when EITHER day field matches if both are restricted. This module parses
the expression itself and builds triggers with that meaning.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

_MONTH_NAMES = {
    name: number
    for number, name in enumerate(
        (
            "jan",
            "feb",
            "mar",
            "apr",
            "may",
            "jun",
            "jul",
            "aug",
            "sep",
            "oct",
            "nov",
            "dec",
        ),
        start=1,
    )
}
_WEEKDAY_NAMES = {
    name: number
    for number, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))
}
# APScheduler's day_of_week names, indexed by crontab's weekday number (Sunday = 0).
_APSCHEDULER_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    low: int
    high: int
    names: dict[str, int]


_FIELDS = (
    _Field("minute", 0, 59, {}),
    _Field("hour", 0, 23, {}),
    _Field("day of month", 1, 31, {}),
    _Field("month", 1, 12, _MONTH_NAMES),
    _Field("day of week", 0, 7, _WEEKDAY_NAMES),
)


@dataclass(frozen=True, slots=True)
class CrontabSpec:
    """A parsed five-field crontab expression; weekdays count from Sunday = 0."""

    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    # crontab(5): a day field that starts with `*` does not restrict the day, and
    # only when both day fields restrict it does either one match.
    days_restricted: bool
    weekdays_restricted: bool

    def matches(self, moment: datetime) -> bool:
        """Tell whether the job fires in the minute of `moment` (a wall-clock time)."""
        if moment.minute not in self.minutes or moment.hour not in self.hours:
            return False
        return self.matches_day(moment.date())

    def matches_day(self, day: date) -> bool:
        """Tell whether the job fires at some time of `day`.

        Every parsed minute and hour field contains at least one value, so the
        day fields and the month alone decide.
        """
        if day.month not in self.months:
            return False
        day_match = day.day in self.days
        weekday_match = (day.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return day_match or weekday_match
        return day_match and weekday_match


def first_fire_day(spec: CrontabSpec, start: date, max_days: int) -> date | None:
    """Return the first day from `start` on which `spec` fires, or None.

    Looks at `max_days` days at most, so that an expression that never fires,
    such as `0 0 30 2 *`, returns None instead of searching for ever.
    """
    for offset in range(max_days):
        day = start + timedelta(days=offset)
        if spec.matches_day(day):
            return day
    return None


def parse_crontab(expression: str) -> CrontabSpec:
    """Parse `minute hour day-of-month month day-of-week` as crontab(5) reads it.

    Each field takes `*`, numbers, names (`jan`, `mon`) where crontab allows
    them, ranges `a-b`, steps `*/n` and `a-b/n`, and comma-separated lists.
    Raises ValueError naming the field and the text that is wrong.
    """
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(
            f"invalid cron expression {expression!r}: expected 5 fields "
            f"(minute hour day-of-month month day-of-week), got {len(fields)}"
        )
    values = [
        _parse_field(text, field) for text, field in zip(fields, _FIELDS, strict=True)
    ]
    weekdays = frozenset(day % 7 for day in values[4])
    return CrontabSpec(
        minutes=values[0],
        hours=values[1],
        days=values[2],
        months=values[3],
        weekdays=weekdays,
        days_restricted=not fields[2].startswith("*"),
        weekdays_restricted=not fields[4].startswith("*"),
    )


def _parse_field(text: str, field: _Field) -> frozenset[int]:
    result: set[int] = set()
    for part in text.split(","):
        result.update(_parse_part(part, field))
    return frozenset(result)


def _parse_part(part: str, field: _Field) -> range:
    def invalid(why: str) -> ValueError:
        return ValueError(f"invalid cron {field.name} field {part!r}: {why}")

    span, slash, step_text = part.partition("/")
    step = 1
    if slash:
        if not (step_text.isascii() and step_text.isdigit()) or int(step_text) == 0:
            raise invalid("the step after '/' must be a whole number of 1 or more")
        step = int(step_text)
    if span == "*":
        return range(field.low, field.high + 1, step)
    low_text, dash, high_text = span.partition("-")
    low = _parse_value(low_text, field, invalid)
    if dash:
        high = _parse_value(high_text, field, invalid)
    elif slash:
        # `a/n` is short for `a-<last>/n`, as in cronie and Vixie cron.
        high = field.high
    else:
        high = low
    if high < low:
        raise invalid(f"the range starts after it ends ({low} > {high})")
    return range(low, high + 1, step)


def _parse_value(text: str, field: _Field, invalid: Callable[[str], ValueError]) -> int:
    lowered = text.lower()
    if lowered in field.names:
        return field.names[lowered]
    if not (text.isascii() and text.isdigit()):
        raise invalid(f"{text!r} is not a number{' or a name' if field.names else ''}")
    value = int(text)
    if not field.low <= value <= field.high:
        raise invalid(f"{value} is outside {field.low}-{field.high}")
    return value


def _join(values: frozenset[int]) -> str:
    return ",".join(str(value) for value in sorted(values))


def crontab_trigger(expression: str, zone: tzinfo) -> BaseTrigger:
    """Build an APScheduler trigger that fires when crontab(5) would run `expression`."""
    spec = parse_crontab(expression)
    common: dict[str, Any] = {
        "minute": _join(spec.minutes),
        "hour": _join(spec.hours),
        "month": _join(spec.months),
        "timezone": zone,
    }
    days = _join(spec.days)
    weekdays = ",".join(_APSCHEDULER_WEEKDAYS[day] for day in sorted(spec.weekdays))
    if spec.days_restricted and spec.weekdays_restricted:
        return OrTrigger(
            [
                CronTrigger(day=days, day_of_week="*", **common),
                CronTrigger(day="*", day_of_week=weekdays, **common),
            ]
        )
    return CronTrigger(day=days, day_of_week=weekdays, **common)


def build_trigger(
    interval_seconds: float | None, cron: str | None, zone: tzinfo
) -> BaseTrigger:
    """Build the trigger for the configured interval or cron expression."""
    if cron is not None:
        return crontab_trigger(cron, zone)
    return IntervalTrigger(seconds=interval_seconds or 60, timezone=zone)


class SyncScheduler:
    """Calls `fire` on the schedule, starting at once, in the running event loop.

    `fire` must return quickly: it starts the sync and does not wait for it,
    because APScheduler cancels coroutine jobs that are still running when it
    shuts down, and a sync must be allowed to finish.
    """

    def __init__(
        self, trigger: BaseTrigger, zone: tzinfo, fire: Callable[[], Awaitable[None]]
    ) -> None:
        self._scheduler = AsyncIOScheduler(timezone=zone)
        self._scheduler.add_job(
            fire,
            trigger,
            id="sync",
            name="sync",
            next_run_time=datetime.now(zone),
            # A late run still runs, once, however late the loop was.
            misfire_grace_time=None,
            coalesce=True,
            max_instances=1,
        )

    def start(self) -> None:
        self._scheduler.start()

    def next_run_time(self) -> datetime | None:
        job = self._scheduler.get_job("sync")
        return None if job is None else job.next_run_time

    def stop(self) -> None:
        """Stop firing. A sync that `fire` started goes on running."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
