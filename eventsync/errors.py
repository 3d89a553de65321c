"""Exceptions raised by eventsync, each carrying the value that caused it."""


class EventSyncError(Exception):
    """Base class of the errors eventsync raises on purpose."""


class ConfigError(EventSyncError):
    """An invalid setting, or a file named by a setting that cannot be used.

    The command line turns it into one line on stderr and exit status 2.
    """


class InvalidItemError(EventSyncError):
    """A table item that breaks the item rules and is skipped."""

    def __init__(self, target: str, event_id: str, reason: str) -> None:
        super().__init__(
            f"invalid item target={target!r} event_id={event_id!r}: {reason}"
        )
        self.target = target
        self.event_id = event_id
        self.reason = reason


class StoreError(EventSyncError):
    """A DynamoDB request that failed after the SDK's retries."""


class NotConnectedError(EventSyncError):
    """A publish was requested while no MQTT connection is open."""
