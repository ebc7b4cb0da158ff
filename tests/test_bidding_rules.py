"""Each rule of the bidding procedure, one test at a time, without a broker."""

from __future__ import annotations

import pytest

from protocol.bidding.effects import (
    Awarded,
    Book,
    Completed,
    Count,
    Evaluate,
    Failed,
    Note,
    Reawarded,
    Rebid,
    Release,
    Scheduled,
    Send,
)
from protocol.bidding.provider import ProtocolError, Provider, ProviderRounds, PState
from protocol.bidding.requester import Requester, RequesterConfig, RState
from protocol.elements import Bid, Reason, StepCall, StepResult
from protocol.frame import Message, MessageType, Role, make_message

M = MessageType
CALL = StepCall(product="p-1", step=1, capability="milling", location="store", release=0.0, priority=1)
CFG = RequesterConfig(
    reply_window_ms=1000, max_rounds=2, backoff_ms=100, confirm_timeout_ms=500, max_failures=1
)


def bid(resource: str, completion: float, price: float) -> Bid:
    return Bid(resource, "milling", 0.0, completion, 5.0, 0.0, 0.0, price, 100.0, "cell")


def sends(effects: list[object]) -> list[Message]:
    return [e.message for e in effects if isinstance(e, Send)]


def of(effects: list[object], kind: type) -> list:
    return [e for e in effects if isinstance(e, kind)]


def requester(expected: tuple[str, ...] = ("urn:a", "urn:b"), priority: int = 1) -> tuple[Requester, Message]:
    call = StepCall("p-1", 1, "milling", "store", 0.0, priority=priority)
    r = Requester("urn:p", "conv-1", call, frozenset(expected), CFG)
    (cfp,) = sends(r.start(0))
    return r, cfp


def provider(name: str, cfp: Message, now: int = 1) -> Provider:
    p, effects = Provider.on_call(name, cfp, now)
    assert p is not None and of(effects, Evaluate)
    return p


def propose(p: Provider, completion: float, price: float, valid: int = 5_000, now: int = 2) -> Message:
    (msg,) = sends(p.propose(bid(p.me, completion, price), valid, now))
    return msg


def test_call_for_proposal_is_a_broadcast_with_reply_by_and_the_step() -> None:
    r, cfp = requester()
    assert cfp.type is M.CALL_FOR_PROPOSAL and cfp.receiver is None and cfp.reply_by == 1000
    assert cfp.in_reply_to is None and StepCall.from_json_elements(cfp.interactionElements) == CALL
    assert r.state is RState.COLLECTING and r.deadline == 1000


def test_early_close_when_every_expected_bidder_answered_and_top_priority_takes_earliest() -> None:
    r, cfp = requester()
    a, b = provider("urn:a", cfp), provider("urn:b", cfp)
    assert r.receive(propose(a, completion=10, price=9), 3) == []
    out = r.receive(propose(b, completion=12, price=1), 4)
    (award,) = of(out, Awarded)
    assert award.winner.provider == "urn:a" and r.state is RState.AWARDING
    (accept,) = sends(out)  # the runner-up stays open until the winner has confirmed
    assert accept.type is M.ACCEPT_PROPOSAL and accept.receiver == "urn:a"
    out = r.receive(sends(a.receive(accept, 5))[0], 6)
    assert of(out, Scheduled) and r.state is RState.CONFIRMED
    (reject,) = sends(out)
    assert reject.type is M.REJECT_PROPOSAL and reject.receiver == "urn:b"
    assert Reason.from_json_elements(reject.interactionElements).code == "not-selected"
    assert of(b.receive(reject, 7), Release) and b.state is PState.RELEASED


def test_a_winner_that_withdraws_is_replaced_by_the_runner_up_in_the_same_round() -> None:
    r, cfp = requester(expected=("urn:a", "urn:b", "urn:c"))
    a, b, c = provider("urn:a", cfp), provider("urn:b", cfp), provider("urn:c", cfp)
    r.receive(propose(a, completion=10, price=1, valid=4), 3)  # best, but about to lapse
    r.receive(propose(b, completion=11, price=1, valid=50), 3)
    (accept,) = sends(r.receive(propose(c, completion=12, price=1, valid=5_000), 3))
    (refusal,) = sends(a.receive(accept, 4))  # too late for a: it refuses and lets go
    out = r.receive(refusal, 60)  # b's offer has lapsed meanwhile, c's has not
    (reawarded,) = of(out, Reawarded)
    assert reawarded.winner.offer.provider == "urn:c" and "urn:a withdrew" in reawarded.reason
    expired, accept_c = sends(out)
    assert (expired.type, expired.receiver) == (M.REJECT_PROPOSAL, "urn:b")
    assert Reason.from_json_elements(expired.interactionElements).code == "expired"
    assert (accept_c.type, accept_c.receiver, accept_c.in_reply_to) == (
        M.ACCEPT_PROPOSAL,
        "urn:c",
        r.winner.proposal_id,
    )
    assert r.round == 1 and r.state is RState.AWARDING and r.failures == 1 and not of(out, Rebid)
    out = r.receive(sends(c.receive(accept_c, 61))[0], 62)
    assert of(out, Scheduled)[0].booking.resource == "urn:c" and sends(out) == []
    assert Requester.restore(r.snapshot()).snapshot() == r.snapshot()


