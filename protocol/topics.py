"""The topic scheme and agent short names.

The sender's short name is part of every topic an agent publishes on, so the
broker's ACL (`pattern write i40/+/to/+/%u`) can stop an agent from speaking as
another one, and a receiver can check that the frame's sender is the one the
topic (and so the broker's authentication) vouches for.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

SHORT_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?")
ROOT = "i40"


class TopicError(ValueError):
    """A topic or short name outside the scheme."""


class Channel(StrEnum):
    CFP = "cfp"
    TO = "to"
    EVENTS = "events"


def check_name(name: str, what: str = "short name") -> str:
    """Return `name` if it is a valid short name (`[a-z0-9-]+`, 1–64 chars, no edge hyphen)."""
    if not isinstance(name, str) or not SHORT_NAME.fullmatch(name):
        raise TopicError(f"{what} {name!r} is not a valid short name ([a-z0-9-], 1-64 chars, no edge '-')")
    return name


def cfp_topic(ns: str, capability: str, sender: str) -> str:
    return f"{ROOT}/{ns}/cfp/{capability}/{sender}"


def direct_topic(ns: str, receiver: str, sender: str) -> str:
    return f"{ROOT}/{ns}/to/{receiver}/{sender}"


def events_topic(ns: str, sender: str) -> str:
    return f"{ROOT}/{ns}/events/{sender}"


def inbox_filter(ns: str, me: str) -> str:
    return f"{ROOT}/{ns}/to/{me}/+"


def cfp_filter(ns: str, capability: str) -> str:
    return f"{ROOT}/{ns}/cfp/{capability}/+"


def events_filter(ns: str) -> str:
    return f"{ROOT}/{ns}/events/+"


def namespace_filter(ns: str) -> str:
    return f"{ROOT}/{ns}/#"


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed topic: channel, namespace, the sender, and the receiver or capability."""

    ns: str
    channel: Channel
    sender: str
    receiver: str | None = None
    capability: str | None = None


def parse_topic(topic: str) -> Topic:
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != ROOT:
        raise TopicError(f"topic {topic!r} is not under {ROOT}/<ns>/...")
    ns, channel = parts[1], parts[2]
    if channel == Channel.CFP and len(parts) == 5:
        return Topic(
            ns, Channel.CFP, check_name(parts[4], "sender"), capability=check_name(parts[3], "capability")
        )
    if channel == Channel.TO and len(parts) == 5:
        return Topic(
            ns, Channel.TO, check_name(parts[4], "sender"), receiver=check_name(parts[3], "receiver")
        )
    if channel == Channel.EVENTS and len(parts) == 4:
        return Topic(ns, Channel.EVENTS, check_name(parts[3], "sender"))
    raise TopicError(f"topic {topic!r} does not fit the scheme i40/<ns>/(cfp/<cap>|to/<rcv>|events)/<sender>")


def check_sender(topic: Topic, frame_sender_id: str, short_name_of: Callable[[str], str | None]) -> None:
    """Raise TopicError unless the frame's sender AAS id belongs to the topic's sender.

    `short_name_of` maps an AAS id to the short name it is registered under (the
    registry, cached); an unknown id is rejected, since nobody vouches for it.
    """
    owner = short_name_of(frame_sender_id)
    if owner is None:
        raise TopicError(f"sender {frame_sender_id!r} is not registered in namespace {topic.ns!r}")
    if owner != topic.sender:
        raise TopicError(
            f"frame sender {frame_sender_id!r} belongs to {owner!r} but was published by {topic.sender!r}"
        )


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic-filter matching (`+` one level, `#` the rest), used to count local deliveries."""
    f_parts = topic_filter.split("/")
    t_parts = topic.split("/")
    for i, f in enumerate(f_parts):
        if f == "#":
            return True
        if i >= len(t_parts):
            return False
        if f != "+" and f != t_parts[i]:
            return False
    return len(f_parts) == len(t_parts)
