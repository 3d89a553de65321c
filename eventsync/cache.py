"""What the broker holds: the digest of the last acknowledged payload per topic."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class CacheEntry:
    target: str
    # None when the broker's copy is unknown: a publish of this topic failed or
    # timed out, and the broker may hold either the old or the new payload.
    digest: bytes | None


class PublishedCache:
    """Topic -> digest of the payload the broker acknowledged last.

    An entry changes only on a PUBACK or a failed publish, so a topic counts as
    clean only when the broker confirmed exactly that payload.
    """

    def __init__(self) -> None:
        self._entries: dict[str, CacheEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, topic: object) -> bool:
        return topic in self._entries

    def is_current(self, topic: str, digest: bytes) -> bool:
        """Tell whether the broker is known to hold the payload with `digest`."""
        entry = self._entries.get(topic)
        return entry is not None and entry.digest == digest

    def dirty_count(self) -> int:
        """Return how many topics wait for a publish that the broker acknowledges."""
        return sum(1 for entry in self._entries.values() if entry.digest is None)

    def digest(self, topic: str) -> bytes | None:
        """Return the acknowledged digest of a topic, or None when it is unknown."""
        entry = self._entries.get(topic)
        return None if entry is None else entry.digest

    def topics(self) -> dict[str, str]:
        """Return topic -> target for every topic the cache tracks."""
        return {topic: entry.target for topic, entry in self._entries.items()}

    def acknowledged(self, topic: str, target: str, digest: bytes) -> None:
        self._entries[topic] = CacheEntry(target, digest)

    def failed(self, topic: str, target: str) -> None:
        """Record a publish without PUBACK: the topic stays dirty until one succeeds."""
        self._entries[topic] = CacheEntry(target, None)

    def forget(self, topic: str) -> None:
        """Stop tracking a topic, once the broker acknowledged its final payload."""
        self._entries.pop(topic, None)

    def invalidate(self) -> None:
        """Mark every topic unknown, so that the next sync publishes all of them."""
        for entry in self._entries.values():
            entry.digest = None
