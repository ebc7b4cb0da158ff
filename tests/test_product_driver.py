"""The manufacturing driver opens one bidding procedure per step, however many triggers meet.

A restarted product's on_start and a replayed inform of its previous step may both ask it to go
on at once; the call for the next step waits for the registry (who offers the capability?)
before its conversation exists. Both used to open one, and two resources executed the step
(found by the chaos test). The registry's latency is the one thing replaced here.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from sqlmodel import select

from agents.aas import build as b
from agents.aas import docjson
from agents.aas.ids import submodel_id
from agents.aas.io import to_json
from agents.bidding.requester_role import BiddingRequester
from agents.persistence import open_database
from agents.persistence.database import sqlite_url
from agents.persistence.tables import ConversationRecord, OutboxRecord
from agents.product.agent import ProductAgent, build_shell
from agents.product.documentation import Documentation
from agents.product.driver import ManufacturingDriver
from agents.product.notifier import Notifier
from agents.product.order import PlannedStep, ProductOrder
from agents.runtime.directory import Entry
from agents.runtime.node import Node, NodeConfig
from protocol.bidding.effects import Awarded, Completed, Scheduled
from protocol.bidding.requester import Requester, RequesterConfig, RState
from protocol.elements import Bid, Booking, Reason, StepCall, StepResult
from protocol.frame import MessageType, make_message
from protocol.frame import Role as FrameRole
from protocol.selection import Offer, Ranked
from protocol.transport import BrokerAddress
from shopfloor.clock import make_clock

#: the product row of a running product (what order intake stored)
STORED = {
    "aas_id": "urn:p1",
    "product_type": "pin",
    "priority": 1,
    "release": 0.0,
    "accepted_sim": 0.0,
    "reason": "",
}


class SlowRegistry(BiddingRequester):
    async def _bidders(self, call):  # type: ignore[override]
        await asyncio.sleep(0.01)  # a registry lookup over HTTP
        return frozenset({"urn:lathe-1"})


def product(
    tmp_path: Path, record: dict, requester_role: type[BiddingRequester] = SlowRegistry
) -> tuple[ProductAgent, ManufacturingDriver, BiddingRequester]:
    """A product twin with its roles and AAS, on a real node that is never started (nothing connects)."""
    db = open_database(sqlite_url(tmp_path / "run.db"))
    node = Node(NodeConfig("t", BrokerAddress("127.0.0.1", 1)), make_clock("virtual"), db)
    order = ProductOrder("p1", "pin", 1, 0.0, (PlannedStep(1, "turning"), PlannedStep(2, "milling")))
    shell, *submodels = build_shell(order, "t")
    agent = ProductAgent(node, "p1", shell.id)
    node.store.put_shell(shell, owner="p1")
    for obj in submodels:
        node.store.put_submodel(obj, owner="p1")
    docs = Documentation(node.store, node.journal, "p1", submodel_id("p1", "ProcessDocumentation", "t"))
    driver = ManufacturingDriver(order, {"product": "p1", "location": "", "ready_at": 0.0, **record}, docs)
    requester = requester_role(RequesterConfig(), driver, None)
    for role in (Notifier(), driver, requester):
        agent.add_role(role)
    return agent, driver, requester


async def test_concurrent_advances_open_one_procedure_per_step(tmp_path: Path) -> None:
    agent, driver, requester = product(tmp_path, {"status": "accepted"})

    await asyncio.gather(driver.advance(), driver.advance(), driver.advance())

    assert [r.call.step for r in requester.machines.values()] == [1]
    await driver.advance()  # still one: the open procedure is found
    assert len(requester.machines) == 1
    agent.cancel_timers()
    agent.node.db.dispose()


async def test_a_step_documented_as_completed_is_done_though_its_inform_was_lost(tmp_path: Path) -> None:
    """The resource documented the step in the product's AAS, then its inform was lost with a
    crash; the product goes on from its documentation, and its step row follows the record."""
    agent, driver, requester = product(tmp_path, {"status": "running"})
    driver.docs.merge(1, docjson.step_record(b.StepRecord(1, "turning", outcome="scheduled")), "p1")
    driver._save_step(1, status="scheduled", resource="lathe-1")
    driver.docs.merge(1, docjson.completion(1, 3.0, 8.5, "lathe-1"), "resource")

    await driver.advance()

    row = driver.steps[1]
    assert (row["status"], row["started"], row["finished"], row["resource"]) == ("done", 3.0, 8.5, "lathe-1")
    assert [r.call.step for r in requester.machines.values()] == [2]  # and it went on
    agent.cancel_timers()
    agent.node.db.dispose()


async def test_a_procedure_whose_step_is_documented_ends_instead_of_bidding_again(tmp_path: Path) -> None:
    """Step 1 awarded, its confirmation and inform lost, the resource silent; the step is in the
    documentation. When the award's deadline comes the procedure ends (it used to re-send the
    acceptance and then bid the step again: a second execution) and the product goes on."""
    agent, driver, requester = product(tmp_path, {"status": "running"})
    await driver.advance()
    (r,) = requester.machines.values()
    r.state, r.deadline = RState.AWARDING, agent.now_ms()
    r.winner = Offer(
        "prop-1", "urn:lathe-1", Bid("lathe-1", "turning", 0.0, 8.5, 5.5, 0.0, 0.0, 1.0, 60.0, "")
    )
    r.accept_id = "acc-1"
    driver.docs.merge(1, docjson.completion(1, 3.0, 8.5, "lathe-1"), "resource")

    await requester._tick(r.conversation_id)

    assert r.state is RState.DONE and r.settled
    assert driver.steps[1]["status"] == "done"
    assert [x.call.step for x in requester.machines.values() if not x.done] == [2]  # went on
    assert agent.counters["note:documented"] == 1
    agent.cancel_timers()
    agent.node.db.dispose()


async def test_a_late_re_confirmation_does_not_undo_a_done_step(tmp_path: Path) -> None:
    """Found by the chaos soak: a restarted product asked a restarted resource where step 5 stood;
    the resource, which had not yet recorded the step as finished, re-confirmed the booking, and
    the product's step row went back from 'done' to 'scheduled' (and its record's outcome too)."""
    agent, driver, _ = product(tmp_path, {"status": "running"})
    driver.docs.merge(1, docjson.step_record(b.StepRecord(1, "turning", outcome="scheduled")), "p1")
    driver._save_step(1, status="scheduled", resource="lathe-1")  # the award the record agrees with
    driver.docs.merge(1, docjson.completion(1, 3.0, 8.5, "lathe-1"), "resource")
    await driver.advance()  # done, from its documentation
    late = Requester(
        "urn:p1", "conv-1", StepCall("p1", 1, "turning", "", 0.0), frozenset(), RequesterConfig()
    )

    await driver.on_outcome(late, Scheduled("urn:lathe-1", Booking("lathe-1", 9.0, 14.5)))

    row = driver.steps[1]
    assert (row["status"], row["started"], row["finished"]) == ("done", 3.0, 8.5)
    assert driver.docs.outcome(1) == "completed"
    assert agent.counters["after-done"] == 1
    agent.cancel_timers()
    agent.node.db.dispose()


async def test_the_award_is_durable_before_the_acceptance_goes_out(tmp_path: Path) -> None:
    """Found by the chaos soak: the bids and the winner were documented in memory only, to be
    mirrored with the booking; with a step that takes no time the resource documents the finish
    first and the booking is then not documented, so a product killed in between came back with
    a step record holding only the resource's part. Now the award is in the same commit as the
    acceptance, and a restarted product's record is whole."""
    agent, driver, requester = product(tmp_path, {"status": "running", **STORED, "shell": "{}"})
    await driver.advance()
    (r,) = requester.machines.values()
    offer = Offer("prop-1", "urn:lathe-1", Bid("lathe-1", "turning", 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 60.0, ""))
    await driver.on_outcome(r, Awarded(1, (Ranked(offer, 0.0, "earliest completion"),)))
    agent.node.journal.start()
    await agent.node.journal.close()  # what the acceptance's commit makes durable
    agent.cancel_timers()
    agent.node.db.dispose()

    again, restarted, _ = product(tmp_path, {"status": "running"})  # a new process, the same database
    restarted.docs.restore(again.node.state.documentation("p1"))
    restarted.docs.merge(1, docjson.completion(1, 0.0, 0.0, "lathe-1"), "resource")  # the resource's PATCH

    doc = again.node.store.get_submodel(submodel_id("p1", "ProcessDocumentation", "t"))
    (record,) = b.read_step_records(doc)
    assert (record.index, record.outcome, record.winner) == (1, "completed", "lathe-1")
    assert [bid.resource for bid in record.bids] == ["lathe-1"]
    again.cancel_timers()
    again.node.db.dispose()


