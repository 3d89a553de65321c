"""One sync: read the table, compute every payload, publish those that changed."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

from eventsync.cache import PublishedCache
from eventsync.config import (
    AWS_IOT_MAX_PAYLOAD_BYTES,
    CoreSettings,
    MqttSettings,
    Settings,
)
from eventsync.errors import InvalidItemError, NotConnectedError
from eventsync.events import Event, ItemParser, ItemRules
from eventsync.logs import get_logger
from eventsync.payloads import (
    Payload,
    PayloadRules,
    build_payload,
    build_vanished_payload,
    payload_digest,
)
from eventsync.publisher import CONNECTION_LOST, MqttConnection, OutgoingMessage
from eventsync.quarantine import TopicQuarantine
from eventsync.store import EventStore
from eventsync.topics import TopicTemplate

log = get_logger("eventsync.sync")

# How many failed topics one `publish_failed` line names; the count covers all.
_MAX_TOPICS_LOGGED = 20


@dataclass(slots=True)
class TableSnapshot:
    """The valid events of a whole table scan, grouped by target."""

    events_by_target: dict[str, list[Event]] = field(default_factory=dict)
    items_read: int = 0
    invalid: int = 0


@dataclass(slots=True)
class SyncReport:
    """The numbers of one sync, as the `sync_completed` log line carries them."""

    events_read: int = 0
    invalid: int = 0
    topics: int = 0
    published: int = 0
    unchanged: int = 0
    failed: int = 0
    # Changed topics held back because publishing them dropped the connection.
    quarantined: int = 0
    truncated: int = 0
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether every changed topic was acknowledged."""
        return self.failed == 0 and self.quarantined == 0


def item_rules(settings: Settings | CoreSettings) -> ItemRules:
    """Return the item rules of `settings`.

    Without an `[mqtt]` section, which the operator commands allow, targets
    are checked against the default topic template and payload limit.
    """
    mqtt = settings.mqtt
    if mqtt is None:
        template = TopicTemplate.parse(
            MqttSettings.model_fields["topic_template"].default
        )
        max_payload_bytes = AWS_IOT_MAX_PAYLOAD_BYTES
    else:
        template = mqtt.template
        max_payload_bytes = mqtt.max_payload_bytes
    return ItemRules(
        timezone=settings.sync.zone,
        topic_template=template,
        max_payload_bytes=max_payload_bytes,
    )


def payload_rules(settings: Settings) -> PayloadRules:
    return PayloadRules(
        lookahead_seconds=settings.sync.lookahead,
        grace_seconds=settings.sync.grace,
        max_events=settings.sync.max_events_per_topic,
        max_payload_bytes=settings.mqtt.max_payload_bytes,
    )


async def read_table(
    store: EventStore, rules: ItemRules, parser: ItemParser | None = None
) -> TableSnapshot:
    """Scan the whole table and parse every item, logging each invalid one.

    A `parser` kept from scan to scan, built with the same `rules`, skips
    parsing the items that did not change. Raises StoreError when any page
    fails, so nothing is built from a partial scan.
    """
    if parser is None:
        parser = ItemParser(rules)
    elif parser.rules != rules:
        raise ValueError("the parser was built with other item rules")
    parser.start_scan()
    snapshot = TableSnapshot()
    grouped: defaultdict[str, list[Event]] = defaultdict(list)
    async for page in store.scan_pages():
        snapshot.items_read += len(page)
        for item in page:
            try:
                event = parser.parse(item)
            except InvalidItemError as exc:
                snapshot.invalid += 1
                log.warning(
                    "invalid_item",
                    target=exc.target,
                    event_id=exc.event_id,
                    reason=exc.reason,
                )
                continue
            grouped[event.target].append(event)
    parser.finish_scan()
    snapshot.events_by_target = dict(grouped)
    return snapshot


