"""A resource's queue order and honest re-confirmation, without a broker.

The timeline decides where a newcomer goes (overtaking only re-queueable bookings, filling idle
time, avoiding extra setups) and reports the bookings whose times moved; the provider machine
re-confirms them with a new informConfirm and the requester takes the new times.
"""

from __future__ import annotations

import pytest

from agents.bidding.provider_role import rank
from agents.resource.timeline import Slot, Timeline, pack
from protocol.bidding.effects import Book, Count, Note, Scheduled, Send
from protocol.bidding.provider import REPLAY_INTERVAL_MS, ProtocolError, Provider, PState
from protocol.bidding.requester import Requester, RequesterConfig, RState
from protocol.elements import Bid, Booking, StepCall
from protocol.frame import Message, MessageType

M = MessageType


def slot(key: str, duration: float, *, rank: tuple = (1,), booked: bool = True, firm: bool = False,
         capability: str = "c", ready: float = 0.0, setup: float = 0.0) -> Slot:  # fmt: skip
    return Slot(key, f"job/{key}", capability, ready, 0.0, 0.0, 0.0, booked=booked, duration=duration,
                setup_change=setup, rank=rank, firm=firm)  # fmt: skip


def queue(*slots: Slot) -> Timeline:
    t = Timeline()
    for s in slots:
        index, (s.start, s.end, s.setup) = t.place(s, 0.0, None)
        t.hold(s, index)
    return t


def test_a_more_urgent_newcomer_overtakes_a_booking_that_is_then_moved() -> None:
    t = queue(slot("a", 5, rank=(1, 0.5)), slot("b", 3, rank=(1, 0.9)))
    assert [(s.key, s.start, s.end) for s in t.pending()] == [("a", 0, 5), ("b", 5, 8)]
    new = slot("c", 2, rank=(1, 0.7), booked=False)
    index, times = t.place(new, 0.0, None)
    assert index == 1 and times[:2] == (5, 7)  # after the more urgent a, before the less urgent b
    new.start, new.end, new.setup = times  # the offer's times
    t.hold(new, index)
    t.book("c")
    (moved,) = t.repack(0.0, None)
    assert (moved.key, moved.start, moved.end) == ("b", 7, 10)  # the booking to re-confirm
    assert t.repack(0.0, None) == []  # nothing moves twice


def test_firm_bookings_and_open_offers_are_never_overtaken() -> None:
    for ahead in (slot("a", 5, rank=(1, 0.9), firm=True), slot("a", 5, rank=(1, 0.9), booked=False)):
        t = queue(ahead)
        index, times = t.place(slot("c", 2, rank=(1, 0.1)), 0.0, None)
        assert index == 1 and times[:2] == (5, 7)


def test_idle_time_is_filled_when_nobody_moves() -> None:
    later = slot("a", 4, rank=(1, 0.1), ready=10, firm=True)  # its product arrives at 10
    t = queue(later)
    index, times = t.place(slot("c", 3, rank=(1, 0.9)), 0.0, None)
    assert index == 0 and times[:2] == (0, 3)
    index, times = t.place(slot("d", 12, rank=(1, 0.9)), 0.0, None)
    assert index == 1 and times[:2] == (14, 26)  # would delay a: goes behind it


def test_overtaking_never_adds_setup_time() -> None:
    # a and b are drilling (same set-up); a milling newcomer ahead of b would add a set-up.
    t = queue(
        slot("a", 2, rank=(1, 0.1), capability="drill", setup=1),
        slot("b", 2, rank=(1, 0.9), capability="drill", setup=1),
    )
    index, _ = t.place(slot("c", 2, rank=(1, 0.5), capability="mill", setup=1), 0.0, "drill")
    assert index == 2
    assert pack(t.pending(), 0.0, "drill") == [(0, 2, 0), (2, 4, 0)]


def test_rank_priority_first_then_most_work_per_sqrt_of_processing_time() -> None:
    def call(priority: int, remaining: float) -> StepCall:
        return StepCall("p", 1, "c", "", 0.0, priority=priority, remaining_work=remaining)

    assert rank(call(1, 100), 4) < rank(call(1, 50), 4)  # more work left goes first
    assert rank(call(1, 100), 4) < rank(call(1, 100), 9)  # same work left: the shorter step first
    assert rank(call(1, 100), 16) < rank(call(1, 40), 4)  # 4/100 < 2/40: remaining work weighs more
    assert rank(call(1, 10), 9) < rank(call(2, 1000), 1)  # priority before urgency


# --- the protocol: re-confirmation ------------------------------------------------------------------


def _booked() -> tuple[Requester, Provider, Message]:
    call = StepCall("p-1", 1, "milling", "store", 0.0, priority=1)
    r = Requester("urn:p", "conv-1", call, frozenset({"urn:a"}), RequesterConfig())
    (cfp,) = [e.message for e in r.start(0) if isinstance(e, Send)]
    p, _ = Provider.on_call("urn:a", cfp, 1)
    assert p is not None
    (proposal,) = [e.message for e in p.propose(Bid("a", "milling", 0, 5, 5, 0, 0, 5, 100, "x"), 9_000, 2)]
    (accept,) = [e.message for e in r.receive(proposal, 3) if isinstance(e, Send)]
    out = p.receive(accept, 4)
    assert [e for e in out if isinstance(e, Book)] and p.state is PState.BOOKED
    (confirm,) = [e.message for e in out if isinstance(e, Send)]
    assert [e for e in r.receive(confirm, 5) if isinstance(e, Scheduled)]
    return r, p, accept


