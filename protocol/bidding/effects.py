"""What the bidding state machines ask their driver to do.

The machines are sans-I/O: they return effects, and the agent runtime carries
them out (persist, then publish; start or cancel timers; document). Keeping the
effects as plain data is what lets the protocol be tested without a broker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from protocol.elements import Booking, StepCall, StepResult
from protocol.frame import Message
from protocol.selection import Offer, Ranked


@dataclass(frozen=True, slots=True)
class Send:
    """Publish `message`: to `message.receiver`'s inbox, or as a broadcast for `capability`."""

    message: Message
    capability: str | None = None  # set for a broadcast call for proposal


@dataclass(frozen=True, slots=True)
class Note:
    """Something worth logging and counting: late, duplicate, out-of-sequence, rejected input."""

    kind: str
    detail: str
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class Count:
    """Count an input without a record of its own: a further copy of a message already noted
    (a thousand copies of one call must not write a thousand rows)."""

    kind: str


# --- requester outcomes ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallIssued:
    round: int
    cfp_id: str
    reply_by: int


@dataclass(frozen=True, slots=True)
class Awarded:
    """The winner was chosen; `ranking` holds every valid bid with its score, best first."""

    round: int
    ranking: tuple[Ranked, ...]
    invalid: tuple[Offer, ...] = ()  # expired before the decision

    @property
    def winner(self) -> Offer:
        return self.ranking[0].offer


@dataclass(frozen=True, slots=True)
class Scheduled:
    provider: str
    booking: Booking


@dataclass(frozen=True, slots=True)
class Completed:
    provider: str
    result: StepResult


@dataclass(frozen=True, slots=True)
class Reawarded:
    """The winner withdrew before confirming; the award went to the runner-up in the same round."""

    round: int
    winner: Ranked
    reason: str  # why the previous winner is out


@dataclass(frozen=True, slots=True)
class Rebid:
    """The step goes out to bid again (no confirmation, a failure, an offer withdrawn)."""

    reason: str
    round: int


@dataclass(frozen=True, slots=True)
class Failed:
    reason: str


# --- provider outcomes ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Evaluate:
    """A call for proposal to answer: the driver decides, then calls `propose` or `refuse`."""

    call: StepCall
    requester: str
    reply_by: int | None


@dataclass(frozen=True, slots=True)
class Book:
    """The offer was accepted: turn the tentative hold into a work order."""

    booking: Booking


@dataclass(frozen=True, slots=True)
class Release:
    """Drop the tentative hold or booking: rejected, expired, or cancelled."""

    reason: str
    booked: bool = False  # a booking (not just a hold) is being cancelled


#: What a requester returns; the driver matches on the class (`match e: case Send(): ...`).
RequesterEffect: TypeAlias = (
    Send | Note | Count | CallIssued | Awarded | Scheduled | Completed | Reawarded | Rebid | Failed
)
#: What a provider returns.
ProviderEffect: TypeAlias = Send | Note | Count | Evaluate | Book | Release
#: Any effect of either machine.
Effect: TypeAlias = RequesterEffect | ProviderEffect
