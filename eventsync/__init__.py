"""Publish the active events of a DynamoDB table as retained MQTT messages."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("eventsync")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