def test_a_moved_booking_is_re_confirmed_and_the_requester_takes_the_new_times() -> None:
    r, p, accept = _booked()
    (again,) = [e.message for e in p.reschedule(Booking("a", 7, 12), 6) if isinstance(e, Send)]
    assert again.type is M.INFORM_CONFIRM and again.in_reply_to == accept.id
    out = r.receive(again, 7)
    (scheduled,) = [e for e in out if isinstance(e, Scheduled)]
    assert scheduled.booking == Booking("a", 7, 12) and r.state is RState.CONFIRMED
    assert [n.kind for n in out if isinstance(n, Note)] == ["rescheduled"]
    assert r.receive(again, 8)[0].kind == "duplicate"  # the same message twice changes nothing
    # A status query (the acceptance re-sent, a status interval later) is answered with the latest
    # times; a copy within REPLAY_INTERVAL_MS of the acceptance is only counted.
    assert p.receive(r.accept_message(), 9) == [Count("duplicate")]
    replay = [e.message for e in p.receive(r.accept_message(), 4 + REPLAY_INTERVAL_MS) if isinstance(e, Send)]
    assert Booking.from_json_elements(replay[0].interactionElements) == Booking("a", 7, 12)


def test_only_a_booking_can_be_rescheduled() -> None:
    call = StepCall("p-1", 1, "milling", "store", 0.0, priority=1)
    r = Requester("urn:p", "conv-1", call, frozenset({"urn:a"}), RequesterConfig())
    (cfp,) = [e.message for e in r.start(0) if isinstance(e, Send)]
    p, _ = Provider.on_call("urn:a", cfp, 1)
    assert p is not None
    with pytest.raises(ProtocolError):
        p.reschedule(Booking("a", 1, 2), 2)


# --- the product: commit only to an offer that starts now ----------------------------------------


def _round(priority: int = 1, starts: tuple[float, ...] = (7.0, 9.0), now: int = 3_000):
    """A requester (clock origin 0: 1 unit = 1000 ms) closing a round with offers starting at `starts`."""
    call = StepCall("p-1", 1, "milling", "store", 3.0, priority=priority)
    names = [f"urn:{i}" for i in range(len(starts))]
    config = RequesterConfig(clock_origin_ms=0)
    r = Requester("urn:p", "conv-1", call, frozenset(names), config)
    (cfp,) = [e.message for e in r.start(now - 10) if isinstance(e, Send)]
    out: list[object] = []
    for name, start in zip(names, starts, strict=True):
        p, _ = Provider.on_call(name, cfp, now - 5)
        assert p is not None
        offer = Bid(name, "milling", start, start + 5, 5, 0, 0, 5, 100, "x")
        (proposal,) = [e.message for e in p.propose(offer, 99_000, now - 4)]
        out = r.receive(proposal, now)
    return r, out


def test_with_a_choice_and_every_resource_busy_the_product_calls_again_when_the_best_starts() -> None:
    r, out = _round()
    rejected = [e.message for e in out if isinstance(e, Send)]
    assert len(rejected) == 2 and all(m.type is M.REJECT_PROPOSAL for m in rejected)
    assert r.state is RState.BACKOFF and r.deadline == 7_000 and r.winner is None
    assert [n.kind for n in out if isinstance(n, Note)] == ["deferred"]
    again = r.tick(7_000)
    assert [e.message.type for e in again if isinstance(e, Send)] == [M.CALL_FOR_PROPOSAL]
    assert r.round == 2 and r.empty_rounds == 0  # waiting is not an empty round
    assert Requester.restore(r.snapshot()).deferrals == 1


@pytest.mark.parametrize(
    "priority, starts",
    [(1, (3.0, 9.0)), (1, (7.0,)), (3, (7.0, 9.0))],
    ids=["starts-now", "no-choice", "priority-3"],
)
def test_the_product_accepts_at_once_otherwise(priority: int, starts: tuple[float, ...]) -> None:
    r, out = _round(priority, starts)
    assert r.state is RState.AWARDING
    assert next(e.message.type for e in out if isinstance(e, Send)) is M.ACCEPT_PROPOSAL


def test_on_a_wall_clock_only_late_drift_within_the_tolerance_goes_unconfirmed() -> None:
    from agents.resource.timeline import moved_from

    assert not moved_from(10, 12, 10.2, 12.2, tolerance=0.5)  # running a little late: no news
    assert moved_from(10, 12, 10.6, 12.6, tolerance=0.5)  # later than that: re-confirmed
    assert moved_from(10, 12, 9.9, 11.9, tolerance=0.5)  # earlier: always re-confirmed


def test_a_small_move_is_news_when_another_step_got_ahead() -> None:
    t = queue(slot("a", 2, rank=(1, 0.1)), slot("b", 2, rank=(1, 0.9)))
    b = t.slots["b"]
    b.ahead = frozenset({"a"})
    assert t.repack(0.2, None, tolerance=0.5) == []  # the queue runs 0.2 late: drift, no news
    t.slots["x"] = slot("x", 1, booked=True)  # x now runs: it is new ahead of a and b
    assert [s.key for s in t.repack(0.2, None, tolerance=0.5, running="x")] == ["a", "b"]
    assert (b.start, b.ahead) == (2.2, frozenset({"a", "x"}))
