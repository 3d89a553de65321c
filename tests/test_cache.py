"""PublishedCache and TopicQuarantine, as state machines against simple models."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from eventsync.cache import PublishedCache
from eventsync.quarantine import TopicQuarantine

TOPICS = st.sampled_from(["events/a", "events/b", "events/c"])
DIGESTS = st.sampled_from([b"\x01" * 16, b"\x02" * 16, b"\x03" * 16])
STATE_MACHINE_SETTINGS = settings(
    max_examples=100, stateful_step_count=30, deadline=None
)


def test_published_cache_current_only_after_ack() -> None:
    cache = PublishedCache()

    before = cache.is_current("events/a", b"d1")
    cache.acknowledged("events/a", "a", b"d1")

    assert before is False
    assert cache.is_current("events/a", b"d1") is True
    assert cache.is_current("events/a", b"d2") is False
    assert cache.digest("events/a") == b"d1"


def test_published_cache_failed_makes_dirty() -> None:
    cache = PublishedCache()
    cache.acknowledged("events/a", "a", b"d1")

    cache.failed("events/a", "a")

    assert cache.is_current("events/a", b"d1") is False
    assert cache.digest("events/a") is None
    assert cache.dirty_count() == 1
    assert "events/a" in cache


def test_published_cache_invalidate_keeps_topics() -> None:
    cache = PublishedCache()
    cache.acknowledged("events/a", "a", b"d1")
    cache.acknowledged("events/b", "b", b"d2")

    cache.invalidate()

    assert cache.dirty_count() == 2
    assert cache.topics() == {"events/a": "a", "events/b": "b"}
    assert cache.is_current("events/a", b"d1") is False


def test_published_cache_forget() -> None:
    cache = PublishedCache()
    cache.failed("events/a", "a")

    cache.forget("events/a")
    cache.forget("events/never")

    assert len(cache) == 0
    assert "events/a" not in cache
    assert cache.dirty_count() == 0


class PublishedCacheMachine(RuleBasedStateMachine):
    """PublishedCache against a dict of topic to target and acknowledged digest."""

    def __init__(self) -> None:
        super().__init__()
        self.cache = PublishedCache()
        self.model: dict[str, tuple[str, bytes | None]] = {}

    @rule(topic=TOPICS, digest=DIGESTS)
    def acknowledged(self, topic: str, digest: bytes) -> None:
        self.cache.acknowledged(topic, topic.removeprefix("events/"), digest)
        self.model[topic] = (topic.removeprefix("events/"), digest)

    @rule(topic=TOPICS)
    def failed(self, topic: str) -> None:
        self.cache.failed(topic, topic.removeprefix("events/"))
        self.model[topic] = (topic.removeprefix("events/"), None)

    @rule(topic=TOPICS)
    def forget(self, topic: str) -> None:
        self.cache.forget(topic)
        self.model.pop(topic, None)

    @rule()
    def invalidate(self) -> None:
        self.cache.invalidate()
        self.model = {
            topic: (target, None) for topic, (target, _) in self.model.items()
        }

    @rule(topic=TOPICS, digest=DIGESTS)
    def check_current(self, topic: str, digest: bytes) -> None:
        entry = self.model.get(topic)
        expected = entry is not None and entry[1] == digest

        assert self.cache.is_current(topic, digest) is expected

    @invariant()
    def matches_model(self) -> None:
        assert len(self.cache) == len(self.model)
        assert self.cache.topics() == {
            topic: target for topic, (target, _) in self.model.items()
        }
        assert self.cache.dirty_count() == sum(
            1 for _, digest in self.model.values() if digest is None
        )
        for topic, (_, digest) in self.model.items():
            assert topic in self.cache
            assert self.cache.digest(topic) == digest


PublishedCacheMachine.TestCase.settings = STATE_MACHINE_SETTINGS
TestPublishedCacheMachine = PublishedCacheMachine.TestCase


@pytest.mark.parametrize(
    ("strikes", "seconds"),
    [(1, 60), (2, 120), (3, 240), (4, 480), (5, 960), (6, 1920), (7, 3600), (8, 3600)],
)
def test_topic_quarantine_hold_doubles_to_cap(strikes: int, seconds: float) -> None:
    quarantine = TopicQuarantine()
    result = (0.0, 0)
    for _ in range(strikes):
        result = quarantine.hold("events/a", 1000.0)

    assert result == (seconds, strikes)


def test_topic_quarantine_hold_many_strikes_stays_capped() -> None:
    quarantine = TopicQuarantine()
    for _ in range(200):
        seconds, _ = quarantine.hold("events/a", 0.0)

    assert seconds == 3600


def test_topic_quarantine_hold_ends() -> None:
    quarantine = TopicQuarantine()
    quarantine.hold("events/a", 1000.0)

    held_before_end = quarantine.is_held("events/a", 1059.9)
    held_at_end = quarantine.is_held("events/a", 1060.0)

    assert held_before_end is True
    assert held_at_end is False
    assert quarantine.is_suspect("events/a") is True


def test_topic_quarantine_suspect_then_acknowledged() -> None:
    quarantine = TopicQuarantine()
    quarantine.connection_lost(["events/a", "events/b"])

    quarantine.acknowledged("events/a")

    assert quarantine.is_suspect("events/a") is False
    assert quarantine.is_suspect("events/b") is True
    assert quarantine.is_held("events/b", 0.0) is False


def test_topic_quarantine_ack_resets_strikes() -> None:
    quarantine = TopicQuarantine()
    quarantine.connection_lost(["events/a"])
    quarantine.hold("events/a", 0.0)

    quarantine.acknowledged("events/a")
    seconds, strikes = quarantine.hold("events/a", 10.0)

    assert (seconds, strikes) == (60, 1)


def test_topic_quarantine_held_topics_sorted() -> None:
    quarantine = TopicQuarantine()
    quarantine.hold("events/c", 0.0)
    quarantine.hold("events/a", 0.0)
    quarantine.hold("events/b", -100.0)

    assert quarantine.held_topics(10.0) == ["events/a", "events/c"]


class TopicQuarantineMachine(RuleBasedStateMachine):
    """TopicQuarantine against a set of suspects and the end and strikes per hold."""

    def __init__(self) -> None:
        super().__init__()
        self.quarantine = TopicQuarantine()
        self.now = 0.0
        self.suspects: set[str] = set()
        self.holds: dict[str, tuple[float, int]] = {}

    @initialize(start=st.floats(0, 1e6))
    def start_clock(self, start: float) -> None:
        self.now = start

    @rule(seconds=st.sampled_from([0.0, 1.0, 59.0, 60.0, 600.0, 3600.0, 7200.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule(topics=st.lists(TOPICS, max_size=3))
    def connection_lost(self, topics: list[str]) -> None:
        self.quarantine.connection_lost(topics)
        self.suspects.update(topics)

    @rule(topic=TOPICS)
    def hold(self, topic: str) -> None:
        strikes = self.holds[topic][1] + 1 if topic in self.holds else 1
        expected_seconds = min(3600.0, 60.0 * 2 ** (strikes - 1))

        seconds, actual_strikes = self.quarantine.hold(topic, self.now)

        assert seconds == expected_seconds
        assert actual_strikes == strikes
        self.holds[topic] = (self.now + expected_seconds, strikes)
        self.suspects.discard(topic)

    @rule(topic=TOPICS)
    def acknowledged(self, topic: str) -> None:
        self.quarantine.acknowledged(topic)
        self.suspects.discard(topic)
        self.holds.pop(topic, None)

    @precondition(lambda self: bool(self.holds))
    @rule(topic=TOPICS)
    def forget(self, topic: str) -> None:
        self.quarantine.forget(topic)
        self.suspects.discard(topic)
        self.holds.pop(topic, None)

    @invariant()
    def matches_model(self) -> None:
        held_topics = sorted(
            topic for topic, (until, _) in self.holds.items() if self.now < until
        )

        assert self.quarantine.held_topics(self.now) == held_topics
        for topic in ("events/a", "events/b", "events/c"):
            assert self.quarantine.is_held(topic, self.now) is (topic in held_topics)
            assert self.quarantine.is_suspect(topic) is (
                topic in self.suspects or topic in self.holds
            )


TopicQuarantineMachine.TestCase.settings = STATE_MACHINE_SETTINGS
TestTopicQuarantineMachine = TopicQuarantineMachine.TestCase
