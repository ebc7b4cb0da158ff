"""The provider's side of one bidding round (VDI/VDE 2193-2), sans-I/O.

One `Provider` per call for proposal a resource answers. The resource decides
(capability, feasibility, schedule, price) outside; this machine enforces the
protocol around the decision: a proposal is binding until its `replyBy`, the
tentative hold is released on rejection or expiry, an acceptance books and is
confirmed, and the result or failure is reported to the requester.

Duplicates (same messageId) change nothing but re-send the answer already given:
that is how a requester that crashed and re-sent its last message learns the
provider's state without a new message type, and it keeps handlers idempotent.
A copy that comes within REPLAY_INTERVAL_MS of the message's first arrival or of the
last replay is only counted: a thousand copies of one call are answered once, not a
thousand times, and noted once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from protocol.bidding.effects import Book, Count, Evaluate, Note, ProviderEffect, Release, Send
from protocol.bidding.flat import flat
from protocol.bidding.snapshot import Codec, Field, sorted_set
from protocol.bidding.table import Transition, dispatch, to
from protocol.elements import Bid, Booking, ElementError, Reason, StepCall, StepResult
from protocol.frame import Message, MessageType, Role, make_message, new_id

M = MessageType
DEADLINE = "deadline"
#: A copy of a message is answered again at most once in this long (epoch ms of the clock); a
#: requester re-sends its acceptance only after a restart or a status interval (60 s by default).
REPLAY_INTERVAL_MS = 1_000


class PState(StrEnum):
    EVALUATING = "evaluating"  # call received; the resource is deciding
    PROPOSED = "proposed"  # binding offer out, capacity held tentatively
    REFUSED = "refused"
    BOOKED = "booked"  # accepted and confirmed; a work order exists
    DONE = "done"
    FAILED = "failed"
    RELEASED = "released"  # rejected, expired or cancelled


TERMINAL = frozenset({PState.REFUSED, PState.DONE, PState.FAILED, PState.RELEASED})

#: (state, event) -> handler and the states it may end in. Events are message types, DEADLINE,
#: or the local decisions "propose" / "refuse" / "complete" / "fail" / "reschedule". Pairs not
#: listed: a notUnderstood is noted, an acceptance of a dead offer is refused, anything else is
#: answered with notUnderstood.
_S = PState
TABLE: dict[tuple[PState, str], Transition] = {
    (_S.EVALUATING, "propose"): to("_do_propose", _S.PROPOSED),
    (_S.EVALUATING, "refuse"): to("_do_refuse", _S.REFUSED),
    (_S.EVALUATING, DEADLINE): to("_on_lapse", _S.REFUSED),
    (_S.PROPOSED, M.ACCEPT_PROPOSAL): to("_on_accept", _S.BOOKED, _S.RELEASED, _S.PROPOSED),
    (_S.PROPOSED, M.REJECT_PROPOSAL): to("_on_reject", _S.RELEASED),
    (_S.PROPOSED, DEADLINE): to("_on_expiry", _S.RELEASED),
    (_S.BOOKED, M.REJECT_PROPOSAL): to("_on_cancel", _S.RELEASED),
    (_S.BOOKED, M.ACCEPT_PROPOSAL): to("_on_repeated_accept", _S.BOOKED),
    (_S.BOOKED, "complete"): to("_do_complete", _S.DONE),
    (_S.BOOKED, "fail"): to("_do_fail", _S.FAILED),
    (_S.BOOKED, "reschedule"): to("_do_reschedule", _S.BOOKED),
    (_S.DONE, M.ACCEPT_PROPOSAL): to("_on_repeated_accept", _S.DONE),
    (_S.FAILED, M.ACCEPT_PROPOSAL): to("_on_repeated_accept", _S.FAILED),
    (_S.RELEASED, M.REJECT_PROPOSAL): to("_on_late_reject", _S.RELEASED),
    (_S.REFUSED, M.REJECT_PROPOSAL): to("_on_late_reject", _S.REFUSED),
}


class ProtocolError(RuntimeError):
    """A local decision that the protocol does not allow in the current state."""


@dataclass
class Provider:
    me: str  # AAS id of the resource
    requester: str  # AAS id of the product that called
    conversation_id: str
    cfp_id: str
    call: StepCall
    state: PState = PState.EVALUATING
    reply_by: int | None = None  # the call's replyBy
    bid: Bid | None = None
    proposal_id: str = ""
    valid_until: int | None = None
    accept_id: str = ""
    deadline: int | None = None
    seen: set[str] = field(default_factory=set)
    replies: dict[str, Message] = field(default_factory=dict)  # received id -> the answer sent
    answered_at: dict[str, int] = field(default_factory=dict)  # received id -> when last answered
    #: Where the ids of the messages it sends come from (injected: a test or a replay passes its own).
    ids: Callable[[], str] = field(default=new_id, repr=False, compare=False)

    @classmethod
    def on_call(
        cls,
        me: str,
        msg: Message,
        now: int,
        *,
        caller: str | None = None,
        ids: Callable[[], str] = new_id,
    ) -> tuple[Provider | None, list[ProviderEffect]]:
        """Open a round for a call for proposal; returns (None, effects) if it cannot be read or
        is not the named product's own.

        `caller` is the short name the call was published under (the runtime has checked it
        against the frame's sender and the broker against the account): a call is served only
        for the product that sent it, so one agent cannot order, re-run or overwrite another
        product's step. None skips the check (tests of the machine alone).
        """
        try:
            call = msg.memo("StepCall", lambda: StepCall.from_json_elements(msg.interactionElements))
        except ElementError as exc:
            return None, [
                Note("not-understood", f"callForProposal {msg.id} from {msg.sender}: {exc}", msg.id),
                Send(
                    _reply(
                        me,
                        msg,
                        M.NOT_UNDERSTOOD,
                        Reason("not-understood", str(exc)).to_json_elements(),
                        ids(),
                    )
                ),
            ]
        if caller is not None and call.product != caller:
            text = f"callForProposal {msg.id} names product {call.product!r} but was sent by {caller!r}"
            return None, [
                Note("wrong-product", text, msg.id),
                Send(
                    _reply(me, msg, M.NOT_UNDERSTOOD, Reason("wrong-product", text).to_json_elements(), ids())
                ),
            ]
        p = cls(
            me,
            msg.sender,
            msg.conversation,
            msg.id,
            call,
            reply_by=msg.reply_by,
            deadline=msg.reply_by,
            ids=ids,
        )
        p.seen.add(msg.id)
        p.answered_at[msg.id] = now
        if msg.reply_by is not None and now > msg.reply_by:
            p.state, p.deadline = PState.REFUSED, None
            return p, [
                Note("late", f"callForProposal {msg.id} arrived {now - msg.reply_by} ms after replyBy")
            ]
        return p, [Evaluate(call, msg.sender, msg.reply_by)]

    # --- local decisions ----------------------------------------------------------------------------

    def propose(self, bid: Bid, valid_until: int, now: int) -> list[ProviderEffect]:
        """Send a binding offer, valid until `valid_until` (epoch ms)."""
        return self._decide("propose", now, bid=bid, valid_until=valid_until)

    def refuse(self, code: str, text: str, now: int) -> list[ProviderEffect]:
        return self._decide("refuse", now, reason=Reason(code, text))

    def complete(self, result: StepResult, now: int) -> list[ProviderEffect]:
        return self._decide("complete", now, result=result)

    def fail(self, code: str, text: str, now: int) -> list[ProviderEffect]:
        return self._decide("fail", now, reason=Reason(code, text))

    def reschedule(self, booking: Booking, now: int) -> list[ProviderEffect]:
        """The booked step's times changed: re-confirm them with the requester."""
        return self._decide("reschedule", now, booking=booking)

    def _decide(self, event: str, now: int, **kw: Any) -> list[ProviderEffect]:
        transition = TABLE.get((self.state, event))
        if transition is None:
            if self.state is PState.RELEASED and event in ("complete", "fail"):
                return [Note("after-cancel", f"step {event} after the requester cancelled it")]
            raise ProtocolError(f"cannot {event} in state {self.state}")
        return dispatch(self, transition, event, now, **kw)

    # --- inputs -------------------------------------------------------------------------------------

    def receive(self, msg: Message, now: int) -> list[ProviderEffect]:
        if msg.id in self.seen:
            last = self.answered_at.get(msg.id)
            if last is not None and 0 <= now - last < REPLAY_INTERVAL_MS:
                return [Count("duplicate")]
            self.answered_at[msg.id] = now
            answer = self.replies.get(msg.id)
            note = Note("duplicate", f"{msg.type} {msg.id} from {msg.sender}; answer re-sent", msg.id)
            return [note, Send(answer)] if answer else [note]
        self.seen.add(msg.id)
        self.answered_at[msg.id] = now
        if msg.sender != self.requester:
            return self._not_understood(msg, "sender is not the requester of this call", "not-participant")
        transition = TABLE.get((self.state, msg.type))
        if transition is None:
            return self._unexpected(msg, now)
        return dispatch(self, transition, msg.type, msg, now)

    def tick(self, now: int) -> list[ProviderEffect]:
        if self.deadline is None or now < self.deadline:
            return []
        transition = TABLE.get((self.state, DEADLINE))
        self.deadline = None
        return dispatch(self, transition, DEADLINE, None, now) if transition else []

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    # --- handlers -----------------------------------------------------------------------------------

    def _do_propose(self, now: int, *, bid: Bid, valid_until: int) -> list[ProviderEffect]:
        """Local decision: send a binding offer, valid until its replyBy; the capacity stays held tentatively."""
        msg = _reply(
            self.me, self._cfp_stub(), M.PROPOSAL, bid.to_json_elements(), self.ids(), reply_by=valid_until
        )
        self.state, self.bid, self.proposal_id = PState.PROPOSED, bid, msg.id
        self.valid_until = self.deadline = valid_until
        self.replies[self.cfp_id] = msg
        return [Send(msg)]

    def _do_refuse(self, now: int, *, reason: Reason) -> list[ProviderEffect]:
        """Local decision: decline the call (capability, feasibility or capacity)."""
        msg = _reply(self.me, self._cfp_stub(), M.REFUSE_PROPOSAL, reason.to_json_elements(), self.ids())
        self.state = PState.REFUSED
        self.replies[self.cfp_id] = msg
        return [Send(msg)]

    def _on_accept(self, msg: Message, now: int) -> list[ProviderEffect]:
        """Accepted within validity: book the hold and confirm with the promised times; after validity: refuse and release."""
        if msg.in_reply_to != self.proposal_id:
            return self._not_understood(msg, "acceptProposal does not answer our proposal", "out-of-sequence")
        assert self.bid is not None and self.valid_until is not None
        if now >= self.valid_until:
            self.state, self.deadline = PState.RELEASED, None
            text = f"offer expired {now - self.valid_until} ms before the acceptance arrived"
            return [Release("expired"), *self._answer(msg, M.REFUSE_PROPOSAL, Reason("expired", text))]
        self.state, self.deadline, self.accept_id = PState.BOOKED, None, msg.id
        booking = Booking(self.bid.resource, self.bid.earliest_start, self.bid.completion)
        return [Book(booking), *self._answer(msg, M.INFORM_CONFIRM, booking)]

    def _on_lapse(self, _msg: None, now: int) -> list[ProviderEffect]:
        """No decision before the call's replyBy: the requester has moved on."""
        self.state = PState.REFUSED
        return [Note("lapsed", f"call {self.cfp_id} not answered before its replyBy")]

    def _on_reject(self, msg: Message, now: int) -> list[ProviderEffect]:
        """Not selected: release the tentative hold."""
        self.state, self.deadline = PState.RELEASED, None
        return [Release("rejected")]

    def _on_expiry(self, _msg: None, now: int) -> list[ProviderEffect]:
        """Validity passed without an answer: release the tentative hold."""
        self.state = PState.RELEASED
        return [Release("expired"), Note("expired", f"offer {self.proposal_id} expired unanswered")]

    def _on_cancel(self, msg: Message, now: int) -> list[ProviderEffect]:
        """The requester withdrew an award it had made: cancel the booking."""
        self.state = PState.RELEASED
        return [Release("cancelled", booked=True)]

    def _on_repeated_accept(self, msg: Message, now: int) -> list[ProviderEffect]:
        """A new acceptance id for a booking we hold: re-send where we stand."""
        last = self.replies.get(self.accept_id)
        note = Note("repeated-accept", f"acceptProposal {msg.id} for a booked offer; status re-sent", msg.id)
        return [note, Send(last)] if last else [note]

    def _on_late_reject(self, msg: Message, now: int) -> list[ProviderEffect]:
        """A rejection for an offer already gone: noted only."""
        return [Note("out-of-sequence", f"rejectProposal {msg.id} in state {self.state}", msg.id)]

    def _do_complete(self, now: int, *, result: StepResult) -> list[ProviderEffect]:
        """Local event: the asset finished the step: inform the requester with the result."""
        self.state = PState.DONE
        return self._answer_accept(M.INFORM, result)

    def _do_reschedule(self, now: int, *, booking: Booking) -> list[ProviderEffect]:
        """Local event: the booked times moved (the queue changed): a new informConfirm with the new times."""
        return self._answer_accept(M.INFORM_CONFIRM, booking)

    def _do_fail(self, now: int, *, reason: Reason) -> list[ProviderEffect]:
        """Local event: the step cannot be done: informFailure, the requester bids again."""
        self.state = PState.FAILED
        return self._answer_accept(M.INFORM_FAILURE, reason)

    # --- helpers ------------------------------------------------------------------------------------

    def _answer_accept(self, kind: MessageType, content: Any) -> list[ProviderEffect]:
        """Reply to the acceptance (inform / informFailure) and keep the reply for replays."""
        msg = make_message(
            kind,
            sender=self.me,
            sender_role=Role.PROVIDER,
            conversation_id=self.conversation_id,
            receiver=self.requester,
            in_reply_to=self.accept_id,
            elements=content.to_json_elements(),
            message_id=self.ids(),
        )
        self.replies[self.accept_id] = msg
        return [Send(msg)]

    def _answer(self, msg: Message, kind: MessageType, content: Any) -> list[ProviderEffect]:
        reply = _reply(self.me, msg, kind, content.to_json_elements(), self.ids())
        self.replies[msg.id] = reply
        return [Send(reply)]

    def _unexpected(self, msg: Message, now: int) -> list[ProviderEffect]:
        if msg.type is M.NOT_UNDERSTOOD:
            return [Note("not-understood-received", f"from {msg.sender}: in state {self.state}", msg.id)]
        if msg.type is M.ACCEPT_PROPOSAL and self.state in (PState.RELEASED, PState.REFUSED):
            return self._answer(msg, M.REFUSE_PROPOSAL, Reason("withdrawn", f"offer is {self.state}"))
        return self._not_understood(msg, f"{msg.type} does not fit state {self.state} of the provider")

    def _not_understood(self, msg: Message, text: str, kind: str = "not-understood") -> list[ProviderEffect]:
        if msg.type is M.NOT_UNDERSTOOD:  # never answer a notUnderstood with one: no loops
            return [Note(kind, f"{msg.type} {msg.id} from {msg.sender}: {text}", msg.id)]
        reply = _reply(self.me, msg, M.NOT_UNDERSTOOD, Reason(kind, text).to_json_elements(), self.ids())
        return [Note(kind, f"{msg.type} {msg.id} from {msg.sender}: {text}", msg.id), Send(reply)]

    def _cfp_stub(self) -> _Addr:
        return _Addr(self.requester, self.cfp_id, self.conversation_id)

    # --- persistence --------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything needed to resume after a crash, as JSON-able data."""
        return CODEC.dump(self)

    @classmethod
    def restore(cls, data: dict[str, Any], ids: Callable[[], str] = new_id) -> Provider:
        return cls(**CODEC.load(data), ids=ids)


#: A provider's snapshot: every field but the id source.
CODEC = Codec(
    "provider",
    {
        "me": Field(),
        "requester": Field(),
        "conversation_id": Field(),
        "cfp_id": Field(),
        "call": Field(flat, lambda d: StepCall(**d)),
        "state": Field(str, PState),
        "reply_by": Field(),
        "bid": Field(lambda b: flat(b) if b else None, lambda d: Bid(**d) if d else None),
        "proposal_id": Field(),
        "valid_until": Field(),
        "accept_id": Field(),
        "deadline": Field(),
        "seen": sorted_set(),
        "replies": Field(
            lambda r: {k: m.to_json().decode() for k, m in r.items()},
            lambda d: {k: _load(v) for k, v in d.items()},
        ),
        "answered_at": Field(dict, dict, default=dict),
    },
)


@dataclass(frozen=True, slots=True)
class _Addr:
    """The addressing fields of a message being answered."""

    sender: str
    id: str
    conversation: str


def _reply(
    me: str,
    to: Message | _Addr,
    kind: MessageType,
    elements: list[dict[str, Any]],
    message_id: str,
    reply_by: int | None = None,
) -> Message:
    return make_message(
        kind,
        sender=me,
        sender_role=Role.PROVIDER,
        conversation_id=to.conversation,
        receiver=to.sender,
        in_reply_to=to.id,
        reply_by=reply_by,
        elements=elements,
        message_id=message_id,
    )


def _load(reply: str | dict[str, Any]) -> Message:
    """A kept answer from a snapshot: its wire JSON (older snapshots held it as an object)."""
    return Message.model_validate_json(reply) if isinstance(reply, str) else Message.model_validate(reply)


class ProviderRounds:
    """All rounds a resource takes part in, found by the ids messages refer to.

    A call opens a round; later messages name our proposal (accept, reject) or
    the acceptance (a cancel) in `inReplyTo`, and that is how they find it.
    """

    def __init__(self) -> None:
        self.by_cfp: dict[str, Provider] = {}
        self._by_ref: dict[str, Provider] = {}

    def add(self, p: Provider) -> None:
        self.by_cfp[p.cfp_id] = p
        self.index(p)

    def index(self, p: Provider) -> None:
        """Call after every transition: the proposal and acceptance ids become known as it runs."""
        for ref in (p.proposal_id, p.accept_id):
            if ref:
                self._by_ref[ref] = p

    def route(self, msg: Message) -> Provider | None:
        if msg.type is M.CALL_FOR_PROPOSAL:
            return self.by_cfp.get(msg.id)
        return self._by_ref.get(msg.in_reply_to or "")

    def __iter__(self):
        return iter(list(self.by_cfp.values()))

    def __len__(self) -> int:
        return len(self.by_cfp)

    def drop(self, p: Provider) -> None:
        """Forget a finished round (its answers can no longer be replayed)."""
        self.by_cfp.pop(p.cfp_id, None)
        for ref in (p.proposal_id, p.accept_id):
            self._by_ref.pop(ref, None)
