"""Topics whose publish makes the broker close the connection, held back with backoff.

AWS IoT Core disconnects a client that publishes to a topic its policy denies,
with no PUBACK and no reason. Publishing such a topic at every sync would drop
the connection at every sync and fail whatever else was in flight. A topic in
flight when the connection drops becomes a suspect. Suspects are published
last, one at a time. A suspect that drops the connection while it is the
only publish in flight is held back for a while that doubles on each repeat.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class _Hold:
    until: float
    strikes: int


class TopicQuarantine:
    """Suspect and held-back topics; times are `time.monotonic()` seconds."""

    def __init__(self, base_seconds: float = 60.0, max_seconds: float = 3600.0) -> None:
        self._base_seconds = base_seconds
        self._max_seconds = max_seconds
        self._suspects: set[str] = set()
        self._holds: dict[str, _Hold] = {}

    def is_held(self, topic: str, now: float) -> bool:
        hold = self._holds.get(topic)
        return hold is not None and now < hold.until

    def is_suspect(self, topic: str) -> bool:
        return topic in self._suspects or topic in self._holds

    def held_topics(self, now: float) -> list[str]:
        return sorted(topic for topic, hold in self._holds.items() if now < hold.until)

    def connection_lost(self, topics_in_flight: list[str]) -> None:
        """Record the topics in flight when the connection dropped in a pipelined batch."""
        self._suspects.update(topics_in_flight)

    def hold(self, topic: str, now: float) -> tuple[float, int]:
        """Hold back a topic that dropped the connection alone; return seconds and strikes."""
        previous = self._holds.get(topic)
        strikes = 1 if previous is None else previous.strikes + 1
        seconds = min(
            self._max_seconds, self._base_seconds * 2.0 ** min(strikes - 1, 32)
        )
        self._holds[topic] = _Hold(now + seconds, strikes)
        self._suspects.discard(topic)
        return seconds, strikes

    def acknowledged(self, topic: str) -> None:
        """Clear a topic once the broker acknowledged a publish of it."""
        self._suspects.discard(topic)
        self._holds.pop(topic, None)

    def forget(self, topic: str) -> None:
        """Drop a topic that is no longer published at all."""
        self.acknowledged(topic)