def test_runners_up_are_rejected_when_the_award_ends_without_a_confirmation() -> None:
    """The winner's inform overtakes its confirmation, or the step is documented as done, or the
    step fails: whatever ends the award rejects the offers still held open."""
    for end in ("inform", "documented", "failed"):
        r, cfp = requester()
        a, b = provider("urn:a", cfp), provider("urn:b", cfp)
        r.receive(propose(a, completion=10, price=1), 3)
        (accept,) = sends(r.receive(propose(b, completion=12, price=1), 3))
        restored = Requester.restore(r.snapshot())  # the reserve survives a restart
        assert [x.offer.provider for x in restored.reserve] == ["urn:b"]
        if end == "inform":
            a.receive(accept, 4)
            (inform,) = sends(a.complete(StepResult("urn:a", 1.0, 6.0, "cell"), 5))
            out = restored.receive(inform, 6)
            assert of(out, Completed)
        elif end == "documented":
            out = restored.documented(6)
        else:
            restored.failures = CFG.max_failures  # the next failed award is one too many
            (refusal,) = sends(a.receive(accept, 6_000))  # after validity
            out = restored.receive(refusal, 6_001)
            assert of(out, Failed)
        (reject,) = sends(out)
        assert (reject.type, reject.receiver) == (M.REJECT_PROPOSAL, "urn:b"), end
        assert restored.reserve == [] and restored.done, end


def test_lowest_priority_takes_the_cheapest() -> None:
    r, cfp = requester(priority=5)
    a, b = provider("urn:a", cfp), provider("urn:b", cfp)
    r.receive(propose(a, completion=10, price=9), 3)
    (award,) = of(r.receive(propose(b, completion=12, price=1), 4), Awarded)
    assert award.winner.provider == "urn:b"


def test_refusals_count_as_answers_and_deadline_closes_a_round() -> None:
    r, cfp = requester()
    a = provider("urn:a", cfp)
    (refusal,) = sends(a.refuse("busy", "full", 2))
    assert r.receive(refusal, 3) == [] and r.state is RState.COLLECTING
    assert r.tick(999) == []
    out = r.tick(1000)
    assert r.state is RState.BACKOFF and of(out, Note)[0].kind == "no-proposals"
    (cfp2,) = sends(r.tick(1100))
    assert cfp2.id != cfp.id and cfp2.conversation == cfp.conversation and r.round == 2


def test_rounds_without_proposals_fail_the_step_with_a_reason() -> None:
    r, _ = requester(expected=())
    r.tick(1000)
    r.tick(1100)
    out = r.tick(2100)
    assert r.state is RState.FAILED and "no valid proposal in 2 rounds" in of(out, Failed)[0].reason


def test_late_proposal_is_rejected_as_late() -> None:
    r, cfp = requester(expected=("urn:a", "urn:b", "urn:c"))
    a = provider("urn:a", cfp)
    out = r.receive(propose(a, 10, 1), 1001)
    (reject,) = sends(out)
    assert reject.type is M.REJECT_PROPOSAL and of(out, Note)[0].kind == "late"


def test_duplicate_message_is_ignored() -> None:
    r, cfp = requester(expected=("urn:a", "urn:b"))
    msg = propose(provider("urn:a", cfp), 10, 1)
    r.receive(msg, 3)
    out = r.receive(msg, 4)
    assert of(out, Note)[0].kind == "duplicate" and not sends(out) and len(r.offers) == 1


def test_copies_of_one_message_are_noted_once_and_answered_at_most_once_a_second() -> None:
    """Issue 21 finding 8: 1,000 copies of one call drew 1,000 proposals and notes per bidder."""
    r, cfp = requester(expected=("urn:a",))
    a = provider("urn:a", cfp, now=1)
    (proposal,) = sends(a.propose(bid("urn:a", 10, 1), 5_000, 2))
    out = [a.receive(cfp, t) for t in range(3, 1000)]  # within a second of the call's arrival
    assert all(o == [Count("duplicate")] for o in out)
    again = a.receive(cfp, 1001)  # a second later: answered again, from the record of the answer
    assert sends(again) == [proposal] and [n.kind for n in of(again, Note)] == ["duplicate"]
    assert a.receive(cfp, 1500) == [Count("duplicate")]
    r.receive(proposal, 3)
    assert [n.kind for n in of(r.receive(proposal, 4), Note)] == ["duplicate"]
    assert r.receive(proposal, 5) == [Count("duplicate")]  # the requester notes a copy once