class TwoLathes(BiddingRequester):
    async def _bidders(self, call):  # type: ignore[override]
        return frozenset({"urn:lathe-1", "urn:lathe-2"})


async def test_a_bid_is_recorded_with_the_round_that_it_closes(tmp_path: Path) -> None:
    """A bid that neither closes the round nor is answered gets no record of its own (k records of
    a growing bid list per step were a tenth of the journal's rows); the bid that closes the round
    is recorded with every bid, the winner and the acceptance, in one commit."""
    agent, driver, two = product(tmp_path, {"status": "running", **STORED, "shell": "{}"}, TwoLathes)
    node = agent.node
    for name in ("lathe-1", "lathe-2"):
        node.directory.add(Entry(name, f"urn:{name}", None))
    node.journal.start()
    await driver.advance()
    (r,) = two.machines.values()

    def bid(name: str, completion: float) -> object:
        return make_message(
            MessageType.PROPOSAL,
            sender=f"urn:{name}",
            sender_role=FrameRole.PROVIDER,
            conversation_id=r.conversation_id,
            receiver=agent.aas_id,
            receiver_role=FrameRole.REQUESTER,
            in_reply_to=r.cfp_id,
            reply_by=agent.now_ms() + 60_000,
            elements=Bid(name, "turning", 0.0, completion, 1.0, 0.0, 0.0, 1.0, 60.0, "").to_json_elements(),
        )

    def record() -> tuple[str, list[str], str | None]:
        with node.db.session() as s:
            row = s.get(ConversationRecord, ("p1", r.conversation_id))
            snapshot = json.loads(row.snapshot)
            winner = snapshot["winner"][1] if snapshot["winner"] else None
            return row.state, [o[1] for o in snapshot["offers"]], winner

    def sent() -> list[str]:
        with node.db.session() as s:
            return [row.type for row in s.exec(select(OutboxRecord).order_by(OutboxRecord.seq))]

    await two.handle(bid("lathe-2", 3.0), None)
    await node.journal.commit()
    assert r.state is RState.COLLECTING and len(r.offers) == 1
    assert record() == ("collecting", [], None)  # the call's record: nothing was decided

    await two.handle(bid("lathe-1", 2.0), None)  # every expected bidder answered: the round closes
    await node.journal.commit()
    assert record() == ("awarding", ["urn:lathe-2", "urn:lathe-1"], "urn:lathe-1")
    # the runner-up stays open until the winner confirms (docs/protocol.md)
    assert sent() == ["callForProposal", "acceptProposal"]
    assert [x.offer.provider for x in r.reserve] == ["urn:lathe-2"]

    # lathe-1 withdraws before confirming: lathe-2 gets the step in the same round, and the
    # documentation keeps both bids, naming the new winner and why
    refusal = make_message(
        MessageType.REFUSE_PROPOSAL,
        sender="urn:lathe-1",
        sender_role=FrameRole.PROVIDER,
        conversation_id=r.conversation_id,
        receiver=agent.aas_id,
        receiver_role=FrameRole.REQUESTER,
        in_reply_to=r.accept_id,
        elements=Reason("expired", "offer expired").to_json_elements(),
    )
    await two.handle(refusal, None)
    await node.journal.commit()
    assert record() == ("awarding", ["urn:lathe-2", "urn:lathe-1"], "urn:lathe-2") and r.round == 1
    assert sent() == ["callForProposal", "acceptProposal", "acceptProposal"]
    fields = {c["idShort"]: c.get("value") for c in driver.docs.records[1]["value"]}
    assert fields["Winner"] == "lathe-2" and "urn:lathe-1 withdrew" in fields["SelectionReason"]
    assert len(fields["Bids"]) == 2 and fields["Outcome"] == "negotiating"
    assert driver.steps[1]["resource"] == "lathe-2"
    await node.journal.close()
    agent.cancel_timers()
    node.db.dispose()


