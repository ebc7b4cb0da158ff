"""The bidding-request role: one `Requester` machine per step, persisted at every transition.

The role owns the machines' lifecycle (start, feed, time out, persist, recover);
what an outcome means for the product (document it, go on to the next step) is
the listener's business.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Protocol

import orjson

from agents.persistence.tables import ConversationRecord
from agents.runtime.role import Role
from protocol.bidding.effects import Count, Effect
from protocol.bidding.requester import Requester, RequesterConfig, RState
from protocol.elements import StepCall
from protocol.frame import Message, new_id
from protocol.selection import PriorityWeighted, SelectionPolicy
from protocol.topics import Topic


class OutcomeListener(Protocol):
    async def on_outcome(self, requester: Requester, outcome: object) -> None: ...

    def step_completed(self, step: int) -> bool:
        """Does the product's documentation record the step as completed?"""
        ...

    async def advance(self) -> None: ...


class BiddingRequester(Role):
    def __init__(
        self, config: RequesterConfig, listener: OutcomeListener, policy: SelectionPolicy | None = None
    ) -> None:
        self.config = config
        self.listener = listener
        self.policy = policy or PriorityWeighted()
        self.machines: dict[str, Requester] = {}
        self._recovered: list[str] = []  # conversations reloaded after a restart, resumed on start

    def accepts(self, msg: Message, topic: Topic) -> bool:
        return msg.conversation in self.machines

    async def handle(self, msg: Message, topic: Topic) -> None:
        r = self.machines[msg.conversation]
        state = r.state
        effects = r.receive(msg, self.agent.now_ms())
        # A bid that neither closes the round nor is answered (nothing to send, same state) gets
        # no snapshot of its own: the round's record is written when it closes (with every bid)
        # or sends; a restart in between closes it with the bids of the last record, or calls
        # again. k snapshots of a growing bid list per step were a tenth of the journal's rows.
        # (A further copy of a message, only counted, changes nothing either.)
        changed = any(not isinstance(e, Count) for e in effects)
        await self._step(r, effects, persist=changed or r.state is not state)

    async def request(self, call: StepCall) -> Requester:
        """Start the bidding procedure for one step."""
        expected = await self._bidders(call)
        if self.config.clock_origin_ms is None:  # bids are in simulated time: the machine converts
            self.config = dataclasses.replace(self.config, clock_origin_ms=self.agent.clock.epoch_ms(0.0))
        r = Requester(self.agent.aas_id, new_id(), call, expected, self.config, self.policy, ids=new_id)
        self.machines[r.conversation_id] = r
        await self._step(r, r.start(self.agent.now_ms()))
        return r

    async def _step(self, r: Requester, effects: list[Effect], *, persist: bool = True) -> None:
        if persist:
            self._persist(r)  # staged before anything it implies is published
        for outcome in await self.agent.carry_out(effects):
            await self.listener.on_outcome(r, outcome)
        conv = r.conversation_id
        self.agent.set_timer_ms(f"req:{conv}", r.deadline, lambda: self._tick(conv))

    async def _tick(self, conversation_id: str) -> None:
        r = self.machines.get(conversation_id)
        if r is None:
            return
        if not r.done and self.listener.step_completed(r.call.step):
            # Its deadline came, but the step is documented as done (the inform lost or late):
            # the product goes on, and going on ends every procedure of a documented step
            # instead of asking again or bidding anew.
            await self.listener.advance()
            return
        if r.state is RState.BACKOFF:
            r.set_expected(await self._bidders(r.call))
        effects = r.tick(self.agent.now_ms())
        if effects:
            await self._step(r, effects)
        else:
            self.agent.set_timer_ms(f"req:{conversation_id}", r.deadline, lambda: self._tick(conversation_id))

    async def _bidders(self, call: StepCall) -> frozenset[str]:
        found: frozenset[str] = frozenset()
        for capability in call.capabilities:
            found |= await self.agent.node.directory.bidders(capability)
        return found

    def _persist(self, r: Requester) -> None:
        self.agent.node.journal.put(
            ConversationRecord,
            {
                "agent": self.agent.name,
                "key": r.conversation_id,
                "role": "requester",
                "conversation_id": r.conversation_id,
                "state": r.state.value,
                "terminal": r.done,
                "snapshot": orjson.dumps(r.snapshot()).decode(),
                "updated_sim": self.agent.now(),
            },
        )

    async def recover(self) -> None:
        for row in self.agent.node.state.conversations(self.agent.name, "requester"):
            r = Requester.restore(json.loads(row.snapshot), self.policy, ids=new_id)
            self.machines[r.conversation_id] = r
            self._recovered.append(r.conversation_id)

    async def on_start(self) -> None:
        """Resume every open procedure at once: a due deadline re-bids, asks the winner, or calls again."""
        now = self.agent.now_ms()
        recovered, self._recovered = self._recovered, []
        for r in (self.machines[c] for c in recovered):
            if not r.done:
                r.resume(now)  # every deadline due now; a restart is not the provider's fault
                conv = r.conversation_id
                self.agent.set_timer_ms(f"req:{conv}", now, lambda conv=conv: self._tick(conv))

    async def settle(self, r: Requester) -> None:
        """End a procedure whose step the product's documentation records as completed."""
        await self._step(r, r.documented(self.agent.now_ms()))

    def open_for_step(self, step: int) -> Requester | None:
        for r in self.machines.values():
            if r.call.step == step and not r.done:
                return r
        return None