def test_out_of_sequence_gets_not_understood() -> None:
    r, _cfp = requester()
    stray = make_message(
        M.INFORM,
        sender="urn:a",
        sender_role=Role.PROVIDER,
        conversation_id="conv-1",
        receiver="urn:p",
        in_reply_to="x",
    )
    out = r.receive(stray, 5)
    assert [m.type for m in sends(out)] == [M.NOT_UNDERSTOOD]


def test_not_understood_is_never_answered_with_not_understood() -> None:
    r, _cfp = requester()
    r.tick(1000)  # backoff
    nu = make_message(M.NOT_UNDERSTOOD, sender="urn:a", sender_role=Role.PROVIDER, conversation_id="conv-1")
    assert sends(r.receive(nu, 1001)) == []


def test_full_happy_path_with_booking_and_result() -> None:
    r, cfp = requester(expected=("urn:a",))
    a = provider("urn:a", cfp)
    out = r.receive(propose(a, 10, 1), 3)
    (accept,) = sends(out)
    out = a.receive(accept, 4)
    assert of(out, Book) and a.state is PState.BOOKED
    (confirm,) = sends(out)
    assert of(r.receive(confirm, 5), Scheduled) and r.state is RState.CONFIRMED
    (inform,) = sends(a.complete(StepResult("urn:a", 1.0, 6.0, "cell"), 6))
    (done,) = of(r.receive(inform, 7), Completed)
    assert done.result.finished == 6.0 and r.state is RState.DONE


def test_confirm_timeout_resends_then_withdraws_and_rebids() -> None:
    r, cfp = requester(expected=("urn:a",))
    a = provider("urn:a", cfp)
    (accept,) = sends(r.receive(propose(a, 10, 1), 3))
    (again,) = sends(r.tick(503))
    assert again.id == accept.id  # the same acceptance: the provider answers it idempotently
    r.tick(1003)
    out = r.tick(1503)
    kinds = [m.type for m in sends(out)]
    assert kinds == [M.REJECT_PROPOSAL, M.CALL_FOR_PROPOSAL] and of(out, Rebid)
    # The withdrawn provider confirms late: it is told to cancel, and releases.
    (confirm,) = sends(a.receive(accept, 1600))
    (cancel,) = sends(r.receive(confirm, 1601))
    assert cancel.type is M.REJECT_PROPOSAL and cancel.in_reply_to == accept.id
    assert of(a.receive(cancel, 1602), Release)[0].booked and a.state is PState.RELEASED


def test_inform_failure_rebids_then_fails_after_max_failures() -> None:
    r, cfp = requester(expected=("urn:a",))
    a = provider("urn:a", cfp)
    (accept,) = sends(r.receive(propose(a, 10, 1), 3))
    (confirm,) = sends(a.receive(accept, 4))
    r.receive(confirm, 5)
    (failure,) = sends(a.fail("breakdown", "spindle", 6))
    out = r.receive(failure, 7)
    assert of(out, Rebid) and r.state is RState.COLLECTING and r.round == 2
    (cfp2,) = sends(out)
    b = provider("urn:a", cfp2, 8)
    (accept2,) = sends(r.receive(propose(b, 10, 1, now=9), 9))
    (confirm2,) = sends(b.receive(accept2, 10))
    r.receive(confirm2, 11)
    (failure2,) = sends(b.fail("breakdown", "again", 12))
    assert of(r.receive(failure2, 13), Failed) and r.state is RState.FAILED


def test_status_query_after_silence_gets_the_result_replayed() -> None:
    r, cfp = requester(expected=("urn:a",))
    a = provider("urn:a", cfp)
    (accept,) = sends(r.receive(propose(a, 10, 1), 3))
    (confirm,) = sends(a.receive(accept, 4))
    r.receive(confirm, 5)
    sends(a.complete(StepResult("urn:a", 1.0, 6.0, "cell"), 6))  # the inform is lost
    r.expect_completion(10)
    (query,) = sends(r.tick(10 + CFG.status_interval_ms))
    assert query.id == accept.id
    (replayed,) = sends(a.receive(query, 70_000))
    assert replayed.type is M.INFORM and of(r.receive(replayed, 70_001), Completed)


