"""Both bidding machines snapshot through one versioned codec, with their ids injected."""

from __future__ import annotations

import itertools
import json

import pytest

from protocol.bidding.effects import Send
from protocol.bidding.provider import Provider, PState
from protocol.bidding.requester import Requester, RequesterConfig, RState
from protocol.bidding.snapshot import VERSION, SnapshotError
from protocol.elements import Bid, StepCall

CALL = StepCall("p-1", 1, "milling", "store", 0.0, priority=2)


def counter(prefix: str):
    numbers = itertools.count(1)
    return lambda: f"{prefix}-{next(numbers)}"


def bid(resource: str, completion: float) -> Bid:
    return Bid(resource, "milling", 0.0, completion, 5.0, 0.0, 0.0, 1.0, 100.0, "cell")


def awarding() -> tuple[Requester, Provider, list[str]]:
    """One requester with two offers, the better accepted and the other held as its reserve."""
    sent: list[str] = []

    def out(effects: list[object]) -> list:
        msgs = [e.message for e in effects if isinstance(e, Send)]
        sent.extend(m.id for m in msgs)
        return msgs

    r = Requester("urn:p", "conv-1", CALL, frozenset({"urn:a", "urn:b"}), RequesterConfig(), ids=counter("r"))
    cfp = out(r.start(0))[0]
    a, _ = Provider.on_call("urn:a", cfp, 1, ids=counter("a"))
    b, _ = Provider.on_call("urn:b", cfp, 1, ids=counter("b"))
    assert a is not None and b is not None
    (pa,) = out(a.propose(bid("urn:a", 5.0), 5_000, 2))
    (pb,) = out(b.propose(bid("urn:b", 9.0), 5_000, 2))
    out(r.receive(pa, 3))
    (accept,) = out(r.receive(pb, 4))
    out(a.receive(accept, 5))
    assert r.state is RState.AWARDING and r.reserve and a.state is PState.BOOKED
    return r, a, sent


def test_every_id_a_machine_sends_comes_from_the_injected_source() -> None:
    r, a, sent = awarding()
    assert sent == ["r-1", "a-1", "b-1", "r-2", "a-2"]  # call, two proposals, acceptance, confirmation
    again = awarding()
    assert again[0].snapshot() == r.snapshot() and again[1].snapshot() == a.snapshot()  # reproducible


def test_snapshots_carry_the_version_and_round_trip() -> None:
    r, a, _ = awarding()
    for machine, kind in ((r, "requester"), (a, "provider")):
        snap = json.loads(json.dumps(machine.snapshot()))  # as the journal stores it
        assert snap["v"] == VERSION and snap["machine"] == kind
        assert type(machine).restore(snap).snapshot() == machine.snapshot()


def test_snapshots_written_before_the_version_stamp_still_load() -> None:
    """Version 1: no stamp; a requester without reserve, queries, deferrals and settled; a
    provider without answer times and with its answers kept as objects, not wire JSON."""
    r, a, _ = awarding()
    old_r = json.loads(json.dumps(r.snapshot()))
    for key in ("v", "machine", "reserve", "queries", "deferrals", "settled"):
        del old_r[key]
    restored = Requester.restore(old_r)
    assert restored.state is RState.AWARDING and restored.winner == r.winner
    assert restored.reserve == [] and restored.queries == 0 and not restored.settled
    old_a = json.loads(json.dumps(a.snapshot()))
    for key in ("v", "machine", "answered_at"):
        del old_a[key]
    old_a["replies"] = {k: json.loads(v) for k, v in old_a["replies"].items()}
    p = Provider.restore(old_a)
    assert p.state is PState.BOOKED and p.replies == a.replies and p.answered_at == {}


def test_a_snapshot_of_another_machine_or_a_newer_version_is_refused() -> None:
    r, a, _ = awarding()
    with pytest.raises(SnapshotError, match="a provider snapshot cannot restore a requester"):
        Requester.restore(a.snapshot())
    with pytest.raises(SnapshotError, match=f"version {VERSION + 1}; this code reads 1 to {VERSION}"):
        Provider.restore({**a.snapshot(), "v": VERSION + 1})
    broken = r.snapshot()
    del broken["round"]
    with pytest.raises(SnapshotError, match="lacks 'round'"):
        Requester.restore(broken)
