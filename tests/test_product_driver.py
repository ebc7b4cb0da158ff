"""The manufacturing driver opens one bidding procedure per step, however many triggers meet.

A restarted product's on_start and a replayed inform of its previous step may both ask it to go
on at once; the call for the next step waits for the registry (who offers the capability?)
before its conversation exists. Both used to open one, and two resources executed the step
(found by the chaos test). The registry's latency is the one thing replaced here.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from agents.aas.ids import submodel_id
from agents.aas.io import to_json
from agents.bidding.requester_role import BiddingRequester
from agents.persistence import open_database
from agents.persistence.database import sqlite_url
from agents.product.agent import ProductAgent, build_shell
from agents.product.documentation import Documentation
from agents.product.driver import ManufacturingDriver
from agents.product.notifier import Notifier
from agents.product.order import PlannedStep, ProductOrder
from agents.runtime.node import Node, NodeConfig
from protocol.bidding.requester import RequesterConfig
from protocol.transport import BrokerAddress
from shopfloor.clock import make_clock


class SlowRegistry(BiddingRequester):
    async def _bidders(self, call):  # type: ignore[override]
        await asyncio.sleep(0.01)  # a registry lookup over HTTP
        return frozenset({"urn:lathe-1"})


async def test_concurrent_advances_open_one_procedure_per_step(tmp_path: Path) -> None:
    db = open_database(sqlite_url(tmp_path / "run.db"))
    node = Node(NodeConfig("t", BrokerAddress("127.0.0.1", 1)), make_clock("virtual"), db)
    order = ProductOrder("p1", "pin", 1, 0.0, (PlannedStep(1, "turning"), PlannedStep(2, "milling")))
    objects = build_shell(order, "t")
    agent = ProductAgent(node, "p1", objects[0].id)
    for obj in objects[1:]:
        node.store.put_submodel(obj, owner="p1")
    docs = Documentation(node.store, node.journal, "p1", submodel_id("p1", "ProcessDocumentation", "t"))
    record = {"product": "p1", "location": "", "status": "accepted", "ready_at": 0.0}
    driver = ManufacturingDriver(order, record, docs)
    requester = SlowRegistry(RequesterConfig(), driver, None)
    for role in (Notifier(), driver, requester):
        agent.add_role(role)

    await asyncio.gather(driver.advance(), driver.advance(), driver.advance())

    assert [r.call.step for r in requester.machines.values()] == [1]
    await driver.advance()  # still one: the open procedure is found
    assert len(requester.machines) == 1
    agent.cancel_timers()
    db.dispose()


async def test_a_product_restarted_after_its_end_keeps_its_nameplate(tmp_path: Path) -> None:
    """The Nameplate is added at completion, after the shell was stored; a restart rebuilds it."""
    db = open_database(sqlite_url(tmp_path / "run.db"))
    node = Node(NodeConfig("t", BrokerAddress("127.0.0.1", 1)), make_clock("virtual"), db)
    order = ProductOrder("p1", "pin", 1, 0.0, (PlannedStep(1, "turning"),))
    shell, *submodels = build_shell(order, "t")
    agent = ProductAgent(node, "p1", shell.id)
    node.store.put_shell(shell, owner="p1")
    for obj in submodels:
        node.store.put_submodel(obj, owner="p1")
    docs = Documentation(node.store, node.journal, "p1", submodel_id("p1", "ProcessDocumentation", "t"))
    record = {"product": "p1", "location": "", "status": "completed", "completed_sim": 86400.0}
    driver = ManufacturingDriver(order, record, docs)
    for role in (Notifier(), driver, SlowRegistry(RequesterConfig(), driver, None)):
        agent.add_role(role)

    await driver.on_start()

    nameplate = node.store.get_submodel(submodel_id("p1", "Nameplate", "t"))
    assert nameplate is not None and agent.finished
    assert submodel_id("p1", "Nameplate", "t") in {r.get_identifier() for r in shell.submodel}
    # dated by the plant's clock: the virtual clock starts 2026-01-01, completion one day later
    assert "2026-01-02" in to_json(nameplate)
    db.dispose()
