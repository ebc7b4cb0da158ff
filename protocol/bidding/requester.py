"""The requester's side of one bidding procedure (VDI/VDE 2193-2), sans-I/O.

One `Requester` per manufacturing step: it calls for proposals, collects until
`replyBy` or until every expected bidder answered, selects by the product's
priority, accepts one, waits for its booking confirmation and then for the
result. The runners-up are rejected once the winner has confirmed: until then
they stay open, so a winner that withdraws is replaced in the same round, and
the winner's confirmation is not queued behind the losers' rejections. It
never touches a socket, a clock or a database: the driver feeds it messages and
the current time (epoch ms) and carries out the effects it returns. Every rule
is reachable from `TABLE`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from protocol.bidding.effects import (
    Awarded,
    CallIssued,
    Completed,
    Count,
    Failed,
    Note,
    Reawarded,
    Rebid,
    RequesterEffect,
    Scheduled,
    Send,
)
from protocol.bidding.flat import flat
from protocol.bidding.snapshot import Codec, Field, sorted_set
from protocol.bidding.table import Transition, dispatch, to
from protocol.elements import Bid, Booking, ElementError, Reason, StepCall, StepResult
from protocol.frame import Message, MessageType, Role, make_message, new_id
from protocol.selection import Offer, PriorityWeighted, Ranked, SelectionPolicy

M = MessageType
DEADLINE = "deadline"
DOCUMENTED = "documented"
RESUME = "resume"


class RState(StrEnum):
    COLLECTING = "collecting"  # call issued, proposals coming in
    BACKOFF = "backoff"  # no proposal in the last round; waiting before calling again
    AWARDING = "awarding"  # acceptProposal sent, waiting for informConfirm
    CONFIRMED = "confirmed"  # booked by the provider, waiting for inform / informFailure
    DONE = "done"
    FAILED = "failed"


TERMINAL = frozenset({RState.DONE, RState.FAILED})

#: (state, event) -> handler and the states it may end in. Events are message types, DEADLINE,
#: or the local events DOCUMENTED (the product's documentation records the step as completed)
#: and RESUME (the agent restarted: every deadline is due now). Pairs not listed: a proposal is
#: rejected as late, a stray informConfirm is cancelled, a notUnderstood is only noted, anything
#: else is answered with notUnderstood; DOCUMENTED and RESUME in a terminal state change nothing.
_S = RState
_ROUND_CLOSES = (_S.COLLECTING, _S.BACKOFF, _S.AWARDING, _S.FAILED)  # an answer may close the round
_AWARD_LOST = (_S.AWARDING, _S.COLLECTING, _S.FAILED)  # runner-up, new call, or given up
TABLE: dict[tuple[RState, str], Transition] = {
    (_S.COLLECTING, M.PROPOSAL): to("_on_proposal", *_ROUND_CLOSES),
    (_S.COLLECTING, M.REFUSE_PROPOSAL): to("_on_refusal", *_ROUND_CLOSES),
    (_S.COLLECTING, M.NOT_UNDERSTOOD): to("_on_refusal", *_ROUND_CLOSES),
    (_S.COLLECTING, DEADLINE): to("_close", _S.BACKOFF, _S.AWARDING, _S.FAILED),
    (_S.BACKOFF, DEADLINE): to("_on_backoff_over", _S.COLLECTING),
    (_S.AWARDING, M.INFORM_CONFIRM): to("_on_confirm", _S.CONFIRMED, _S.AWARDING),
    (_S.AWARDING, M.REFUSE_PROPOSAL): to("_on_withdrawn", *_AWARD_LOST),
    (_S.AWARDING, M.INFORM_FAILURE): to("_on_withdrawn", *_AWARD_LOST),
    (_S.AWARDING, M.NOT_UNDERSTOOD): to("_on_withdrawn", *_AWARD_LOST),
    (_S.AWARDING, DEADLINE): to("_on_confirm_timeout", *_AWARD_LOST),
    (_S.AWARDING, M.INFORM): to("_on_inform", _S.DONE, _S.AWARDING),  # overtook its informConfirm
    (_S.DONE, M.INFORM_CONFIRM): to("_on_late_confirm", _S.DONE),
    (_S.DONE, M.INFORM): to("_on_late_inform", _S.DONE),
    (_S.CONFIRMED, M.INFORM): to("_on_inform", _S.DONE, _S.CONFIRMED),
    (_S.CONFIRMED, M.INFORM_FAILURE): to("_on_step_failure", _S.CONFIRMED, *_AWARD_LOST),
    (_S.CONFIRMED, M.INFORM_CONFIRM): to("_on_repeated_confirm", _S.CONFIRMED),
    (_S.CONFIRMED, DEADLINE): to("_on_status_due", _S.CONFIRMED),
    **{(s, DOCUMENTED): to("_on_documented", _S.DONE) for s in _S if s not in TERMINAL},
    **{(s, RESUME): to("_on_resume", s) for s in _S if s not in TERMINAL},
}


@dataclass(frozen=True)
class RequesterConfig:
    reply_window_ms: int = 2_000  # how long bidders have to answer a call
    max_rounds: int = 5  # rounds without a single valid proposal before the step fails
    backoff_ms: int = 1_000  # first back-off after an empty round; doubles each time
    backoff_max_ms: int = 60_000
    confirm_timeout_ms: int = 30_000  # acceptProposal -> informConfirm
    confirm_retries: int = 2  # the acceptance is re-sent this often before the award is withdrawn
    status_interval_ms: int = 60_000  # after a booking: ask again this long past the expected completion
    max_failures: int = 3  # withdrawn awards and informFailure before the step fails
    # Top priority with a choice of resources: commit only to an offer that starts now. While the
    # best offer starts later (every capable resource busy), reject the offers and call again when
    # it would start; the resources then give a machine that frees up to the most urgent caller.
    defer_until_start: bool = True
    max_deferrals: int = 1_000
    # Call again this long before the best offer's start, so that the new offers are in when the
    # machine frees up: one reply window on a wall clock; 0 on a virtual clock, where the call is
    # answered at the instant it is sent. A deferral that would call again at once wins no time:
    # the product accepts instead.
    defer_lead_ms: int = 0
    clock_origin_ms: int | None = None  # epoch ms of simulated time 0 (bids are in simulated time)


@dataclass
class Requester:
    me: str  # AAS id of the product
    conversation_id: str
    call: StepCall
    expected: frozenset[str] = frozenset()  # AAS ids of the bidders expected to answer
    config: RequesterConfig = field(default_factory=RequesterConfig)
    policy: SelectionPolicy = field(default_factory=PriorityWeighted)

    state: RState = RState.COLLECTING
    round: int = 0
    cfp_id: str = ""
    past_cfps: list[str] = field(default_factory=list)
    reply_by: int = 0
    deadline: int | None = None  # epoch ms at which `tick` has something to do
    offers: dict[str, Offer] = field(default_factory=dict)  # by bidder
    offer_valid: dict[str, int | None] = field(default_factory=dict)  # proposal id -> valid until (ms)
    answered: set[str] = field(default_factory=set)
    seen: set[str] = field(default_factory=set)
    repeated: set[str] = field(default_factory=set)  # ids whose duplicate was noted (not persisted)
    winner: Offer | None = None
    reserve: list[Ranked] = field(default_factory=list)  # runners-up, still open while awarding
    accept_id: str = ""
    retries: int = 0
    queries: int = 0  # status queries since the booking
    cancelled: set[str] = field(default_factory=set)  # bidders whose award we withdrew
    empty_rounds: int = 0
    failures: int = 0
    deferrals: int = 0
    reason: str = ""
    settled: bool = False  # ended by the product's documentation (see documented)
    #: Where the ids of calls, acceptances and every other message it sends come from (injected:
    #: a test or a replay passes its own; not part of a snapshot).
    ids: Callable[[], str] = field(default=new_id, repr=False, compare=False)

    # --- inputs -------------------------------------------------------------------------------------

    def start(self, now: int) -> list[RequesterEffect]:
        """Issue the first call for proposals."""
        if self.round:
            raise RuntimeError("requester already started")
        return self._issue_call(now)

    def receive(self, msg: Message, now: int) -> list[RequesterEffect]:
        """Handle one message of this conversation."""
        if msg.id in self.seen:
            if msg.id in self.repeated:  # noted once; further copies are only counted
                return [Count("duplicate")]
            self.repeated.add(msg.id)
            return [Note("duplicate", f"{msg.type} {msg.id} from {msg.sender} ignored", msg.id)]
        self.seen.add(msg.id)
        transition = TABLE.get((self.state, msg.type))
        if transition is None:
            return self._unexpected(msg, now)
        return dispatch(self, transition, msg.type, msg, now)

    def tick(self, now: int) -> list[RequesterEffect]:
        """Advance on time alone: replyBy passed, back-off over, confirmation overdue."""
        if self.deadline is None or now < self.deadline:
            return []
        transition = TABLE.get((self.state, DEADLINE))
        self.deadline = None
        return dispatch(self, transition, DEADLINE, None, now) if transition else []

    def documented(self, now: int) -> list[RequesterEffect]:
        """The product's own documentation records the step as completed: the procedure is over.

        Resources document a step in the product's AAS before they inform, and a product resumes
        from its documentation; a procedure left open beside it would, with a silent provider,
        time the booking out and bid the step again although it was done. Offers still held for
        it are rejected (their holds are freed); the winner's inform, if it still comes, is taken
        quietly.
        """
        transition = TABLE.get((self.state, DOCUMENTED))
        return dispatch(self, transition, DOCUMENTED, now) if transition else []

    def resume(self, now: int) -> list[RequesterEffect]:
        """The agent restarted with this procedure open: whatever it waits for is due now.

        A confirmation that did not come while the agent was down is not the provider's fault,
        so an award's re-sends start again from zero.
        """
        transition = TABLE.get((self.state, RESUME))
        return dispatch(self, transition, RESUME, now) if transition else []

    def set_expected(self, bidders: frozenset[str]) -> None:
        """Update who is expected to answer (the registry may change between rounds)."""
        self.expected = frozenset(bidders)

    def expect_completion(self, at: int) -> None:
        """The driver's estimate (epoch ms) of when the booked step ends; a status query follows if silent."""
        if self.state is RState.CONFIRMED:
            self.deadline = at + self.config.status_interval_ms

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    # --- handlers -----------------------------------------------------------------------------------

    def _on_documented(self, now: int) -> list[RequesterEffect]:
        """The product's documentation records the step as completed: reject the offers still held; the procedure ends."""
        effects: list[RequesterEffect] = [
            Note("documented", f"step {self.call.step} is documented as completed; the procedure ends")
        ]
        if self.state is RState.COLLECTING:
            effects += [
                self._reject_offer(o.provider, o.proposal_id, "step-done", "the step is already done")
                for o in self.offers.values()
            ]
        effects += self._release_reserve()
        self.state, self.deadline, self.settled = RState.DONE, None, True
        return effects

    def _on_resume(self, now: int) -> list[RequesterEffect]:
        """The agent restarted: the deadline is due now; an award's re-sends count from zero."""
        if self.state in (RState.AWARDING, RState.CONFIRMED):
            self.retries = 0
        self.deadline = now
        return []

    def _on_backoff_over(self, _msg: None, now: int) -> list[RequesterEffect]:
        """Back-off over: call for proposals again (new round, same conversation)."""
        return self._issue_call(now)

    def _issue_call(self, now: int) -> list[RequesterEffect]:
        if self.cfp_id:
            self.past_cfps.append(self.cfp_id)
        self.round += 1
        self.state = RState.COLLECTING
        self.cfp_id = self.ids()
        self.reply_by = now + self.config.reply_window_ms
        self.deadline = self.reply_by
        self.offers.clear()
        self.answered.clear()
        self.winner = None
        self.reserve = []
        self.accept_id = ""
        cfp = make_message(
            M.CALL_FOR_PROPOSAL,
            sender=self.me,
            sender_role=Role.REQUESTER,
            conversation_id=self.conversation_id,
            reply_by=self.reply_by,
            elements=self.call.to_json_elements(),
            message_id=self.cfp_id,
        )
        sends = [
            Send(cfp, capability=c) for c in self.call.capabilities
        ]  # one call, every acceptable capability
        return [*sends, CallIssued(self.round, self.cfp_id, self.reply_by)]

    def _on_proposal(self, msg: Message, now: int) -> list[RequesterEffect]:
        """Record a bid for the current call; late, second or unreadable bids are rejected; close early once every expected bidder answered."""
        if msg.in_reply_to != self.cfp_id:
            return self._unexpected(msg, now)
        if now > self.reply_by:
            return self._reject(msg, "late", f"proposal arrived {now - self.reply_by} ms after replyBy")
        if msg.sender in self.offers:
            return self._reject(msg, "second-proposal", "only the first proposal per bidder and round counts")
        try:
            bid = Bid.from_json_elements(msg.interactionElements)
        except ElementError as exc:
            self.answered.add(msg.sender)
            return [*self._not_understood(msg, str(exc)), *self._maybe_close(now)]
        self.offers[msg.sender] = self._offer(msg.id, msg.sender, bid)
        self.offer_valid[msg.id] = msg.reply_by
        self.answered.add(msg.sender)
        return self._maybe_close(now)

    def _on_refusal(self, msg: Message, now: int) -> list[RequesterEffect]:
        """Count the bidder as answered; close early once every expected bidder answered."""
        if msg.in_reply_to != self.cfp_id:
            return [
                Note("out-of-sequence", f"{msg.type} from {msg.sender} answers {msg.in_reply_to}", msg.id)
            ]
        self.answered.add(msg.sender)
        return self._maybe_close(now)

    def _maybe_close(self, now: int) -> list[RequesterEffect]:
        """Close the round early once every expected bidder has answered."""
        if self.expected and self.expected <= self.answered:
            return self._close(None, now)
        return []

    def _close(self, _msg: Message | None, now: int) -> list[RequesterEffect]:
        """replyBy passed (or all answered): rank valid bids by priority, accept the best, keep the rest open until it confirms; top priority with a choice whose best bid starts later: reject all, call again when it starts; none valid: back off, or fail after max_rounds."""
        valid, expired = [], []
        for offer in self.offers.values():
            (valid if self._valid(offer, now) else expired).append(offer)
        effects: list[RequesterEffect] = []
        if not valid:
            self.empty_rounds += 1
            if self.empty_rounds >= self.config.max_rounds:
                return self._fail(f"no valid proposal in {self.empty_rounds} rounds")
            self.state = RState.BACKOFF
            wait = min(self.config.backoff_ms * 2 ** (self.empty_rounds - 1), self.config.backoff_max_ms)
            self.deadline = now + wait
            return [Note("no-proposals", f"round {self.round}: none valid; calling again in {wait} ms")]
        ranking = tuple(self.policy.rank(valid, self.call.priority))
        wait_until = self._defer_until(ranking, now)
        if wait_until is not None:
            self.deferrals += 1
            self.state, self.deadline = RState.BACKOFF, wait_until
            best = ranking[0].offer.bid
            text = f"the best offer ({best.resource}) starts at {best.earliest_start:g}: calling again then"
            return [
                Note("deferred", f"round {self.round}: {text}"),
                *(self._reject_offer(o.provider, o.proposal_id, "deferred", text) for o in valid),
                *(self._reject_offer(o.provider, o.proposal_id, "expired", "offer expired") for o in expired),
            ]
        self._award(ranking[0].offer, now)
        self.reserve = list(ranking[1:])
        effects.append(Awarded(self.round, ranking, tuple(expired)))
        effects.append(Send(self.accept_message()))
        for o in expired:
            effects.append(
                self._reject_offer(o.provider, o.proposal_id, "expired", "offer expired before the decision")
            )
        return effects

    def _offer(self, proposal_id: str, provider: str, bid: Bid) -> Offer:
        """A proposal as the policy sees it, with the latest end that keeps the product on time."""
        return Offer(proposal_id, provider, bid, self.call.latest_end(bid.duration))

    def _valid(self, offer: Offer, now: int) -> bool:
        """The offer still binds its bidder (no validity given: until the round ends)."""
        until = self.offer_valid.get(offer.proposal_id)
        return until is None or until > now

    def _award(self, offer: Offer, now: int) -> None:
        self.winner = offer
        self.accept_id = self.ids()
        self.state = RState.AWARDING
        self.retries = 0
        self.deadline = now + self.config.confirm_timeout_ms

    def _release_reserve(self) -> list[RequesterEffect]:
        """Reject the runners-up still held open (the winner confirmed, or the award is over)."""
        reserve, self.reserve = self.reserve, []
        return [
            self._reject_offer(r.offer.provider, r.offer.proposal_id, "not-selected", r.reason)
            for r in reserve
        ]

    def _defer_until(self, ranking: tuple, now: int) -> int | None:
        """When to call again instead of accepting (epoch ms), or None to accept now."""
        c = self.config
        if not c.defer_until_start or c.clock_origin_ms is None or self.call.priority != 1:
            return None
        if len(ranking) < 2 or self.deferrals >= c.max_deferrals:
            return None  # no choice to keep open, or waited long enough
        start_ms = c.clock_origin_ms + round(ranking[0].offer.bid.earliest_start * 1000.0)
        call_ms = start_ms - c.defer_lead_ms
        return call_ms if call_ms > now + 1 else None

    def _on_confirm(self, msg: Message, now: int) -> list[RequesterEffect]:
        """The winner booked the step: scheduled, the runners-up rejected; a status query follows if it stays silent past the expected end."""
        if not self._from_winner(msg, self.accept_id):
            return self._stray(msg, now)
        try:
            booking = Booking.from_json_elements(msg.interactionElements)
        except ElementError as exc:
            # The provider booked but said so badly: treat the booking as made with the offered times.
            booking = Booking(
                self.winner.bid.resource, self.winner.bid.earliest_start, self.winner.bid.completion
            )
            note = Note("bad-elements", f"informConfirm from {msg.sender}: {exc}", msg.id)
            self.state, self.deadline = RState.CONFIRMED, now + self.config.status_interval_ms
            return [note, Scheduled(msg.sender, booking), *self._release_reserve()]
        self.state, self.deadline = RState.CONFIRMED, now + self.config.status_interval_ms
        return [Scheduled(msg.sender, booking), *self._release_reserve()]

    def _on_repeated_confirm(self, msg: Message, now: int) -> list[RequesterEffect]:
        """A new confirmation from the winner: the booking's times moved; scheduled again with them."""
        if not self._from_winner(msg, self.accept_id):
            return self._stray(msg, now)
        try:
            booking = Booking.from_json_elements(msg.interactionElements)
        except ElementError as exc:
            return [Note("bad-elements", f"informConfirm from {msg.sender}: {exc}", msg.id)]
        self.deadline = now + self.config.status_interval_ms
        moved = f"{msg.sender} moved the booking to {booking.start:g}-{booking.completion:g}"
        note = Note("rescheduled", moved, msg.id)
        return [note, Scheduled(msg.sender, booking)]

    def _on_withdrawn(self, msg: Message, now: int) -> list[RequesterEffect]:
        """The winner declined the acceptance (offer expired, cannot do it): award the best runner-up still valid, or bid the step again."""
        if not self._from_winner(msg, self.accept_id):
            return self._stray(msg, now)
        return self._rebid(now, f"{msg.sender} withdrew ({msg.type})")

    def _on_confirm_timeout(self, _msg: Message | None, now: int) -> list[RequesterEffect]:
        """No informConfirm in time: re-send the same acceptance (answered idempotently); after confirm_retries, cancel the award and award the best runner-up still valid, or bid again."""
        assert self.winner is not None
        if self.retries < self.config.confirm_retries:
            self.retries += 1
            self.deadline = now + self.config.confirm_timeout_ms
            note = Note(
                "confirm-overdue", f"no informConfirm from {self.winner.provider}; acceptance re-sent"
            )
            return [note, self._resend_accept()]
        cancel = self._cancel(self.winner.provider, self.accept_id, "no informConfirm in time")
        return [cancel, *self._rebid(now, f"no informConfirm from {self.winner.provider} in time")]

    def _on_late_confirm(self, msg: Message, now: int) -> list[RequesterEffect]:
        """The booking confirmation arrives after the result (reordered): nothing left to do."""
        if not self._from_winner(msg, self.accept_id):
            return self._stray(msg, now)
        return [Note("out-of-sequence", f"informConfirm {msg.id} after the result", msg.id)]

    def _on_late_inform(self, msg: Message, now: int) -> list[RequesterEffect]:
        """The winner's result after the procedure ended on the documentation: already known."""
        if self.settled and self._from_winner(msg, self.accept_id):
            return []
        return self._unexpected(msg, now)

    def _on_status_due(self, _msg: Message | None, now: int) -> list[RequesterEffect]:
        """Booked but silent past the expected end: re-send the acceptance, the provider replays its answer."""
        self.queries += 1
        self.deadline = now + self.config.status_interval_ms * 2 ** min(self.queries, 6)
        return [
            Note("status-query", f"asking {self.winner.provider if self.winner else '?'} for the result"),
            self._resend_accept(),
        ]

    def accept_message(self) -> Message:
        """Our acceptance of the winner; built again, identical, whenever it is re-sent (a status
        query), so snapshots need not keep it."""
        assert self.winner is not None
        return make_message(
            M.ACCEPT_PROPOSAL,
            sender=self.me,
            sender_role=Role.REQUESTER,
            conversation_id=self.conversation_id,
            receiver=self.winner.provider,
            in_reply_to=self.winner.proposal_id,
            message_id=self.accept_id,
            elements=self.winner.bid.to_json_elements(),
        )

    def _resend_accept(self) -> Send:
        return Send(self.accept_message())

    def _on_inform(self, msg: Message, now: int) -> list[RequesterEffect]:
        """The step is done: record the result; the conversation ends."""
        if not self._from_winner(msg, self.accept_id):
            return self._stray(msg, now)
        try:
            result = StepResult.from_json_elements(msg.interactionElements)
        except ElementError as exc:
            return [
                Note("bad-elements", f"inform from {msg.sender}: {exc}", msg.id),
                *self._not_understood(msg, str(exc)),
            ]
        self.state, self.deadline = RState.DONE, None
        return [Completed(msg.sender, result), *self._release_reserve()]

    def _on_step_failure(self, msg: Message, now: int) -> list[RequesterEffect]:
        """The provider could not do the step: bid it again (up to max_failures)."""
        if not self._from_winner(msg, self.accept_id):
            return self._stray(msg, now)
        return self._rebid(now, f"{msg.sender} failed the step")

    # --- helpers ------------------------------------------------------------------------------------

    def _rebid(self, now: int, reason: str) -> list[RequesterEffect]:
        """Count a failed award; award the best runner-up whose offer is still valid, or call again,
        or give the step up after max_failures."""
        self.failures += 1
        if self.winner is not None:
            self.cancelled.add(self.winner.provider)
        if self.failures > self.config.max_failures:
            return [
                *self._release_reserve(),
                *self._fail(f"{reason}; gave up after {self.failures} failed awards"),
            ]
        effects: list[RequesterEffect] = []
        while self.reserve:
            ranked = self.reserve.pop(0)
            o = ranked.offer
            if o.provider in self.cancelled or not self._valid(o, now):
                effects.append(
                    self._reject_offer(o.provider, o.proposal_id, "expired", "offer expired before the award")
                )
                continue
            self._award(o, now)
            note = Note("reawarded", f"{reason}; the award goes to the runner-up {o.provider}")
            return [*effects, note, Reawarded(self.round, ranked, reason), Send(self.accept_message())]
        return [*effects, Rebid(reason, self.round + 1), *self._issue_call(now)]

    def _fail(self, reason: str) -> list[RequesterEffect]:
        self.state, self.deadline, self.reason = RState.FAILED, None, reason
        return [Failed(reason)]

    def _from_winner(self, msg: Message, accept_id: str) -> bool:
        return self.winner is not None and msg.sender == self.winner.provider and msg.in_reply_to == accept_id

    def _unexpected(self, msg: Message, now: int) -> list[RequesterEffect]:
        if msg.type is M.PROPOSAL:
            if msg.in_reply_to == self.cfp_id or msg.in_reply_to in self.past_cfps:
                return self._reject(msg, "late", f"proposal arrived in state {self.state}")
            return self._not_understood(msg, "proposal does not answer a call of this conversation")
        if msg.type is M.INFORM_CONFIRM:
            return self._stray(msg, now)
        if msg.type is M.NOT_UNDERSTOOD or msg.type is M.REFUSE_PROPOSAL:
            return [Note("out-of-sequence", f"{msg.type} from {msg.sender} in state {self.state}", msg.id)]
        return self._not_understood(msg, f"{msg.type} does not fit state {self.state} of the requester")

    def _stray(self, msg: Message, now: int) -> list[RequesterEffect]:
        """A booking or result from someone who is not (or no longer) the winner."""
        if msg.type is M.INFORM_CONFIRM:
            # A booking we do not (or no longer) want: cancel it so the provider frees the slot.
            return [
                Note("stray-confirm", f"informConfirm from {msg.sender} after the award moved on", msg.id),
                self._cancel(msg.sender, msg.in_reply_to or "", "award withdrawn"),
            ]
        return [
            Note("not-participant", f"{msg.type} from {msg.sender} who is not the current winner", msg.id),
            *self._not_understood(msg, "sender is not the provider of this step"),
        ]

    def _reject(self, msg: Message, code: str, text: str) -> list[RequesterEffect]:
        return [
            Note(code, f"proposal {msg.id} from {msg.sender}: {text}", msg.id),
            self._reject_offer(msg.sender, msg.id, code, text),
        ]

    def _reject_offer(self, provider: str, proposal_id: str, code: str, text: str) -> Send:
        return Send(
            make_message(
                M.REJECT_PROPOSAL,
                sender=self.me,
                sender_role=Role.REQUESTER,
                conversation_id=self.conversation_id,
                receiver=provider,
                in_reply_to=proposal_id,
                elements=Reason(code, text).to_json_elements(),
                message_id=self.ids(),
            )
        )

    def _cancel(self, provider: str, in_reply_to: str, text: str) -> Send:
        self.cancelled.add(provider)
        return Send(
            make_message(
                M.REJECT_PROPOSAL,
                sender=self.me,
                sender_role=Role.REQUESTER,
                conversation_id=self.conversation_id,
                receiver=provider,
                in_reply_to=in_reply_to or None,
                elements=Reason("cancelled", text).to_json_elements(),
                message_id=self.ids(),
            )
        )

    def _not_understood(self, msg: Message, text: str) -> list[RequesterEffect]:
        return [
            Note("not-understood", f"{msg.type} {msg.id} from {msg.sender}: {text}", msg.id),
            Send(
                make_message(
                    M.NOT_UNDERSTOOD,
                    sender=self.me,
                    sender_role=Role.REQUESTER,
                    conversation_id=self.conversation_id,
                    receiver=msg.sender,
                    in_reply_to=msg.id,
                    elements=Reason("not-understood", text).to_json_elements(),
                    message_id=self.ids(),
                )
            ),
        ]

    # --- persistence --------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything needed to resume after a crash, as JSON-able data."""
        return CODEC.dump(self)

    @classmethod
    def restore(
        cls, data: dict[str, Any], policy: SelectionPolicy | None = None, ids: Callable[[], str] = new_id
    ) -> Requester:
        fields = CODEC.load(data)
        offers, winner, reserve = fields.pop("offers"), fields.pop("winner"), fields.pop("reserve")
        r = cls(**fields, policy=policy or PriorityWeighted(), ids=ids)

        def offer(row: list[Any]) -> Offer:  # latest_end follows from the call: not stored
            return r._offer(row[0], row[1], Bid(**row[2]))

        r.offers = {row[1]: offer(row) for row in offers}
        r.winner = offer(winner) if winner else None
        r.reserve = [Ranked(r.offers[p], score, reason) for p, score, reason in reserve]
        return r


