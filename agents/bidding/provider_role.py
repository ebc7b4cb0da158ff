"""The bidding-provider role: answers calls for proposals with honest, binding offers.

Decision steps, in order: capability check (the asset offers it), feasibility
(the asset can do it now: a full warehouse cannot store), schedule (earliest
start from product arrival, transport, setup and the timeline of holds and
bookings), price (work time x cost rate). The offer holds its slot until it is
accepted, rejected or expires; the protocol machine enforces the rest.

Where the job goes in the resource's queue is `Timeline.place`'s rule: a booked job of a
less urgent priority class that has not started is always overtaken by a more
urgent newcomer (the priority service); within a class a booked job may be
overtaken by a more urgent newcomer unless its product chose this resource among
alternatives (then the promise is firm). Urgency is the queue `rank`: the
product's priority first, then the step's latest on-time end, then the work the product still has
(`remaining_work`, carried in the call) per square root of this step's
processing time — between MWKR (most work remaining) and SPT/TWKR (shortest
processing time over total work remaining), a product with much left to do and
a short step here goes first. Bookings that a newcomer delays are re-confirmed
with their products (a new informConfirm with the new times, see WorkQueue).

On a virtual clock, calls that arrive at the same instant are answered in a
fixed order (priority, urgency, product, step) once the plant is quiet, so a
seeded run gives the same schedule every time.
"""

from __future__ import annotations

import json
import math
from typing import Protocol

import orjson

from agents.persistence.journal import Unstorable
from agents.persistence.tables import ConversationRecord
from agents.resource.timeline import Slot, Timeline
from agents.runtime.role import Role
from protocol.bidding.effects import Book, Count, Effect, Evaluate, Release
from protocol.bidding.provider import Provider, ProviderRounds, PState
from protocol.elements import Bid, Booking, StepCall
from protocol.frame import Message, MessageType, new_id
from protocol.topics import Channel, Topic, cfp_filter
from shopfloor.asset import Asset, Job
from shopfloor.transport import Distances


class WorkOrders(Protocol):
    """Where the provider reports holds and bookings (the resource's work queue)."""

    def held(self, p: Provider, slot: Slot, bid: Bid) -> None: ...
    def booked(self, p: Provider, slot: Slot) -> None: ...
    def released(self, p: Provider, slot: Slot | None, *, booked: bool) -> None: ...
    def frontier(self) -> tuple[float, str | None]: ...

    running: str | None  # the key of the step the machine is doing

    async def resync(self) -> None: ...


def rank(call: StepCall, duration: float) -> tuple:
    """The queue order of a step (smaller first): priority, step due date, urgency, names.

    The priority is the class (`Timeline`: a more urgent class is never queued behind a less
    urgent one); within a class the step due earlier goes first, then the more urgent: urgency is
    sqrt(processing time) / remaining work, remaining work counting this step — the product with
    most work left per unit of this machine's (square-rooted) time goes first.
    """
    remaining = max(call.remaining_work, duration, 1e-9)
    urgency = math.sqrt(max(duration, 0.0)) / remaining
    return (call.priority, call.latest_end(duration), round(urgency, 12), -remaining, call.product, call.step)


def job_id(product: str, step: int) -> str:
    return f"{product}/{step}"


