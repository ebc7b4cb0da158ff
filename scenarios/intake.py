"""Vendor orders into a running plant: the order-taking service in front of a node.

An accepted order (`agents.ordertaking`) becomes a product twin with the plan of its product
type; the vendor's submodels join the twin's AAS, whose shell keeps the vendor's id and
globalAssetId. Progress events of these products go back to the vendor through the service's
webhook outbox. Used by `twinbid run` (when the scenario lists vendors) and `twinbid vendor serve`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import agents.ordertaking.tables  # noqa: F401 - the service's tables are known before the schema is created
from agents.aas import build
from agents.ordertaking import OrderTakingConfig, OrderTakingService
from agents.product.agent import start_product
from agents.runtime.node import Node
from protocol.bidding.requester import RequesterConfig
from scenarios import assembly
from scenarios.schema import ProductInstance, Scenario


class OrderIntake:
    def __init__(
        self,
        scenario: Scenario,
        node: Node,
        requester_config: RequesterConfig,
        *,
        vendors: Any = None,
        registry_url: str | None = None,
        service_config: OrderTakingConfig | None = None,
        outbox: Any = None,
    ) -> None:
        self.scenario = scenario
        self.node = node
        self.requester_config = requester_config
        self.accepted: set[str] = set()  # product names of the vendor orders taken so far
        self.service = OrderTakingService(
            node.db,
            vendors if vendors is not None else scenario.vendors,
            {pt.name: pt for pt in scenario.product_types},
            self.take_order,
            outbox=outbox,
            registry_url=registry_url,
            tokens=node.tokens,
            clock=node.clock,
            config=service_config or OrderTakingConfig(namespace=scenario.namespace),
        )
        node.event_hooks.append(self.service.on_node_event)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        return await self.service.start(host, port)

    async def stop(self) -> None:
        await self.service.stop()

    async def take_order(self, accepted: Any) -> None:
        """`on_order`: start (or, after a restart, resume) the product twin of an accepted order."""
        node = self.node
        self.accepted.add(accepted.product)
        if accepted.product in node.agents:
            return
        pt = accepted.plan
        instance = ProductInstance(
            name=accepted.product,
            type=pt.name,
            order=-1,
            priority=accepted.priority,
            release=node.clock.now(),
            due=accepted.due,
            plan=tuple(pt.plan),
            vendor=accepted.vendor,
            location=None,
        )
        order = dataclasses.replace(
            assembly.product_order(self.scenario, instance),
            notify_url=accepted.notify_url,
            customization=dict(accepted.customization),
            aas_id=accepted.aas_id,
        )
        agent = await start_product(node, order, config=self.requester_config)
        store = node.store
        shell = store.get_shell(agent.aas_id)
        for sm in accepted.submodels:
            if store.get_submodel(sm.id) is None:
                store.put_submodel(sm, owner=agent.name)
        if shell is not None:
            build.link(shell, *accepted.submodels)
            if accepted.global_asset_id:
                shell.asset_information.global_asset_id = accepted.global_asset_id
            store.changed(shell.id)