def test_a_step_documented_as_completed_ends_its_procedure_and_is_never_bid_again() -> None:
    """The resource did the step and documented it, but neither its informConfirm nor its inform
    arrived: without the documentation the confirmation timeout would bid the step again."""
    r, cfp = requester(expected=("urn:a",))
    a = provider("urn:a", cfp)
    (accept,) = sends(r.receive(propose(a, 10, 1), 3))
    (confirm,) = sends(a.receive(accept, 4))  # lost
    (inform,) = sends(a.complete(StepResult("urn:a", 1.0, 6.0, "cell"), 6))  # lost too
    out = r.documented(7)
    assert r.state is RState.DONE and r.deadline is None and sends(out) == []
    assert [n.kind for n in of(out, Note)] == ["documented"]
    assert r.tick(10_000) == [] and r.documented(10_001) == []  # no timeout, no second ending
    assert r.receive(inform, 10_002) == []  # the winner's result, late: already known
    assert [n.kind for n in of(r.receive(confirm, 10_003), Note)] == ["out-of-sequence"]
    restored = Requester.restore(r.snapshot())
    assert restored.state is RState.DONE and restored.settled


def test_a_round_open_when_the_step_is_documented_rejects_its_offers() -> None:
    """A re-bid round was collecting when the step turned out done: the offers' holds are freed."""
    r, cfp = requester()
    a = provider("urn:a", cfp)
    assert r.receive(propose(a, 10, 1), 3) == []
    (reject,) = sends(r.documented(4))
    assert reject.type is M.REJECT_PROPOSAL and reject.receiver == "urn:a"
    assert Reason.from_json_elements(reject.interactionElements).code == "step-done"
    assert of(a.receive(reject, 5), Release) and r.state is RState.DONE


def test_provider_offer_expires_and_releases_its_hold() -> None:
    _, cfp = requester()
    a = provider("urn:a", cfp)
    propose(a, 10, 1, valid=3000)
    assert a.tick(2999) == []
    out = a.tick(3000)
    assert of(out, Release)[0].reason == "expired" and a.state is PState.RELEASED


def test_acceptance_after_validity_is_refused() -> None:
    r, cfp = requester(expected=("urn:a",))
    a = provider("urn:a", cfp)
    (accept,) = sends(r.receive(propose(a, 10, 1, valid=4), 3))
    out = a.receive(accept, 4)
    (refusal,) = sends(out)
    assert refusal.type is M.REFUSE_PROPOSAL and of(out, Release) and a.state is PState.RELEASED
    out = r.receive(refusal, 5)
    assert of(out, Rebid)


def test_provider_rejects_messages_from_someone_else() -> None:
    r, cfp = requester(expected=("urn:a",))
    a = provider("urn:a", cfp)
    (accept,) = sends(r.receive(propose(a, 10, 1), 3))
    forged = make_message(
        M.ACCEPT_PROPOSAL,
        sender="urn:mallory",
        sender_role=Role.REQUESTER,
        conversation_id=accept.conversation,
        receiver="urn:a",
        in_reply_to=accept.in_reply_to,
    )
    out = a.receive(forged, 4)
    assert a.state is PState.PROPOSED and of(out, Note)[0].kind == "not-participant"


def test_provider_cannot_complete_what_it_did_not_book() -> None:
    _, cfp = requester()
    a = provider("urn:a", cfp)
    with pytest.raises(ProtocolError):
        a.complete(StepResult("urn:a", 0.0, 1.0, "x"), 3)


def test_late_call_for_proposal_is_not_answered() -> None:
    _, cfp = requester()
    p, out = Provider.on_call("urn:a", cfp, 1001)
    assert p is not None and p.state is PState.REFUSED and not sends(out)


def test_unreadable_call_gets_not_understood() -> None:
    cfp = make_message(M.CALL_FOR_PROPOSAL, sender="urn:p", sender_role=Role.REQUESTER, conversation_id="c")
    p, out = Provider.on_call("urn:a", cfp, 1)
    assert p is None and [m.type for m in sends(out)] == [M.NOT_UNDERSTOOD]


def test_a_call_is_served_only_for_the_product_that_sent_it() -> None:
    _, cfp = requester()  # a call of product p-1
    p, out = Provider.on_call("urn:a", cfp, 1, caller="ws-2")
    assert p is None and [m.type for m in sends(out)] == [M.NOT_UNDERSTOOD]
    assert [n.kind for n in of(out, Note)] == ["wrong-product"] and not of(out, Evaluate)
    p, out = Provider.on_call("urn:a", cfp, 1, caller="p-1")
    assert p is not None and of(out, Evaluate)


def test_rounds_route_by_reference_and_snapshots_round_trip() -> None:
    r, cfp = requester(expected=("urn:a",))
    rounds = ProviderRounds()
    a = provider("urn:a", cfp)
    rounds.add(a)
    (accept,) = sends(r.receive(propose(a, 10, 1), 3))
    rounds.index(a)
    assert rounds.route(accept) is a and rounds.route(cfp) is a
    assert Provider.restore(a.snapshot()).snapshot() == a.snapshot()
    assert Requester.restore(r.snapshot()).snapshot() == r.snapshot()