class BiddingProvider(Role):
    def __init__(
        self,
        asset: Asset,
        timeline: Timeline,
        *,
        distances: Distances,
        cost_rates: dict[str, float] | None = None,
        validity: float = 10.0,
        orders: WorkOrders,
    ) -> None:
        self.asset = asset
        self.timeline = timeline
        self.distances = distances
        self.cost_rates = cost_rates or {}
        self.validity = validity
        self.rounds = ProviderRounds()
        self.orders = orders

    def topic_filters(self) -> list[str]:
        return [cfp_filter(self.agent.node.ns, c) for c in sorted(self.asset.capabilities())]

    def accepts(self, msg: Message, topic: Topic) -> bool:
        return topic.channel is Channel.CFP or self.rounds.route(msg) is not None

    async def handle(self, msg: Message, topic: Topic) -> None:
        now_ms = self.agent.now_ms()
        existing = self.rounds.route(msg)
        if existing is not None:
            effects = existing.receive(msg, now_ms)
            if all(isinstance(e, Count) for e in effects):  # a further copy: nothing changed
                await self.agent.carry_out(effects)
                return
            await self._apply(existing, effects)
            return
        if msg.type is not MessageType.CALL_FOR_PROPOSAL:
            return
        p, effects = Provider.on_call(self.agent.aas_id, msg, now_ms, caller=topic.sender, ids=new_id)
        if p is None:
            await self.agent.carry_out(effects)
            return
        self.rounds.add(p)
        if not any(isinstance(e, Evaluate) for e in effects):
            await self._apply(p, effects)
            return
        rest = [e for e in effects if not isinstance(e, Evaluate)]
        virtual = self.agent.clock.kind == "virtual"
        if rest or virtual:
            # (Answered at once and with nothing else to do, the call gets one record, the
            # proposal's: a crash before it sent nothing, and the product's round goes on without.)
            await self._apply(p, rest)
        if virtual:
            c = p.call
            # "~eval" sorts after every agent's own timers ((name, key)): products that deferred
            # their call to this instant have called again before any call of it is answered.
            if await self._had_alternatives(c):
                # Firm bookings are never re-queued, so the answer order is their queue order:
                # priority, then most work remaining first (MWKR), then by name.
                order = ("~eval", c.priority, -c.remaining_work, c.product, c.step, p.cfp_id)
            else:
                # Queue-rank order (priority, urgency, name): the more urgent are queued first and
                # rarely overtake.
                order = ("~eval", *self._call_rank(c), p.cfp_id)
            self.agent.clock.call_at(self.agent.now(), lambda: self._evaluate(p), order=order)
        else:
            await self._evaluate(p)

    async def _evaluate(self, p: Provider) -> None:
        if p.state is not PState.EVALUATING:
            return
        firm = await self._had_alternatives(p.call)  # may ask the registry
        if p.state is not PState.EVALUATING:
            return  # the round moved on while we waited (cancelled, expired): nothing to offer
        now, now_ms = self.agent.now(), self.agent.now_ms()
        call = p.call
        capability = next((c for c in call.capabilities if c in self.asset.capabilities()), None)
        if capability is None:
            text = f"none of {call.capabilities} is offered here"
            return await self._apply(p, p.refuse("capability", text, now_ms))
        job = Job(job_id(call.product, call.step), capability, dict(call.parameters), call.product)
        transport = self.distances.travel_time(call.location, self.asset.location)
        ready = max(now, call.release + transport, self.asset.available_from(now))
        # Setup as after a job of another capability; `place` drops it behind the same capability.
        estimate = self.asset.estimate(job, previous_capability=None)
        if estimate is None:
            return await self._apply(
                p, p.refuse("infeasible", f"{self.asset.name} cannot do {job.job_id} now", now_ms)
            )
        duration = estimate.duration
        slot = Slot(
            p.cfp_id,
            job.job_id,
            capability,
            ready,
            ready,
            ready + estimate.total,
            estimate.setup,
            duration=duration,
            setup_change=estimate.setup,
            rank=rank(call, duration),
            firm=firm,
            due=call.latest_end(duration),
        )
        base, previous = self.orders.frontier()
        index, (start, end, setup) = self.timeline.place(slot, base, previous)
        slot.start, slot.end, slot.setup = start, end, setup
        slot.ahead = self.timeline.ahead_of(index, self.orders.running)
        if not self.asset.reserve(job):
            return await self._apply(
                p, p.refuse("capacity", f"{self.asset.name} has no room for {job.job_id}", now_ms)
            )
        rate = self.cost_rates.get(capability, self.asset.cost_rate)
        valid_until = now + self.validity
        if p.reply_by is not None:
            valid_until = max(valid_until, self.agent.clock.from_epoch_ms(p.reply_by) + self.validity)
        bid = Bid(
            resource=self.agent.name,
            capability=capability,
            earliest_start=start,
            completion=end,
            duration=duration,
            setup=setup,
            transport=transport,
            price=round((setup + duration) * rate, 6),
            valid_until=valid_until,
            location=self.asset.location,
        )
        # The hold's row is staged before the hold exists in memory: a row the journal refuses
        # (Unstorable) leaves no hold behind that nothing would ever release.
        try:
            self.orders.held(p, slot, bid)
        except Unstorable as exc:
            self.asset.release(job)
            return await self._apply(p, p.refuse("unstorable", str(exc), now_ms))
        self.timeline.hold(slot, index)
        await self._apply(p, p.propose(bid, self.agent.clock.epoch_ms(valid_until), now_ms))

    def _call_rank(self, call: StepCall) -> tuple:
        capability = next((c for c in call.capabilities if c in self.asset.capabilities()), None)
        job = Job(job_id(call.product, call.step), capability or "", dict(call.parameters), call.product)
        estimate = self.asset.estimate(job, previous_capability=None) if capability else None
        return rank(call, estimate.duration if estimate else 0.0)

    async def _had_alternatives(self, call: StepCall) -> bool:
        """Could the product have gone elsewhere? Then its booking here is firm (never delayed).

        It chose this resource on the promised times; delaying it would void the reason for its
        choice. A product that only this resource can serve loses no choice when re-queued.
        """
        if len(call.capabilities) > 1:
            return True
        try:
            bidders = await self.agent.node.directory.bidders(call.capabilities[0])
        except Exception:  # registry unreachable: assume the product had a choice (keep promises)
            return True
        return bool(bidders - {self.agent.aas_id})

    async def _apply(self, p: Provider, effects: list[Effect]) -> None:
        changed = False
        for e in effects:
            match e:
                case Book():
                    slot = self.timeline.book(p.cfp_id)
                    if slot:
                        self.orders.booked(p, slot)
                        changed = True
                case Release(booked=booked):
                    slot = self.timeline.release(p.cfp_id)
                    cap = slot.capability if slot else p.call.capability
                    self.asset.release(Job(job_id(p.call.product, p.call.step), cap, {}, p.call.product))
                    self.orders.released(p, slot, booked=booked)
                    changed = slot is not None
        self.persist(p)
        await self.agent.carry_out(effects)
        self.rounds.index(p)
        key = p.cfp_id
        self.agent.set_timer_ms(f"offer:{key}", p.deadline, lambda: self._tick(key))
        if changed:
            await self.orders.resync()  # bookings the change moved are re-confirmed with their products

    async def reschedule(self, p: Provider, start: float, end: float) -> None:
        """Tell the product of a booking that its times moved (a new informConfirm)."""
        if p.state is PState.BOOKED:
            await self._apply(p, p.reschedule(Booking(self.agent.name, start, end), self.agent.now_ms()))

    async def _tick(self, key: str) -> None:
        p = self.rounds.by_cfp.get(key)
        if p is not None:
            await self._apply(p, p.tick(self.agent.now_ms()))

    async def complete_or_fail(self, p: Provider, effects: list[Effect]) -> None:
        """Send the result of a booked step (called by the work queue)."""
        await self._apply(p, effects)

    def persist(self, p: Provider) -> None:
        self.agent.node.journal.put(
            ConversationRecord,
            {
                "agent": self.agent.name,
                "key": p.cfp_id,
                "role": "provider",
                "conversation_id": p.conversation_id,
                "state": p.state.value,
                "terminal": p.done,
                "snapshot": orjson.dumps(p.snapshot()).decode(),
                "updated_sim": self.agent.now(),
            },
        )

    async def recover(self) -> None:
        for row in self.agent.node.state.conversations(self.agent.name, "provider"):
            self.rounds.add(Provider.restore(json.loads(row.snapshot), ids=new_id))

    async def on_start(self) -> None:
        """Re-arm the deadlines of open offers; an offer that lapsed while we were down is released."""
        for p in self.rounds:
            if p.state is PState.EVALUATING:
                await self._evaluate(p)  # the call arrived but was not answered before the crash
            elif p.deadline is not None:
                key = p.cfp_id
                self.agent.set_timer_ms(f"offer:{key}", p.deadline, lambda key=key: self._tick(key))
