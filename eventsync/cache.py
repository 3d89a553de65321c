"""The published cache: the digest of the last payload the broker acknowledged, per topic."""

from __future__ import annotations

# An entry is (target, digest). The digest is None when the broker's copy is
# unknown: a publish of this topic failed or timed out, and the broker may hold
# either the old or the new payload. Entries are plain tuples because CPython
# stops tracking a tuple of a str and bytes or None at the first garbage
# collection it survives, unlike a class instance. So a cold sync that
# acknowledges 10,000 topics adds no objects to the full collections of a
# process with a large table, and triggers fewer of them while it publishes.
_Entry = tuple[str, bytes | None]


class PublishedCache:
    """Topic -> digest of the payload the broker acknowledged last.

    An entry changes only on a PUBACK or a failed publish, so a topic counts as
    clean only when the broker confirmed exactly that payload.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, topic: object) -> bool:
        return topic in self._entries

    def is_current(self, topic: str, digest: bytes) -> bool:
        """Tell whether the broker is known to hold the payload with `digest`."""
        entry = self._entries.get(topic)
        return entry is not None and entry[1] == digest

    def dirty_count(self) -> int:
        """Return how many topics wait for a publish that the broker acknowledges."""
        return sum(1 for _, digest in self._entries.values() if digest is None)

    def digest(self, topic: str) -> bytes | None:
        """Return the acknowledged digest of a topic, or None when it is unknown."""
        entry = self._entries.get(topic)
        return None if entry is None else entry[1]

    def topics(self) -> dict[str, str]:
        """Return topic -> target for every topic the cache tracks."""
        return {topic: target for topic, (target, _) in self._entries.items()}

    def acknowledged(self, topic: str, target: str, digest: bytes) -> None:
        self._entries[topic] = (target, digest)

    def failed(self, topic: str, target: str) -> None:
        """Record a publish without PUBACK: the topic stays dirty until one succeeds."""
        self._entries[topic] = (target, None)

    def forget(self, topic: str) -> None:
        """Stop tracking a topic, once the broker acknowledged its final payload."""
        self._entries.pop(topic, None)

    def invalidate(self) -> None:
        """Mark every topic unknown, so that the next sync publishes all of them."""
        self._entries = {
            topic: (target, None) for topic, (target, _) in self._entries.items()
        }
