"""Assembling a resource agent (workstation or warehouse): its AAS, its roles, its asset.

The resource's shell carries its nameplate, the capabilities it offers, its
bidding parameters and a live status submodel the work queue keeps current.
"""

from __future__ import annotations

from basyx.aas import model

from agents.aas import build
from agents.aas.ids import asset_id, shell_id, submodel_id
from agents.bidding.provider_role import BiddingProvider
from agents.resource.timeline import Timeline
from agents.resource.work_queue import WorkQueue
from agents.runtime.agent import Agent
from agents.runtime.node import Node
from shopfloor.asset import Asset
from shopfloor.transport import Distances


class ResourceAgent(Agent):
    kind = "resource"

    def __init__(self, node: Node, name: str, aas_id: str, asset: Asset) -> None:
        super().__init__(node, name, aas_id)
        self.asset = asset


def resource_objects(
    asset: Asset, ns: str, kind: str, cost_rates: dict[str, float]
) -> list[model.Identifiable]:
    name = asset.name
    caps = build.capabilities(submodel_id(name, "Capabilities", ns), sorted(asset.capabilities()))
    params = build.bidding_parameters(
        submodel_id(name, "BiddingParameters", ns),
        cost_rate=asset.cost_rate,
        location=asset.location or None,
        capability_rates=dict(cost_rates) or None,
    )
    status = build.status(submodel_id(name, "Status", ns), location=asset.location or None)
    nameplate = build.nameplate(
        submodel_id(name, "Nameplate", ns),
        manufacturer_name="twinbid simulated equipment",
        product_designation=f"{kind} {name}",
        uri_of_product=asset_id(name, ns),
        order_code=name,
        address=build.Address(street="Factory Road 1", zipcode="00000", city="Plant", national_code="DE"),
        serial_number=name,
    )
    shell = build.shell(
        shell_id(name, ns),
        name.replace("-", "_") if name[0].isalpha() else "R_" + name.replace("-", "_"),
        global_asset_id=asset_id(name, ns),
        asset_type=kind,
        submodels=[nameplate, caps, params, status],
    )
    return [shell, nameplate, caps, params, status]


async def start_resource(
    node: Node,
    asset: Asset,
    *,
    kind: str,
    distances: Distances,
    cost_rates: dict[str, float] | None = None,
    validity: float = 10.0,
    breakdown_policy: str = "finish_late",
) -> ResourceAgent:
    objects = resource_objects(asset, node.ns, kind, cost_rates or {})
    agent = ResourceAgent(node, asset.name, objects[0].id, asset)
    for obj in objects:
        if isinstance(obj, model.AssetAdministrationShell):
            node.store.put_shell(obj, owner=agent.name)
        else:
            node.store.put_submodel(obj, owner=agent.name)
    timeline = Timeline()
    queue = WorkQueue(asset, timeline, breakdown_policy=breakdown_policy)
    agent.add_role(queue)
    agent.add_role(
        BiddingProvider(
            asset, timeline, distances=distances, cost_rates=cost_rates, validity=validity, orders=queue
        )
    )
    submodels = [{"id": o.id, "idShort": o.id_short} for o in objects if isinstance(o, model.Submodel)]
    await node.add_agent(agent, capabilities=tuple(sorted(asset.capabilities())), submodels=submodels)
    return agent