class Syncer:
    """Computes payloads from the table and publishes the ones the broker lacks."""

    def __init__(
        self,
        settings: Settings,
        store: EventStore,
        connection: MqttConnection | None,
        cache: PublishedCache | None = None,
        quarantine: TopicQuarantine | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._connection = connection
        self._cache = cache if cache is not None else PublishedCache()
        self._item_rules = item_rules(settings)
        self._parser = ItemParser(self._item_rules)
        self._payload_rules = payload_rules(settings)
        self._template = settings.mqtt.template
        self._connection_count = 0
        self._quarantine = quarantine if quarantine is not None else TopicQuarantine()

    @property
    def cache(self) -> PublishedCache:
        return self._cache

    def payloads(self, snapshot: TableSnapshot, now: float) -> Iterator[Payload]:
        """Yield the payload of every target in the table, then of every vanished one.

        A vanished target is one the cache still tracks but the table no longer
        has any valid event for.
        """
        present: set[str] = set()
        for target, events in snapshot.events_by_target.items():
            topic = self._template.render(target)
            present.add(topic)
            yield build_payload(target, topic, events, now, self._payload_rules)
        clear = self._settings.sync.on_empty == "clear"
        for topic, target in self._cache.topics().items():
            if topic not in present:
                yield build_vanished_payload(target, topic, clear=clear)

    async def run(self, now: float | None = None) -> SyncReport:
        """Run one sync and log `sync_completed` with its numbers.

        Raises StoreError when the table cannot be read (the cache is then
        untouched) and NotConnectedError when changed topics exist but no
        connection came up in time.
        """
        started = time.perf_counter()
        snapshot = await read_table(self._store, self._item_rules, self._parser)
        if now is None:
            now = time.time()

        report = SyncReport(events_read=snapshot.items_read, invalid=snapshot.invalid)
        self._forget_broker_state_after_reconnect()
        changed: list[Payload] = []
        vanished: list[str] = []
        for payload in self.payloads(snapshot, now):
            report.topics += 1
            if payload.truncated:
                report.truncated += 1
                log.warning(
                    "payload_truncated",
                    topic=payload.topic,
                    events=payload.event_count,
                    dropped=payload.dropped,
                )
            if self._cache.is_current(payload.topic, payload.digest):
                report.unchanged += 1
            elif payload.vanished:
                vanished.append(payload.topic)
                changed.append(payload)
            else:
                changed.append(payload)

        if vanished and not snapshot.events_by_target:
            changed = self._hold_empty_table(changed, vanished)
        elif vanished:
            log.info(
                "targets_vanished",
                count=len(vanished),
                topics=sorted(vanished)[:_MAX_TOPICS_LOGGED],
            )

        if changed:
            await self._publish(changed, report)

        log.info(
            "sync_completed",
            duration_seconds=round(time.perf_counter() - started, 3),
            events_read=report.events_read,
            invalid=report.invalid,
            topics=report.topics,
            published=report.published,
            unchanged=report.unchanged,
            failed=report.failed,
            quarantined=report.quarantined,
            truncated=report.truncated,
        )
        return report

    def _hold_empty_table(
        self, changed: list[Payload], vanished: list[str]
    ) -> list[Payload]:
        """Return `changed` without the vanished topics, unless empty tables are allowed.

        A table without a single valid event, while the broker still carries
        events this process published, is more often a wrong, recreated or
        half-restored table, or a writer whose items all break the rules, than
        every event deleted at once. Emptying the topics would blank the whole
        fleet, so by default they keep their payloads and stay tracked.
        """
        if self._settings.sync.allow_empty_table:
            log.warning(
                "targets_vanished",
                count=len(vanished),
                topics=sorted(vanished)[:_MAX_TOPICS_LOGGED],
                reason="the table holds no valid event",
            )
            return changed
        log.error(
            "empty_table_held",
            topics=len(vanished),
            reason="the table holds no valid event, so no topic is emptied; "
            "set sync.allow_empty_table = true if the table is empty on purpose",
        )
        return [payload for payload in changed if not payload.vanished]

    def _forget_broker_state_after_reconnect(self) -> None:
        connection = self._connection
        if connection is None or not self._settings.mqtt.republish_after_reconnect:
            return
        if connection.connection_count != self._connection_count:
            if self._connection_count:
                self._cache.invalidate()
            self._connection_count = connection.connection_count

    async def _publish(self, changed: list[Payload], report: SyncReport) -> None:
        connection = self._connection
        if connection is None or not await connection.wait_connected(
            self._settings.mqtt.connect_timeout_seconds
        ):
            for payload in changed:
                self._cache.failed(payload.topic, payload.target)
            raise NotConnectedError(
                f"not connected to the MQTT broker; {len(changed)} changed topics stay dirty"
            )

        # Topics under suspicion of dropping the connection go last, one at a
        # time, so that they cannot fail the others; held-back ones wait.
        moment = time.monotonic()
        regular: list[Payload] = []
        suspects: list[Payload] = []
        for payload in changed:
            if self._quarantine.is_held(payload.topic, moment):
                report.quarantined += 1
                self._cache.failed(payload.topic, payload.target)
            elif self._quarantine.is_suspect(payload.topic):
                suspects.append(payload)
            else:
                regular.append(payload)

        by_topic = {payload.topic: payload for payload in changed}
        lost_in_flight: list[str] = []

        def on_result(message: OutgoingMessage, error: str | None) -> None:
            payload = by_topic[message.topic]
            if error is not None:
                report.failed += 1
                report.failures[payload.topic] = error
                self._cache.failed(payload.topic, payload.target)
                if error == CONNECTION_LOST:
                    lost_in_flight.append(payload.topic)
                return
            report.published += 1
            self._quarantine.acknowledged(payload.topic)
            if payload.vanished:
                # The final payload of a vanished target is on the broker, so
                # the topic need not be tracked (or published) again.
                self._cache.forget(payload.topic)
            else:
                self._cache.acknowledged(
                    payload.topic, payload.target, payload_digest(message.body)
                )

        await connection.publish_many(_messages(regular), on_result)
        self._quarantine.connection_lost(lost_in_flight)

        for payload in suspects:
            lost_in_flight.clear()
            await connection.wait_connected(self._settings.mqtt.connect_timeout_seconds)
            await connection.publish_many(_messages([payload]), on_result)
            if lost_in_flight:
                seconds, strikes = self._quarantine.hold(
                    payload.topic, time.monotonic()
                )
                log.error(
                    "topic_quarantined",
                    topic=payload.topic,
                    retry_in_seconds=round(seconds),
                    strikes=strikes,
                    reason="the broker closed the connection when this topic alone was "
                    "published; an AWS IoT Core policy that denies the topic does this",
                )

        if report.failures:
            log.warning(
                "publish_failed",
                failed=report.failed,
                errors=dict(Counter(report.failures.values())),
                topics=sorted(report.failures)[:_MAX_TOPICS_LOGGED],
            )


def _messages(payloads: list[Payload]) -> Iterator[OutgoingMessage]:
    return (OutgoingMessage(payload.topic, payload.body) for payload in payloads)
