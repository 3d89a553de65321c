"""Targets, topic templates and the topic limits of AWS IoT Core."""

from __future__ import annotations

from dataclasses import dataclass

# AWS IoT Core rejects a topic longer than 256 bytes of UTF-8 or with more than
# seven forward slashes (AWS IoT Core quotas, "Topic size" and "Maximum number of
# slashes in topic and topic filter"). Mosquitto enforces neither, so they are
# checked here.
MAX_TOPIC_BYTES = 256
MAX_TOPIC_SLASHES = 7

MAX_TARGET_LENGTH = 128
_TARGET_PUNCTUATION = frozenset("_-.:")
PLACEHOLDER = "{target}"


def target_problem(target: str) -> str | None:
    """Return why `target` is not a valid target name, or None when it is valid.

    A target is 1 to 128 characters of letters, digits, `_ - . :`, and `/`
    between non-empty levels. That rules out the MQTT wildcards `+` and `#`, a
    leading `$` (reserved for broker topics), NUL and whitespace.
    """
    if not target:
        return "target is empty"
    if len(target) > MAX_TARGET_LENGTH:
        return f"target is {len(target)} characters long, over the maximum of {MAX_TARGET_LENGTH}"
    for level in target.split("/"):
        if not level:
            return "target has an empty level (a leading, trailing or doubled '/')"
        for character in level:
            if not (character.isalnum() or character in _TARGET_PUNCTUATION):
                return (
                    f"target contains the character {character!r}, which is not allowed"
                )
    return None


def topic_problem(topic: str) -> str | None:
    """Return why `topic` breaks the AWS IoT Core topic limits, or None."""
    size = len(topic.encode("utf-8"))
    if size > MAX_TOPIC_BYTES:
        return f"topic {topic!r} is {size} bytes, over the AWS IoT Core maximum of {MAX_TOPIC_BYTES}"
    slashes = topic.count("/")
    if slashes > MAX_TOPIC_SLASHES:
        return (
            f"topic {topic!r} has {slashes} '/' characters, "
            f"over the AWS IoT Core maximum of {MAX_TOPIC_SLASHES}"
        )
    return None


@dataclass(frozen=True, slots=True)
class TopicTemplate:
    """A topic with one `{target}` placeholder, such as `events/{target}`."""

    prefix: str
    suffix: str

    @classmethod
    def parse(cls, template: str) -> TopicTemplate:
        """Check `template` and split it around its placeholder.

        Raises ValueError with the reason when the template is unusable.
        """
        if template.count(PLACEHOLDER) != 1:
            raise ValueError(
                f"must contain {PLACEHOLDER} exactly once, got {template!r}"
            )
        prefix, suffix = template.split(PLACEHOLDER)
        fixed = prefix + suffix
        if "{" in fixed or "}" in fixed:
            raise ValueError(
                f"may contain no placeholder other than {PLACEHOLDER}, got {template!r}"
            )
        if "+" in fixed or "#" in fixed or "\x00" in fixed:
            raise ValueError(f"must not contain '+', '#' or NUL, got {template!r}")
        if template.startswith("$") or template.startswith(PLACEHOLDER + "$"):
            raise ValueError(
                f"must not start with '$', which brokers reserve, got {template!r}"
            )
        if "//" in template or template.startswith("/") or template.endswith("/"):
            raise ValueError(f"must not have an empty topic level, got {template!r}")
        # The shortest target is one character, so a template that breaks the
        # limits with it can never produce a valid topic.
        problem = topic_problem(prefix + "x" + suffix)
        if problem is not None:
            raise ValueError(f"leaves no room for a target: {problem}")
        return cls(prefix, suffix)

    def render(self, target: str) -> str:
        return f"{self.prefix}{target}{self.suffix}"
