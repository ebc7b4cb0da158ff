"""Hostile calls for proposals from insiders, against a live plant on a real mosquitto.

An insider holds a valid account and publishes only on topics the broker allows it; what it lies
about is the content: a call naming another product (issue 21, finding 2), numbers that no
database column or schedule can hold (finding 3), and a thousand copies of one call (finding 8).
Each attack is followed by the invariants that matter: nothing booked or executed for it, no step
executed twice, and the plant finishes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from conftest import HAVE_MOSQUITTO
from fuzzing import Insider, LivePlant
from sqlmodel import select

from agents.persistence.tables import NoteRecord, WorkOrderRecord
from protocol.bidding.provider import REPLAY_INTERVAL_MS
from protocol.elements import StepCall
from protocol.frame import MessageType, Role, make_message
from scenarios.loader import load_scenario_text

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not HAVE_MOSQUITTO, reason="mosquitto binary not installed"),
]

NS = "hostile"
PLANT = f"""
name: hostile calls
namespace: {NS}
clock: {{kind: accelerated, time_scale: 200}}
transport: {{default_time: 0}}
bidding: {{reply_window: 0.5}}
resources:
  - {{kind: workstation, name: ws-1, location: a, capabilities: [{{name: turning, duration: 2, cost_rate: 1}}]}}
  - {{kind: workstation, name: ws-2, location: b, capabilities: [{{name: turning, duration: 3, cost_rate: 1}}]}}
product_types:
  - {{name: gear, plan: [{{capability: turning}}, {{capability: turning}}]}}
orders:
  - {{type: gear, quantity: 2, priority: 1, release: 1, interval: 1}}