def _offer_row(o: Offer) -> list[Any]:
    return [o.proposal_id, o.provider, flat(o.bid)]


#: A requester's snapshot: every field but the policy (the product's, given again) and the id
#: source; offers by bidder as rows, the reserve by bidder (restored from the offers).
CODEC = Codec(
    "requester",
    {
        "me": Field(),
        "conversation_id": Field(),
        "call": Field(flat, lambda d: StepCall(**d)),
        "expected": sorted_set(frozenset),
        "config": Field(flat, lambda d: RequesterConfig(**d)),
        "state": Field(str, RState),
        "round": Field(),
        "cfp_id": Field(),
        "past_cfps": Field(list, list),
        "reply_by": Field(),
        "deadline": Field(),
        "offers": Field(lambda offers: [_offer_row(o) for o in offers.values()]),
        "offer_valid": Field(dict, dict),
        "answered": sorted_set(),
        "seen": sorted_set(),
        "winner": Field(lambda w: _offer_row(w) if w else None),
        "reserve": Field(lambda rs: [[r.offer.provider, r.score, r.reason] for r in rs], default=list),
        "accept_id": Field(),
        "retries": Field(),
        "queries": Field(default=int),
        "cancelled": sorted_set(),
        "empty_rounds": Field(),
        "failures": Field(),
        "deferrals": Field(default=int),
        "reason": Field(),
        "settled": Field(default=bool),
    },
)
