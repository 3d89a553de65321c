"""The heartbeat file that container health checks read."""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta
from pathlib import Path

from eventsync.config import SyncSettings
from eventsync.schedule import build_trigger

# Slack on top of two sync periods: a cold sync of a large fleet, paced to AWS
# IoT Core's publish rate, takes minutes.
HEALTH_SLACK_SECONDS = 300.0


def touch_heartbeat(path: Path) -> None:
    """Set the heartbeat file's modification time to now, creating it if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    os.utime(path)


def default_max_age_seconds(sync: SyncSettings) -> float:
    """Return how old the heartbeat may get before the service counts as unhealthy.

    Two sync periods plus slack. For a cron schedule, the longest gap between
    the next ten firings is used as the period.
    """
    period = sync.period_seconds
    if period is None:
        trigger = build_trigger(None, sync.cron, sync.zone)
        now = datetime.now(sync.zone)
        previous = None
        fire = trigger.get_next_fire_time(None, now)
        period = 0.0
        for _ in range(10):
            if fire is None:
                break
            if previous is not None:
                period = max(period, (fire - previous).total_seconds())
            previous = fire
            fire = trigger.get_next_fire_time(fire, fire + timedelta(seconds=1))
        period = period or 86400.0
    return 2 * period + HEALTH_SLACK_SECONDS


def check_heartbeat(path: Path, max_age_seconds: float) -> tuple[bool, str]:
    """Return whether the heartbeat is fresh, with a one-line explanation."""
    try:
        modified = path.stat().st_mtime
    except FileNotFoundError:
        return (
            False,
            f"unhealthy: heartbeat file {str(path)!r} not found (no sync has completed yet)",
        )
    except OSError as exc:
        return (
            False,
            f"unhealthy: heartbeat file {str(path)!r} cannot be read: {exc.strerror}",
        )
    age = time.time() - modified
    if age > max_age_seconds:
        return False, (
            f"unhealthy: last completed sync {age:.0f} s ago, over the maximum of {max_age_seconds:.0f} s"
        )
    return True, f"healthy: last completed sync {age:.0f} s ago"