"""


def work_orders(plant: LivePlant) -> list[WorkOrderRecord]:
    assert plant.node is not None
    with plant.node.db.session() as s:
        return list(s.exec(select(WorkOrderRecord)).all())


def notes(plant: LivePlant, kind: str) -> list[NoteRecord]:
    assert plant.node is not None
    with plant.node.db.session() as s:
        return list(s.exec(select(NoteRecord).where(NoteRecord.kind == kind)).all())


def call_for(product: str, step: int, **extra: Any) -> list[dict[str, Any]]:
    fields: dict[str, Any] = {"capability": "turning", "location": "a", "release": 0.0, **extra}
    return StepCall(product=product, step=step, **fields).to_json_elements()


def executed_once(plant: LivePlant) -> None:
    """Every step of every product was executed exactly once, and nothing else was."""
    done = sorted((o.product, o.step) for o in work_orders(plant) if o.state in ("running", "done"))
    assert done == sorted((p, s) for p in plant.products for s in (1, 2)), done
    stuck = [o.job_id for o in work_orders(plant) if o.state in ("held", "booked", "running")]
    assert stuck == [], f"work orders left open: {stuck}"


async def test_a_resource_cannot_order_work_for_a_product(tmp_path: Path) -> None:
    """Finding 2: ws-2, on its own call topic (the ACL allows it), calls for gear-1's step 1 and
    accepts every proposal. The providers refuse the call (its product is not its sender),
    note and count it; nothing is held, booked or executed for it."""
    async with LivePlant(load_scenario_text(PLANT), tmp_path, broker="mosquitto", clock="accelerated",
                         time_scale=200) as plant:  # fmt: skip
        await plant.until_done(90)
        before = {(o.resource, o.job_id) for o in work_orders(plant)}
        async with Insider(plant, "ws-2") as thief:
            call = await thief.call("turning", call_for("gear-1", 1))
            accepted = await thief.accept_proposals([call], wait=3.0)
            refusals = [m for m in thief.inbox if m.in_reply_to == call.id]
        assert accepted == [], "a provider bid on a call that its named product did not send"
        assert {m.type for m in refusals} <= {MessageType.NOT_UNDERSTOOD, MessageType.REFUSE_PROPOSAL}
        await asyncio.sleep(1.0)  # anything booked would be running by now (2 units at 200 ms/unit)
        new = [(o.resource, o.job_id, o.state) for o in work_orders(plant)
               if (o.resource, o.job_id) not in before]  # fmt: skip
        assert new == [], f"the call made work orders: {new}"
        executed_once(plant)
        refused = notes(plant, "wrong-product")
        assert {n.agent for n in refused} >= {"ws-1"}, [(n.agent, n.detail) for n in refused]
        assert all("gear-1" in n.detail and "ws-2" in n.detail for n in refused)
        assert plant.agent("ws-1").counters["note:wrong-product"] == 1


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [("step", 10**30, "does not fit a 64-bit integer"), ("step", -7, "outside 1.."),
     ("release", 1e308, "outside 0..1e+12")],
)  # fmt: skip
async def test_hostile_numbers_in_a_valid_call_are_refused(
    tmp_path: Path, field: str, value: float, says: str
) -> None:
    """Finding 3: gear-1's own account, while the plant runs, calls for a step with a number no
    column or schedule can hold, and accepts whatever is offered. The call is refused when read
    (notUnderstood naming the field), nothing reaches a schedule or the journal, and the plant
    finishes with every step executed once."""
    async with LivePlant(load_scenario_text(PLANT), tmp_path, broker="mosquitto", clock="accelerated",
                         time_scale=200) as plant:  # fmt: skip
        assert plant.node is not None
        async with Insider(plant, "gear-1") as thief:
            fields = {"step": 1, field: value}
            call = await thief.call("turning", call_for("gear-1", **fields))
            accepted = await thief.accept_proposals([call], wait=3.0)
            answers = [m for m in thief.inbox if m.in_reply_to == call.id]
        assert accepted == [], "a provider bid on a call with an impossible number"
        assert answers and {m.type for m in answers} == {MessageType.NOT_UNDERSTOOD}
        await plant.until_done(90)
        executed_once(plant)
        assert plant.node.journal.failed is None
        refused = [n.detail for n in notes(plant, "not-understood") if call.id in n.detail]
        assert len(refused) == 2 and all(f"{field}: " in d and says in d for d in refused), refused


async def test_a_thousand_copies_of_one_call_are_answered_once(tmp_path: Path) -> None:
    """Finding 8: the same call for proposals (one messageId) 1,000 times. Before, each bidder
    re-sent its proposal for every copy (3,000 proposals) and wrote a notes row per copy. Now a
    copy within a second of the first is only counted: each bidder answers once or twice."""
    async with LivePlant(load_scenario_text(PLANT), tmp_path, broker="mosquitto", clock="accelerated",
                         time_scale=200) as plant:  # fmt: skip
        await plant.until_done(90)
        async with Insider(plant, "gear-1") as product:
            call = make_message(
                MessageType.CALL_FOR_PROPOSAL, sender=product.aas_id, sender_role=Role.REQUESTER,
                conversation_id="flood", elements=call_for("gear-1", 2),
            )  # fmt: skip
            began = plant.agent("ws-1").now_ms()
            await product.publish("cfp/turning", call, copies=1000)
            for _ in range(200):
                counted = [plant.agent(r).counters["count:duplicate"] for r in ("ws-1", "ws-2")]
                if (
                    sum(counted) + sum(plant.agent(r).counters["note:duplicate"] for r in ("ws-1", "ws-2"))
                    >= 1998
                ):
                    break
                await asyncio.sleep(0.05)
            took = plant.agent("ws-1").now_ms() - began  # simulated ms the flood lasted
            await asyncio.sleep(0.5)
            answers = [m.sender for m in product.inbox if m.in_reply_to == call.id]
        by_bidder = {plant.agent(r).aas_id: r for r in ("ws-1", "ws-2")}
        per_bidder = {by_bidder[s]: answers.count(s) for s in set(answers)}
        # the first answer, then at most one replay per REPLAY_INTERVAL_MS of the flood
        bound = 2 + took // REPLAY_INTERVAL_MS
        assert set(per_bidder) == {"ws-1", "ws-2"} and max(per_bidder.values()) <= min(bound, 10), (
            per_bidder,
            took,
        )
        for r in ("ws-1", "ws-2"):
            agent = plant.agent(r)
            assert agent.counters["note:duplicate"] + agent.counters["count:duplicate"] == 999
            assert len([n for n in notes(plant, "duplicate") if n.agent == r]) <= min(bound, 10)
        for _ in range(200):  # the unanswered offers lapse after their validity (10 units, 2 s)
            if not any(o.state == "held" for o in work_orders(plant)):
                break
            await asyncio.sleep(0.05)
        executed_once(plant)
