"""Log lines: JSON shape, field order, repeat counting and library levels."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator, MutableMapping
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from eventsync import logs
from eventsync.logs import RepeatFilter, configure_logging


class FakeClock:
    """A monotonic clock that moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Give eventsync.logs a clock of its own, leaving the time module alone."""
    fake = FakeClock()
    monkeypatch.setattr(logs, "time", SimpleNamespace(monotonic=fake.monotonic))
    return fake


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put structlog and the standard logging setup back after a test changes them."""
    structlog_config = structlog.get_config()
    root = logging.getLogger()
    handlers = root.handlers[:]
    root_level = root.level
    library_levels = {
        name: logging.getLogger(name).level for name in logs._LIBRARY_LEVELS
    }
    yield
    structlog.configure(**structlog_config)
    root.handlers[:] = handlers
    root.setLevel(root_level)
    for name, level in library_levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture
def output(restore_logging: None, clock: FakeClock) -> io.StringIO:
    """Configure JSON logging at debug level into a string buffer."""
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    return stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def warning(event: str, **fields: Any) -> dict[str, Any]:
    return {"event": event, "level": "warning", **fields}


def test_repeat_filter_drops_repeat_in_window(clock: FakeClock) -> None:
    repeats = RepeatFilter(window_seconds=300)

    first = repeats(None, "warning", warning("publish_failed", topic="a"))
    clock.now += 299.9
    with pytest.raises(structlog.DropEvent):
        repeats(None, "warning", warning("publish_failed", topic="a"))

    assert "repeated" not in first


def test_repeat_filter_counts_dropped_copies(clock: FakeClock) -> None:
    repeats = RepeatFilter(window_seconds=300)
    repeats(None, "warning", warning("publish_failed", topic="a"))
    for _ in range(3):
        clock.now += 10
        with pytest.raises(structlog.DropEvent):
            repeats(None, "warning", warning("publish_failed", topic="a"))
    # The window counts from the copy last written, not the last dropped.
    clock.now = 1000.0 + 300

    written = repeats(None, "warning", warning("publish_failed", topic="a"))

    assert written["repeated"] == 3


def test_repeat_filter_window_restarts_after_write(clock: FakeClock) -> None:
    repeats = RepeatFilter(window_seconds=60)
    repeats(None, "warning", warning("x"))
    clock.now += 60
    repeats(None, "warning", warning("x"))
    clock.now += 59

    with pytest.raises(structlog.DropEvent):
        repeats(None, "warning", warning("x"))


def test_repeat_filter_passes_info(clock: FakeClock) -> None:
    repeats = RepeatFilter()
    record = {"event": "sync_completed", "level": "info"}

    first = repeats(None, "info", dict(record))
    second = repeats(None, "info", dict(record))

    assert first == record
    assert second == record


def test_repeat_filter_filters_errors(clock: FakeClock) -> None:
    repeats = RepeatFilter()
    repeats(None, "error", {"event": "sync_failed", "level": "error"})

    with pytest.raises(structlog.DropEvent):
        repeats(None, "error", {"event": "sync_failed", "level": "error"})


def test_repeat_filter_other_fields_pass(clock: FakeClock) -> None:
    repeats = RepeatFilter()
    repeats(None, "warning", warning("invalid_item", target="a"))

    other = repeats(None, "warning", warning("invalid_item", target="b"))
    other_event = repeats(None, "warning", warning("invalid_items", target="a"))

    assert other["target"] == "b"
    assert other_event["event"] == "invalid_items"


def test_repeat_filter_ignores_timestamp(clock: FakeClock) -> None:
    repeats = RepeatFilter()
    repeats(None, "warning", warning("x", timestamp="2026-01-01T00:00:00Z"))

    with pytest.raises(structlog.DropEvent):
        repeats(None, "warning", warning("x", timestamp="2026-01-01T00:00:05Z"))


def test_repeat_filter_forgets_oldest_key(clock: FakeClock) -> None:
    repeats = RepeatFilter(max_keys=2)
    for name in ("a", "b", "c"):
        repeats(None, "warning", warning(name))

    again = repeats(None, "warning", warning("a"))

    assert again["event"] == "a"
    with pytest.raises(structlog.DropEvent):
        repeats(None, "warning", warning("c"))


def library_record(
    name: str, level: int, message: str, *arguments: object
) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, arguments, None)


def test_repeat_filter_stdlib_same_template(clock: FakeClock) -> None:
    repeats = RepeatFilter(window_seconds=300)
    template = "There are %d pending publish calls."

    first = repeats.filter(library_record("mqtt", logging.WARNING, template, 3))
    second = repeats.filter(library_record("mqtt", logging.WARNING, template, 4))
    other_logger = repeats.filter(library_record("paho", logging.WARNING, template, 4))

    assert first is True
    assert second is False
    assert other_logger is True


