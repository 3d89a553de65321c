"""structlog setup: one JSON object per line on stdout, repeats counted, not flooded."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections import OrderedDict
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

# Client libraries whose own records go through the same renderer. botocore
# stays at WARNING even in debug mode, because its debug records carry request
# headers and signatures.
_LIBRARY_LEVELS = {
    "aiobotocore": logging.WARNING,
    "botocore": logging.WARNING,
    "urllib3": logging.WARNING,
    "aiohttp": logging.WARNING,
    "apscheduler": logging.WARNING,
    "mqtt": logging.INFO,
    "paho": logging.INFO,
}
# Fields that differ between two reports of the same problem.
_VOLATILE_FIELDS = frozenset(
    {"timestamp", "level", "_record", "_from_structlog", "repeated"}
)


class RepeatFilter:
    """Drop a warning or error that repeats within `window_seconds`, and count it.

    Two records repeat each other when they have the same event name and the
    same fields, or, for records of the standard logging module, the same
    logger and message template (so "There are %d pending publish calls." is
    one message whatever the number). The first record after the window carries
    `repeated`, the number of copies dropped since the last one written.
    """

    def __init__(self, window_seconds: float = 300.0, max_keys: int = 10_000) -> None:
        self._window_seconds = window_seconds
        self._max_keys = max_keys
        # key -> (time last written, copies dropped since)
        self._seen: OrderedDict[Any, tuple[float, int]] = OrderedDict()

    def __call__(
        self, logger: WrappedLogger, method_name: str, event_dict: EventDict
    ) -> EventDict:
        """Filter structlog's own records, as a processor."""
        if event_dict.get("level") not in ("warning", "error", "critical"):
            return event_dict
        key = tuple(
            sorted(
                (name, repr(value))
                for name, value in event_dict.items()
                if name not in _VOLATILE_FIELDS
            )
        )
        dropped = self._admit(key)
        if dropped is None:
            raise structlog.DropEvent
        if dropped:
            event_dict["repeated"] = dropped
        return event_dict

    def filter(self, record: logging.LogRecord) -> bool:
        """Filter records of the standard logging module, as a handler filter."""
        if record.levelno < logging.WARNING:
            return True
        dropped = self._admit(("stdlib", record.name, str(record.msg)))
        if dropped is None:
            return False
        if dropped:
            record.repeated = dropped
        return True

    def _admit(self, key: Any) -> int | None:
        """Return None to drop a record, else the copies dropped before it."""
        now = time.monotonic()
        previous = self._seen.get(key)
        dropped = 0
        if previous is not None:
            written_at, dropped = previous
            if now - written_at < self._window_seconds:
                self._seen[key] = (written_at, dropped + 1)
                return None
        self._seen[key] = (now, 0)
        self._seen.move_to_end(key)
        while len(self._seen) > self._max_keys:
            self._seen.popitem(last=False)
        return dropped


def _rename_library_event(
    logger: WrappedLogger, method_name: str, event_dict: EventDict
) -> EventDict:
    """Give records of the standard logging module an event name and their text."""
    record = event_dict.get("_record")
    if isinstance(record, logging.LogRecord):
        event_dict["message"] = event_dict.get("event")
        event_dict["event"] = "library_log"
        event_dict["logger"] = record.name
        repeated = getattr(record, "repeated", 0)
        if repeated:
            event_dict["repeated"] = repeated
    return event_dict


def _lead_with_event(
    logger: WrappedLogger, method_name: str, event_dict: EventDict
) -> EventDict:
    """Put timestamp, level and event first, so a line reads from its name."""
    ordered = {
        name: event_dict.pop(name)
        for name in ("timestamp", "level", "event")
        if name in event_dict
    }
    ordered.update(event_dict)
    return ordered


class _PipeSafeStream:
    """A text stream whose write and flush drop the text instead of raising OSError.

    A log line that cannot be written, for example because the reader of stdout
    closed the pipe, must not fail the sync or the signal handler that wrote it.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            return 0

    def flush(self) -> None:
        with contextlib.suppress(OSError):
            self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()


def configure_logging(
    level: str = "info", log_format: str = "json", stream: TextIO | None = None
) -> None:
    """Send eventsync's and the client libraries' records to `stream`, one per line.

    The stream defaults to stdout.
    """
    output: Any = _PipeSafeStream(sys.stdout if stream is None else stream)
    numeric_level = logging.getLevelName(level.upper())
    renderer: Processor
    if log_format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=output.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    repeats = RepeatFilter()
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]

    structlog.configure(
        processors=[
            *shared,
            repeats,
            structlog.processors.format_exc_info,
            _lead_with_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.WriteLoggerFactory(file=output),
        cache_logger_on_first_use=True,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, _rename_library_event],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _lead_with_event,
            renderer,
        ],
    )
    handler = logging.StreamHandler(output)
    handler.setFormatter(formatter)
    handler.addFilter(repeats)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    for name, library_level in _LIBRARY_LEVELS.items():
        logging.getLogger(name).setLevel(max(library_level, numeric_level))


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
