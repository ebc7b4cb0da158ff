"""Both bidding machines driven through a hostile network: random interleavings,
losses, duplicates and delays, chosen by hypothesis.

The network is fair-lossy: during the first phase messages may be lost,
duplicated or reordered at will; afterwards it heals (every message in flight is
delivered, eventually). Invariants checked:

- no exception, ever;
- every conversation reaches a terminal state once the network heals;
- the requester never has two acceptances outstanding: every acceptance but the
  last is withdrawn before the next is sent;
- a provider never holds capacity past its offer's validity;
- exactly one `Completed`, or a `Failed`, per conversation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.bidding.effects import Completed, Evaluate, Failed, Send
from protocol.bidding.provider import Provider, ProviderRounds, PState
from protocol.bidding.requester import Requester, RequesterConfig
from protocol.elements import Bid, StepCall, StepResult
from protocol.frame import Message, MessageType

M = MessageType
CFG = RequesterConfig(
    reply_window_ms=100,
    max_rounds=3,
    backoff_ms=50,
    confirm_timeout_ms=80,
    confirm_retries=2,
    status_interval_ms=200,
    max_failures=4,
)


@dataclass
class ProviderAgent:
    """A resource that answers each call with a random but fixed behaviour."""

    name: str
    behaviour: str  # "propose" | "refuse" | "silent" | "fail"
    validity: int
    work: int
    rounds: ProviderRounds = field(default_factory=ProviderRounds)
    due: dict[str, int] = field(default_factory=dict)  # cfp id -> when the booked work ends

    def handle(self, msg: Message, now: int) -> list[object]:
        if msg.type is M.CALL_FOR_PROPOSAL:
            if self.rounds.route(msg) is not None:
                return []
            p, effects = Provider.on_call(self.name, msg, now)
            if p is None:
                return effects
            self.rounds.add(p)
            if any(isinstance(e, Evaluate) for e in effects):
                effects += self._decide(p, now)
            self.rounds.index(p)
            return effects
        p = self.rounds.route(msg)
        if p is None:
            return []
        effects = p.receive(msg, now)
        self.rounds.index(p)
        if p.state is PState.BOOKED and p.cfp_id not in self.due:
            self.due[p.cfp_id] = now + self.work
        return effects

    def _decide(self, p: Provider, now: int) -> list[object]:
        if self.behaviour == "silent":
            return []
        if self.behaviour == "refuse":
            return p.refuse("busy", "no capacity", now)
        bid = Bid(self.name, "milling", now, now + self.work, self.work, 0.0, 0.0, float(self.work), 0.0, "x")
        return p.propose(bid, now + self.validity, now)

    def tick(self, now: int) -> list[object]:
        out: list[object] = []
        for p in self.rounds:
            out += p.tick(now)
            if p.state is PState.BOOKED and self.due.get(p.cfp_id, now + 1) <= now:
                if self.behaviour == "fail":
                    out += p.fail("breakdown", "simulated", now)
                else:
                    out += p.complete(StepResult(self.name, float(now - self.work), float(now), "x"), now)
            assert not (p.state is PState.PROPOSED and p.valid_until is not None and now >= p.valid_until), (
                "a provider holds capacity after its offer expired"
            )
        return out


actions = st.lists(
    st.tuples(
        st.sampled_from(["deliver", "deliver", "deliver", "drop", "dup", "wait"]), st.integers(0, 10_000)
    ),
    max_size=120,
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    behaviours=st.lists(
        st.sampled_from(["propose", "propose", "refuse", "silent", "fail"]), min_size=1, max_size=4
    ),
    validity=st.integers(20, 400),
    work=st.integers(1, 300),
    expected_known=st.booleans(),
    script=actions,
)
def test_bidding_survives_a_hostile_network(behaviours, validity, work, expected_known, script) -> None:
    providers = {f"urn:r{i}": ProviderAgent(f"urn:r{i}", b, validity, work) for i, b in enumerate(behaviours)}
    call = StepCall("p", 1, "milling", "home", 0.0, priority=1 + len(behaviours) % 5)
    req = Requester("urn:p", "conv", call, frozenset(providers) if expected_known else frozenset(), CFG)
    now = 0
    net: list[tuple[str, Message]] = []  # (receiver, message) in flight
    outcomes: list[object] = []
    accepts: list[str] = []
    withdrawn: set[str] = set()

    def emit(effects: list[object], sender_is_requester: bool) -> None:
        for e in effects:
            if isinstance(e, Send):
                m = e.message
                if sender_is_requester and m.type is M.ACCEPT_PROPOSAL and m.id not in accepts:
                    assert all(a in withdrawn for a in accepts), "two acceptances outstanding"
                    accepts.append(m.id)
                if m.in_reply_to in accepts and m.type in (
                    M.REJECT_PROPOSAL,
                    M.REFUSE_PROPOSAL,
                    M.INFORM_FAILURE,
                ):
                    withdrawn.add(m.in_reply_to)  # withdrawn by the requester, or declined by the provider
                targets = list(providers) if m.receiver is None else [m.receiver]
                net.extend((t, m) for t in targets)
            elif isinstance(e, Completed | Failed):
                outcomes.append(e)

    def deliver(i: int) -> None:
        target, msg = net.pop(i)
        if target == "urn:p":
            emit(req.receive(msg, now), True)
        elif target in providers:
            emit(providers[target].handle(msg, now), False)

    def tick_all() -> None:
        emit(req.tick(now), True)
        for agent in providers.values():
            emit(agent.tick(now), False)

    emit(req.start(now), True)
    # Phase 1: anything goes.
    for action, n in script:
        if action == "wait":
            now += n % 150
            tick_all()
        elif net:
            i = n % len(net)
            if action == "deliver":
                deliver(i)
            elif action == "drop":
                net.pop(i)
            else:
                net.insert(n % (len(net) + 1), net[i])
    # Phase 2: the network heals; time goes on until everybody is done.
    for _ in range(10_000):
        while net:
            deliver(0)
        if req.done and all(p.done for a in providers.values() for p in a.rounds):
            break
        now += 10
        tick_all()
    assert req.done, f"requester stuck in {req.state}"
    stuck = [(a.name, p.state) for a in providers.values() for p in a.rounds if not p.done]
    assert not stuck, f"providers stuck: {stuck}"
    assert len(outcomes) == 1, outcomes
    if isinstance(outcomes[0], Completed):
        assert outcomes[0].provider == req.winner.provider
