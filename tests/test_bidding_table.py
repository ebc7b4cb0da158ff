"""The bidding TABLEs as data: every transition's targets are checked when it runs."""

from __future__ import annotations

import pytest

from protocol.bidding import provider as provider_module
from protocol.bidding import requester as requester_module
from protocol.bidding.provider import Provider, PState
from protocol.bidding.requester import DEADLINE, DOCUMENTED, RESUME, Requester, RequesterConfig, RState
from protocol.bidding.table import Transition, TransitionError, to
from protocol.elements import Bid, StepCall
from protocol.frame import MessageType, Role, make_message

M = MessageType
CALL = StepCall("p-1", 1, "milling", "store", 0.0, priority=1)
CFG = RequesterConfig(reply_window_ms=1000, max_rounds=2, backoff_ms=100, confirm_timeout_ms=500)


def started() -> Requester:
    r = Requester("urn:p", "conv-1", CALL, frozenset({"urn:a"}), CFG)
    r.start(0)
    return r


def test_a_handler_that_leaves_its_allowed_states_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check is real: narrowing an entry's targets turns the same handler into an error."""
    r = started()
    monkeypatch.setitem(requester_module.TABLE, (RState.COLLECTING, DEADLINE), to("_close", RState.AWARDING))
    with pytest.raises(TransitionError, match=r"_close: collecting --deadline--> backoff"):
        r.tick(1_000)  # no proposal: the round backs off, which the narrowed entry does not allow


def test_a_provider_handler_is_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    cfp = make_message(
        M.CALL_FOR_PROPOSAL,
        sender="urn:p",
        sender_role=Role.REQUESTER,
        conversation_id="c",
        reply_by=5_000,
        elements=CALL.to_json_elements(),
    )
    p, _ = Provider.on_call("urn:a", cfp, 1)
    assert p is not None
    monkeypatch.setitem(
        provider_module.TABLE, (PState.EVALUATING, "refuse"), to("_do_refuse", PState.PROPOSED)
    )
    with pytest.raises(TransitionError, match="evaluating --refuse--> refused"):
        p.refuse("busy", "no capacity", 2)


def test_every_entry_names_a_handler_and_states_of_its_machine() -> None:
    for table, cls, states in (
        (requester_module.TABLE, Requester, RState),
        (provider_module.TABLE, Provider, PState),
    ):
        for (state, _event), t in table.items():
            assert isinstance(t, Transition) and callable(getattr(cls, t.handler))
            assert state in states and t.targets and t.targets <= set(states)


def test_documentation_and_restart_go_through_the_table() -> None:
    """`documented` and `resume` are events of every open state, and nothing in a terminal one."""
    open_states = [s for s in RState if s not in requester_module.TERMINAL]
    for s in open_states:
        assert requester_module.TABLE[(s, DOCUMENTED)].targets == {RState.DONE}
        assert requester_module.TABLE[(s, RESUME)].targets == {s}
    r = started()
    r.receive(
        make_message(
            M.PROPOSAL,
            sender="urn:a",
            sender_role=Role.PROVIDER,
            conversation_id="conv-1",
            receiver="urn:p",
            in_reply_to=r.cfp_id,
            reply_by=9_000,
            elements=Bid("urn:a", "milling", 0.0, 5.0, 5.0, 0.0, 0.0, 1.0, 100.0, "cell").to_json_elements(),
        ),
        10,
    )
    assert r.state is RState.AWARDING
    r.tick(r.deadline)  # the confirmation is overdue once: the acceptance is re-sent
    assert r.retries == 1
    assert r.resume(700) == [] and r.retries == 0 and r.deadline == 700 and r.state is RState.AWARDING
    assert r.documented(701) and r.state is RState.DONE
    assert r.resume(702) == [] and r.documented(703) == [] and r.deadline is None
