"""Target names, topic templates and the AWS IoT Core topic limits."""

from __future__ import annotations

import re

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from eventsync.topics import (
    MAX_TOPIC_BYTES,
    MAX_TOPIC_SLASHES,
    TopicTemplate,
    target_problem,
    topic_problem,
)


@pytest.mark.parametrize(
    "target",
    [
        "lobby",
        "a",
        "room-101",
        "floor_2.east:north",
        "building/floor/room",
        "1/2/3/4/5/6/7/8",
        "büro",
        "会议室",
        "t" * 128,
    ],
)
def test_target_problem_accepts_valid_target(target: str) -> None:
    assert target_problem(target) is None


def test_target_problem_empty() -> None:
    assert target_problem("") == "target is empty"


def test_target_problem_too_long() -> None:
    problem = target_problem("t" * 129)

    assert problem == "target is 129 characters long, over the maximum of 128"


def test_target_problem_counts_characters_not_bytes() -> None:
    assert target_problem("é" * 128) is None


@pytest.mark.parametrize(
    ("target", "character"),
    [
        ("a+b", "+"),
        ("a/#", "#"),
        ("$SYS", "$"),
        ("a b", " "),
        ("a\tb", "\t"),
        ("a\nb", "\n"),
        ("a\x00b", "\x00"),
        ("a\u2003b", "\u2003"),
        ("a*b", "*"),
        ("a@b", "@"),
        ("a{b", "{"),
    ],
)
def test_target_problem_names_character(target: str, character: str) -> None:
    problem = target_problem(target)

    assert problem == (
        f"target contains the character {character!r}, which is not allowed"
    )


@pytest.mark.parametrize("target", ["/a", "a/", "a//b", "/", "//", "a/b/"])
def test_target_problem_empty_level(target: str) -> None:
    problem = target_problem(target)

    assert problem == "target has an empty level (a leading, trailing or doubled '/')"


def test_topic_problem_accepts_limits() -> None:
    assert topic_problem("t" * MAX_TOPIC_BYTES) is None
    assert topic_problem("/".join("abcdefgh")) is None


def test_topic_problem_too_many_bytes() -> None:
    topic = "t" * 255 + "é"

    problem = topic_problem(topic)

    assert problem is not None
    assert "is 257 bytes, over the AWS IoT Core maximum of 256" in problem


def test_topic_problem_too_many_slashes() -> None:
    problem = topic_problem("/".join("abcdefghi"))

    assert problem is not None
    assert "has 8 '/' characters, over the AWS IoT Core maximum of 7" in problem


def test_topic_template_parse_splits_placeholder() -> None:
    template = TopicTemplate.parse("site/{target}/events")

    assert template.prefix == "site/"
    assert template.suffix == "/events"
    assert template.render("lobby") == "site/lobby/events"


def test_topic_template_parse_placeholder_only() -> None:
    template = TopicTemplate.parse("{target}")

    assert template.render("a/b") == "a/b"


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        ("events/lobby", "must contain {target} exactly once"),
        ("{target}/{target}", "must contain {target} exactly once"),
        ("events/{Target}", "must contain {target} exactly once"),
        ("events/{site}/{target}", "may contain no placeholder other than {target}"),
        ("events/{target}}", "may contain no placeholder other than {target}"),
        ("events/+/{target}", "must not contain '+', '#' or NUL"),
        ("events/{target}/#", "must not contain '+', '#' or NUL"),
        ("events\x00/{target}", "must not contain '+', '#' or NUL"),
        ("$aws/{target}", "must not start with '$'"),
        ("{target}$", "must not start with '$'"),
        ("events//{target}", "must not have an empty topic level"),
        ("/events/{target}", "must not have an empty topic level"),
        ("events/{target}/", "must not have an empty topic level"),
        ("a/b/c/d/e/f/g/h/{target}", "leaves no room for a target"),
        ("e" * 256 + "{target}", "leaves no room for a target"),
    ],
)
def test_topic_template_parse_rejects(template: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        TopicTemplate.parse(template)


def test_topic_template_parse_accepts_limits() -> None:
    slashes = TopicTemplate.parse("a/b/c/d/e/f/g/{target}")
    size = TopicTemplate.parse("e" * 255 + "{target}")

    assert slashes.render("x").count("/") == MAX_TOPIC_SLASHES
    assert len(size.render("x")) == MAX_TOPIC_BYTES


noisy_text = st.text(st.sampled_from("ab/$+#{} \x00"), max_size=6)
levels = st.lists(st.text(st.sampled_from("ab$ "), min_size=1, max_size=3), max_size=3)
# Templates and targets built from non-empty levels, so that many are valid,
# mixed with noisy text that the checks must reject.
templates = st.one_of(
    st.builds(
        lambda prefix, suffix: prefix + "{target}" + suffix, noisy_text, noisy_text
    ),
    st.builds(
        lambda before, after: (
            "".join(level + "/" for level in before)
            + "{target}"
            + "".join("/" + level for level in after)
        ),
        levels,
        levels,
    ),
)
targets = st.one_of(
    st.lists(
        st.text(st.sampled_from("ab:.é"), min_size=1, max_size=3),
        min_size=1,
        max_size=4,
    ).map("/".join),
    st.text(st.sampled_from("ab/$+#:. \x00é"), max_size=10),
)


@settings(max_examples=300, deadline=None)
@given(template_text=templates, target=targets)
def test_topic_template_valid_parts_make_valid_topic(
    template_text: str, target: str
) -> None:
    """Test that a valid template and target always give a publishable topic name."""
    try:
        template = TopicTemplate.parse(template_text)
    except ValueError:
        return
    if target_problem(target) is not None:
        return
    topic = template.render(target)
    if topic_problem(topic) is not None:
        return
    event("valid topic")

    assert topic
    assert "+" not in topic
    assert "#" not in topic
    assert "\x00" not in topic
    assert not topic.startswith("$")
    assert "" not in topic.split("/")
