"""The retained payload of one target, computed from its events and the time.

A payload depends only on the events and on which side of each change instant
the time falls, so it is byte-for-byte the same between two change instants and
the cache can compare digests.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

from eventsync.encoding import PAYLOAD_TAIL_MAX, encode_json, format_utc, payload_head
from eventsync.events import MAX_EPOCH_SECONDS, Event

PAYLOAD_VERSION = 1


@dataclass(frozen=True, slots=True)
class PayloadRules:
    """The window and size limits that decide which events a payload carries."""

    lookahead_seconds: float
    grace_seconds: float
    max_events: int
    max_payload_bytes: int


@dataclass(frozen=True, slots=True)
class Payload:
    """One retained message: its topic, body and what was left out of it."""

    topic: str
    target: str
    body: bytes
    event_count: int
    # Events in the window that the count or size limits left out.
    dropped: int
    next_change_at: int | None
    # True for the final payload of a target that is no longer in the table.
    vanished: bool = False

    @property
    def truncated(self) -> bool:
        return self.dropped > 0

    @property
    def digest(self) -> bytes:
        return payload_digest(self.body)


def payload_digest(body: bytes) -> bytes:
    """Return the digest the cache keeps for a payload body."""
    return hashlib.blake2b(body, digest_size=16).digest()


def build_payload(
    target: str, topic: str, events: Iterable[Event], now: float, rules: PayloadRules
) -> Payload:
    """Build the payload of `target` at the instant `now` (epoch seconds).

    The payload carries the events whose `ends_at` plus grace is after `now` and
    whose `starts_at` is before `now` plus lookahead, sorted by `starts_at` then
    event id, and cut to the count and size limits from the far end.
    """
    window_end = now + rules.lookahead_seconds
    in_window: list[Event] = []
    # The earliest instant at which an event outside the window enters it.
    next_entry = math.inf
    for event in events:
        if event.expires_at is not None and event.expires_at <= now:
            continue
        if event.ends_at + rules.grace_seconds <= now:
            continue
        if event.starts_at < window_end:
            in_window.append(event)
            continue
        entry = event.starts_at - rules.lookahead_seconds
        if entry >= now and (event.expires_at is None or event.expires_at > entry):
            # At entry == now the event is still outside the window, and it is
            # inside from the next whole second on.
            next_entry = min(next_entry, entry if entry > now else math.floor(now) + 1)
    in_window.sort(key=_event_order)

    head = payload_head(target)
    kept = _fit(in_window, rules, len(head))

    next_change = next_entry
    for event in kept:
        next_change = min(next_change, event.ends_at + rules.grace_seconds)
        if event.expires_at is not None:
            next_change = min(next_change, event.expires_at)
    dropped_events = in_window[len(kept) :]
    if dropped_events:
        # The `truncated` flag goes once the last dropped event leaves.
        next_change = min(
            next_change, max(_leaves_at(event, rules) for event in dropped_events)
        )
    next_change_at = (
        None
        if math.isinf(next_change)
        else min(math.ceil(next_change), MAX_EPOCH_SECONDS)
    )

    dropped = len(in_window) - len(kept)
    parts = [head, b",".join(event.encoded for event in kept), b'],"next_change_at":']
    parts.append(
        b"null" if next_change_at is None else encode_json(format_utc(next_change_at))
    )
    if dropped:
        parts.append(b',"truncated":true')
    parts.append(b"}")
    return Payload(topic, target, b"".join(parts), len(kept), dropped, next_change_at)


def build_vanished_payload(target: str, topic: str, *, clear: bool) -> Payload:
    """Build the payload for a target that is no longer in the table.

    With `clear`, the body is empty: a zero-byte retained message makes the
    broker delete the retained message of the topic.
    """
    if clear:
        return Payload(topic, target, b"", 0, 0, None, vanished=True)
    body = payload_head(target) + b'],"next_change_at":null}'
    return Payload(topic, target, body, 0, 0, None, vanished=True)


def _leaves_at(event: Event, rules: PayloadRules) -> float:
    leaves = event.ends_at + rules.grace_seconds
    if event.expires_at is not None:
        leaves = min(leaves, event.expires_at)
    return leaves


def _event_order(event: Event) -> tuple[int, str]:
    return (event.starts_at, event.event_id)


def _fit(events: list[Event], rules: PayloadRules, head_size: int) -> list[Event]:
    """Return the longest prefix of `events` within the count and size limits.

    The size check counts the longest envelope tail, so a payload can end up a
    few bytes under the limit but never over it.
    """
    kept = events[: rules.max_events]
    budget = rules.max_payload_bytes - head_size - len(PAYLOAD_TAIL_MAX)
    size = 0
    for index, event in enumerate(kept):
        size += len(event.encoded) + (1 if index else 0)
        if size > budget:
            return kept[:index]
    return kept