async def test_a_product_restarted_after_its_end_keeps_its_nameplate(tmp_path: Path) -> None:
    """The Nameplate is added at completion, after the shell was stored; a restart rebuilds it."""
    agent, driver, _ = product(tmp_path, {"status": "completed", "completed_sim": 86400.0})

    await driver.on_start()

    store, nameplate_id = agent.node.store, submodel_id("p1", "Nameplate", "t")
    nameplate = store.get_submodel(nameplate_id)
    assert nameplate is not None and agent.finished
    assert nameplate_id in {r.get_identifier() for r in store.get_shell(agent.aas_id).submodel}
    # dated by the plant's clock: the virtual clock starts 2026-01-01, completion one day later
    assert "2026-01-02" in to_json(nameplate)
    agent.node.db.dispose()


async def test_an_inform_that_contradicts_the_award_or_the_record_is_not_counted(tmp_path: Path) -> None:
    """Step 1 awarded to lathe-1, which documented it (3.0-8.5). An inform naming another resource,
    or other times, does not agree with award and record: noted, never acted on; the inform that
    agrees completes the step."""
    agent, driver, requester = product(tmp_path, {"status": "running"})
    await driver.advance()
    (r,) = requester.machines.values()
    r.state = RState.CONFIRMED
    r.winner = Offer(
        "prop-1", "urn:lathe-1", Bid("lathe-1", "turning", 0.0, 8.5, 5.5, 0.0, 0.0, 1.0, 60.0, "")
    )
    driver._save_step(1, status="scheduled", resource="lathe-1")
    driver.docs.merge(1, docjson.completion(1, 3.0, 8.5, "lathe-1"), "lathe-1")

    for forged in (StepResult("lathe-2", 3.0, 8.5, "b"), StepResult("lathe-1", 1.0, 8.5, "a")):
        await driver.on_outcome(r, Completed("urn:lathe-1", forged))
    assert agent.counters["note:contradictory-record"] == 2
    assert driver.steps[1]["status"] == "scheduled"
    assert [x.call.step for x in requester.machines.values()] == [1]  # nothing moved on

    await driver.on_outcome(r, Completed("urn:lathe-1", StepResult("lathe-1", 3.0, 8.5, "a")))
    assert driver.steps[1]["status"] == "done"
    assert driver.next_step().index == 2  # (called when the product is ready again, at 8.5)
    agent.cancel_timers()
    agent.node.db.dispose()


async def test_a_completed_record_naming_another_resource_than_the_award_does_not_count(
    tmp_path: Path,
) -> None:
    agent, driver, requester = product(tmp_path, {"status": "running"})
    driver._save_step(1, status="scheduled", resource="lathe-1")
    driver.docs.merge(1, docjson.completion(1, 3.0, 8.5, "lathe-9"), "lathe-9")

    await driver.advance()

    assert not driver.step_completed(1) and driver.steps[1]["status"] != "done"
    assert [r.call.step for r in requester.machines.values()] == [1]  # step 1 is still to do
    agent.cancel_timers()
    agent.node.db.dispose()