def test_repeat_filter_stdlib_counts_repeats(clock: FakeClock) -> None:
    repeats = RepeatFilter(window_seconds=300)
    repeats.filter(library_record("mqtt", logging.ERROR, "lost"))
    repeats.filter(library_record("mqtt", logging.ERROR, "lost"))
    clock.now += 300
    record = library_record("mqtt", logging.ERROR, "lost")

    written = repeats.filter(record)

    assert written is True
    assert getattr(record, "repeated", None) == 1


def test_repeat_filter_stdlib_passes_info(clock: FakeClock) -> None:
    repeats = RepeatFilter()

    results = [
        repeats.filter(library_record("mqtt", logging.INFO, "connected"))
        for _ in range(3)
    ]

    assert results == [True, True, True]


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 120)), max_size=30
    )
)
def test_repeat_filter_matches_model(steps: list[tuple[str, int]]) -> None:
    """Test the filter against a model that writes each key once per window."""
    clock = FakeClock()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(logs, "time", SimpleNamespace(monotonic=clock.monotonic))
        repeats = RepeatFilter(window_seconds=60)
        written_at: dict[str, float] = {}
        dropped: dict[str, int] = {}
        for name, seconds in steps:
            clock.now += seconds
            expect_write = name not in written_at or clock.now - written_at[name] >= 60
            try:
                result: MutableMapping[str, Any] | None = repeats(
                    None, "warning", warning(name)
                )
            except structlog.DropEvent:
                result = None

            assert (result is not None) is expect_write
            if expect_write:
                assert result is not None
                assert result.get("repeated", 0) == dropped.get(name, 0)
                written_at[name] = clock.now
                dropped[name] = 0
            else:
                dropped[name] += 1


def test_configure_logging_json_line(output: io.StringIO) -> None:
    log = structlog.get_logger("eventsync.test")

    log.info("sync_completed", topics=3, published=1)

    [line] = lines(output)
    assert line["event"] == "sync_completed"
    assert line["level"] == "info"
    assert line["topics"] == 3
    assert line["published"] == 1
    assert line["timestamp"].endswith("Z")


def test_configure_logging_event_first(output: io.StringIO) -> None:
    log = structlog.get_logger("eventsync.test")

    log.warning("invalid_item", aaa="first by name", target="lobby")

    [line] = lines(output)
    assert list(line)[:3] == ["timestamp", "level", "event"]
    assert list(line)[3:] == ["aaa", "target"]


def test_configure_logging_one_object_per_line(output: io.StringIO) -> None:
    log = structlog.get_logger("eventsync.test")

    log.info("first", text="two\nlines")
    log.info("second")

    assert output.getvalue().count("\n") == 2
    assert [line["event"] for line in lines(output)] == ["first", "second"]


def test_configure_logging_library_record(output: io.StringIO) -> None:
    logging.getLogger("aiomqtt.client").warning("There are %d pending calls.", 5)

    [line] = lines(output)
    assert list(line)[:3] == ["timestamp", "level", "event"]
    assert line["event"] == "library_log"
    assert line["message"] == "There are 5 pending calls."
    assert line["logger"] == "aiomqtt.client"
    assert line["level"] == "warning"


def test_configure_logging_counts_repeats(
    output: io.StringIO, clock: FakeClock
) -> None:
    log = structlog.get_logger("eventsync.test")
    for _ in range(3):
        log.warning("publish_failed", topic="events/lobby")
    clock.now += 301

    log.warning("publish_failed", topic="events/lobby")

    written = lines(output)
    assert len(written) == 2
    assert "repeated" not in written[0]
    assert written[1]["repeated"] == 2


def test_configure_logging_level(restore_logging: None, clock: FakeClock) -> None:
    stream = io.StringIO()
    configure_logging("warning", "json", stream=stream)
    log = structlog.get_logger("eventsync.test")

    log.info("sync_completed")
    log.warning("sync_skipped")

    assert [line["event"] for line in lines(stream)] == ["sync_skipped"]


def test_configure_logging_debug_hides_botocore(output: io.StringIO) -> None:
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRETKEY"

    logging.getLogger("botocore.auth").debug("Signature: %s", secret)
    logging.getLogger("aiobotocore.endpoint").debug("Authorization: %s", secret)
    logging.getLogger("urllib3.connectionpool").info("header %s", secret)
    structlog.get_logger("eventsync.test").debug("debug_on")

    assert secret not in output.getvalue()
    assert [line["event"] for line in lines(output)] == ["debug_on"]
    assert logging.getLogger("botocore").level == logging.WARNING


def test_configure_logging_console_format(
    restore_logging: None, clock: FakeClock
) -> None:
    stream = io.StringIO()
    configure_logging("info", "console", stream=stream)

    structlog.get_logger("eventsync.test").info("sync_completed", topics=2)

    text = stream.getvalue()
    assert "sync_completed" in text
    assert "topics" in text
    assert "\x1b[" not in text
