"""Assembling a product twin: its AAS, its roles, and its state after a restart.

Order taking happens here: the vendor's shell (or one built from the order) is
extended with the Order, ProcessPlan and ProcessDocumentation submodels, put on
the process's AAS server and registered. A restarted product reloads the same
shell from the run database and replays its documentation into it.
"""

from __future__ import annotations

from basyx.aas import model

from agents.aas import build, record_chain
from agents.aas.ids import asset_id, shell_id, submodel_id
from agents.aas.io import environment_json, read_json, to_jsonable
from agents.aas.store import WriteKind, WriteRejected, WriteRequest
from agents.bidding.requester_role import BiddingRequester
from agents.persistence.tables import ProductRecord
from agents.product import documentation
from agents.product.driver import ManufacturingDriver
from agents.product.notifier import Notifier
from agents.product.order import ProductOrder
from agents.runtime.agent import Agent
from agents.runtime.node import Node
from protocol import signing
from protocol.bidding.effects import Note
from protocol.bidding.requester import RequesterConfig
from protocol.selection import DEFAULT_POLICY, SelectionPolicy, make_policy


class ProductAgent(Agent):
    kind = "product"


def build_shell(order: ProductOrder, ns: str) -> list[model.Identifiable]:
    name = order.name
    order_sm = build.order(
        submodel_id(name, "Order", ns),
        order_id=name,
        product_type=order.product_type,
        priority=order.priority,
        notification_endpoint=order.notify_url,
        due_date=order.due,
        release_time=order.release,
        customization=order.customization or None,
        vendor=order.vendor,
    )
    plan_sm = build.process_plan(
        submodel_id(name, "ProcessPlan", ns),
        [build.PlanStep(s.index, s.capability, s.alternatives, s.parameters) for s in order.steps],
    )
    doc_sm = build.process_documentation(submodel_id(name, "ProcessDocumentation", ns))
    shell = build.shell(
        order.aas_id or shell_id(name, ns),
        name.replace("-", "_") if name[0].isalpha() else "P_" + name.replace("-", "_"),
        global_asset_id=asset_id(name, ns),
        asset_type=order.product_type,
        submodels=[order_sm, plan_sm, doc_sm],
    )
    return [shell, order_sm, plan_sm, doc_sm]


async def start_product(
    node: Node, order: ProductOrder, *, config: RequesterConfig, policy: SelectionPolicy | None = None
) -> ProductAgent:
    ns = node.ns
    row = node.state.product(order.name)
    steps = node.state.steps(order.name)
    if row is None:
        objects = build_shell(order, ns)
        record = {
            "product": order.name,
            "aas_id": objects[0].id,
            "product_type": order.product_type,
            "priority": order.priority,
            "release": order.release,
            "due": order.due,
            "vendor": order.vendor,
            "location": order.location,
            "status": "new",
            "reason": "",
            "accepted_sim": node.clock.now(),
            "completed_sim": None,
            "ready_at": 0.0,
            "selection": order.selection,
            "shell": environment_json(objects),
        }
        node.journal.put(ProductRecord, record)
    else:
        record = row.model_dump()
        objects = list(read_json(record["shell"].encode()).objects)
    # The policy the product was started with, from its record: a restart ranks as before even
    # if the scenario now says otherwise (an explicit ``policy`` argument overrides both).
    policy = policy or make_policy(record.get("selection") or DEFAULT_POLICY)
    agent = ProductAgent(node, order.name, record["aas_id"])
    for obj in objects:
        if isinstance(obj, model.AssetAdministrationShell):
            node.store.put_shell(obj, owner=agent.name)
        else:
            node.store.put_submodel(obj, owner=agent.name)
    docs = documentation.Documentation(
        node.store, node.journal, order.name, submodel_id(order.name, "ProcessDocumentation", ns)
    )
    docs.restore(node.state.documentation(order.name))
    driver = ManufacturingDriver(order, record, docs)
    node.store.set_write_hook(agent.name, _documentation_hook(agent, docs, driver))
    driver.steps = {r.step: r.model_dump() for r in steps}
    agent.add_role(Notifier())
    agent.add_role(driver)
    agent.add_role(BiddingRequester(config, driver, policy))
    submodels = [{"id": o.id, "idShort": o.id_short} for o in objects if isinstance(o, model.Submodel)]
    await node.add_agent(agent, submodels=submodels)
    return agent


def _documentation_hook(agent: ProductAgent, docs: documentation.Documentation, driver: ManufacturingDriver):
    """Resources document their step here: only step records of our documentation, merged, then made durable.

    Only the resource whose award of the step stands writes it, and only its execution
    (documentation.check_execution_write); a refusal is noted (``documentation-refused``) and
    changes nothing. Over HTTP the AAS server has parsed the body with basyx's strict decoder
    (``op.body`` is that JSON); a resource in this process hands over the JSON it built (docjson)
    without an object.
    """

    async def hook(op: WriteRequest) -> None:
        if op.submodel_id != docs.doc_id:
            raise WriteRejected("only the ProcessDocumentation submodel of a product accepts writes", 403)
        if op.kind not in (WriteKind.PATCH, WriteKind.PUT) or not op.path or "." in op.path:
            raise WriteRejected("document a step with PUT or PATCH on its StepNNN record", 400)
        body = (
            op.body if op.body is not None else (to_jsonable(op.element) if op.element is not None else None)
        )
        if (
            not isinstance(body, dict)
            or body.get("modelType") != "SubmodelElementCollection"
            or body.get("idShort") != op.path
        ):
            raise WriteRejected(f"the body must be the {op.path} collection", 400)
        try:
            step = int(op.path.removeprefix("Step"))
        except ValueError:
            raise WriteRejected(f"{op.path!r} is not a step record (StepNNN)", 400) from None
        if step not in driver.plan_steps():
            raise WriteRejected(f"{op.path} is not a step of {agent.name}'s process plan", 404)
        try:
            changes = documentation.check_execution_write(
                step, op.caller, body, driver.awardee(step), docs.records.get(step)
            )
            if changes:
                body = _signed_and_sealed(agent, docs, step, body, op.caller)
        except documentation.Refused as exc:
            agent.note(Note("documentation-refused", f"{op.caller or 'anonymous'}: {exc.text}"))
            raise WriteRejected(exc.text, exc.status) from None
        if changes:
            docs.merge(step, body, op.caller or "resource")
        await docs.journal.commit()  # durable before the resource hears "done"

    return hook


def _signed_and_sealed(
    agent: ProductAgent, docs: documentation.Documentation, step: int, body: dict, caller: str | None
) -> dict:
    """The resource's completion, its signature checked against its key, sealed into our chain.

    A completion not signed by the key of the resource that writes it is refused (403): what the
    product accepts is what anyone can verify offline later (agents/aas/record_chain.py).
    """
    secret = agent.node.signing_secret
    expected = signing.public_key_text(secret, caller or "")
    why = record_chain.signature_problem(docs.product, step, body, expected)
    if why is not None:
        raise documentation.Refused(f"step {step}: {why}", 403)
    previous = record_chain.previous_hash(docs.product, docs.records, step)
    return record_chain.seal_record(secret, docs.product, step, body, previous)
