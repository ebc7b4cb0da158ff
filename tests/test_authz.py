"""Who may write what through the AAS API: authenticated agents of the run, authorized by the owner.

Issue 21 finding 1, reproduced on a live plant (real broker with accounts, real AAS HTTP server,
real registry): a stranger on the host PUT a "completed" Step002 and the product skipped the step;
a PATCH rewrote a finished product's Step001 with Resource evil-corp; a resource's own AAS was
writable by anyone, and so were its registry descriptors. Each write here is made over real HTTP as a stranger (no token), as the wrong
agent (a valid token of another agent), and where it matters as the rightful owner.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from conftest import HAVE_MOSQUITTO
from fuzzing import LivePlant
from sqlmodel import select

from agents.aas import build, docjson
from agents.aas.build import step_id_short
from agents.aas.client import AasClient
from agents.aas.ids import submodel_id
from agents.aas.server import AasServer
from agents.aas.store import AasStore
from agents.persistence.tables import WorkOrderRecord
from agents.product.driver import ManufacturingDriver
from agents.runtime.node import Node, NodeConfig
from protocol.tokens import RunTokens, new_secret
from registry.identifiers import b64url_encode
from scenarios.launcher import _start_resources
from scenarios.loader import load_scenario_text

BROKER = "mosquitto" if HAVE_MOSQUITTO else None

THREE_STEPS = """
name: authz
namespace: authz
clock: {kind: accelerated, time_scale: 40}
transport: {default_time: 0}
bidding: {reply_window: 0.3}
resources:
  - {kind: workstation, name: mill-1, location: a, capabilities: [{name: milling, duration: 10, cost_rate: 1}]}
  - {kind: workstation, name: mill-2, location: b, capabilities: [{name: milling, duration: 14, cost_rate: 1}]}
product_types:
  - {name: gear, plan: [{capability: milling}, {capability: milling}, {capability: milling}]}
orders:
  - {type: gear, quantity: 1, priority: 1, release: 1}
"""


def _element_url(plant: LivePlant, owner: str, submodel: str, path: str) -> str:
    sm = b64url_encode(submodel_id(owner, submodel, plant.scenario.namespace))
    return f"{plant.node.base_url}/submodels/{sm}/submodel-elements/{path}"


def _completed(step: int, resource: str) -> dict:
    return docjson.completion(step, 1.0, 2.0, resource)


def _done_orders(plant: LivePlant) -> list[WorkOrderRecord]:
    with plant.node.db.session() as s:
        return list(s.exec(select(WorkOrderRecord).where(WorkOrderRecord.state == "done")).all())


def _assert_refused(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    message = response.json()["messages"][0]
    assert message["messageType"] == "Error" and message["code"] == str(status)


async def test_forged_completed_step_is_refused_and_every_step_is_executed(tmp_path: Path) -> None:
    async with LivePlant(
        load_scenario_text(THREE_STEPS), tmp_path, broker=BROKER, clock="accelerated", time_scale=40
    ) as plant:
        url = _element_url(plant, "gear-1", "ProcessDocumentation", step_id_short(2))
        async with httpx.AsyncClient(timeout=10) as http:
            stranger = await http.put(url, json=_completed(2, "mill-1"))
            _assert_refused(stranger, 401)
            tokens = plant.node.tokens
            # an agent of the run, but not the one step 2 is awarded to (nobody's yet)
            other = await http.put(url, json=_completed(2, "mill-2"), headers=tokens.headers("mill-2"))
            _assert_refused(other, 403)
            # the product itself does not write a resource's execution
            own = await http.put(url, json=_completed(2, "gear-1"), headers=tokens.headers("gear-1"))
            _assert_refused(own, 403)
        await plant.until_done(90)
        product = plant.agent("gear-1")
        assert product.counters["note:documentation-refused"] == 2
        assert plant.node.server.refused["401"] == 1 and plant.node.server.refused["403"] == 2
        # every step executed physically, once, and documented by the resource that executed it
        done = sorted((o.step, o.resource) for o in _done_orders(plant) if o.product == "gear-1")
        assert [s for s, _ in done] == [1, 2, 3]
        docs = product.role(ManufacturingDriver).docs
        for step, resource in done:
            assert docjson.child_text(docs.records[step], "Resource") == resource
            assert docjson.child_text(docs.records[step], "Outcome") == "completed"


async def test_a_finished_record_cannot_be_rewritten_by_anyone(tmp_path: Path) -> None:
    async with LivePlant(
        load_scenario_text(THREE_STEPS), tmp_path, broker=BROKER, clock="accelerated", time_scale=40
    ) as plant:
        await plant.until_done(90)
        docs = plant.agent("gear-1").role(ManufacturingDriver).docs
        before = dict(docs.records)
        executed_by = docjson.child_text(before[1], "Resource")
        url = _element_url(plant, "gear-1", "ProcessDocumentation", step_id_short(1))
        evil = _completed(1, "evil-corp")
        async with httpx.AsyncClient(timeout=10) as http:
            _assert_refused(await http.patch(url, json=evil), 401)
            tokens = plant.node.tokens
            for agent in ("mill-1", "mill-2", "gear-1"):  # the executing resource too: the record is final
                _assert_refused(await http.patch(url, json=evil, headers=tokens.headers(agent)), 409)
            forged = _completed(1, executed_by)  # its own name, other times
            _assert_refused(await http.put(url, json=forged, headers=tokens.headers(executed_by)), 409)
            read = (await http.get(url)).json()  # reads stay open
        assert docs.records == before
        assert next(c["value"] for c in read["value"] if c["idShort"] == "Resource") == executed_by
        assert "evil-corp" not in plant.node.store.submodel_json(docs.doc_id).decode()


async def test_a_resources_own_aas_is_written_by_itself_only(tmp_path: Path) -> None:
    async with LivePlant(
        load_scenario_text(THREE_STEPS), tmp_path, broker=BROKER, clock="accelerated", time_scale=40
    ) as plant:
        store = plant.node.store
        caps_id = submodel_id("mill-1", "Capabilities", plant.scenario.namespace)
        status_id = submodel_id("mill-1", "Status", plant.scenario.namespace)
        caps_before = store.submodel_json(caps_id)
        first = next(iter(store.get_submodel(caps_id).submodel_element)).id_short
        status_first = next(iter(store.get_submodel(status_id).submodel_element))
        async with httpx.AsyncClient(timeout=10) as http:
            delete = _element_url(plant, "mill-1", "Capabilities", first)
            _assert_refused(await http.delete(delete), 401)
            _assert_refused(
                await http.delete(delete, headers={"Authorization": "Bearer forged.token.x"}), 401
            )
            tokens = plant.node.tokens
            for agent in ("mill-2", "gear-1"):
                _assert_refused(await http.delete(delete, headers=tokens.headers(agent)), 403)
            replace = _element_url(plant, "mill-1", "Status", status_first.id_short)
            body = {"modelType": "Property", "idShort": status_first.id_short, "valueType": "xs:string",
                    "value": "hacked"}  # fmt: skip
            _assert_refused(await http.put(replace, json=body, headers=tokens.headers("mill-2")), 403)
            assert store.submodel_json(caps_id) == caps_before
            assert "hacked" not in store.submodel_json(status_id).decode()
            # the owner itself may
            own = await http.delete(delete, headers=tokens.headers("mill-1"))
            assert own.status_code == 204, own.text
        assert store.submodel_json(caps_id) != caps_before


async def test_registry_descriptors_are_written_by_the_agent_they_describe_only(tmp_path: Path) -> None:
    async with LivePlant(
        load_scenario_text(THREE_STEPS), tmp_path, broker=BROKER, clock="accelerated", time_scale=40
    ) as plant:
        mill = plant.agent("mill-1").aas_id
        url = f"{plant.registry_url}/shell-descriptors/{b64url_encode(mill)}"
        async with httpx.AsyncClient(timeout=10) as http:
            genuine = (await http.get(url)).json()  # reads stay open
            endpoint = genuine["endpoints"][0]["protocolInformation"]["href"]
            evil = json.loads(json.dumps(genuine).replace(endpoint, "http://127.0.0.1:9/evil"))
            _assert_refused(await http.put(url, json=evil), 401)
            _assert_refused(await http.delete(url), 401)
            tokens = plant.node.tokens
            for agent in ("mill-2", "gear-1"):
                _assert_refused(await http.put(url, json=evil, headers=tokens.headers(agent)), 403)
                _assert_refused(await http.delete(url, headers=tokens.headers(agent)), 403)
            # re-pointing mill-1's id at another name is refused too, by name and in bulk
            renamed = json.loads(json.dumps(evil).replace('"mill-1"', '"mill-2"'))
            _assert_refused(await http.put(url, json=renamed, headers=tokens.headers("mill-2")), 403)
            bulk = f"{plant.registry_url}/twinbid/bulk/shell-descriptors"
            _assert_refused(await http.put(bulk, json=[evil], headers=tokens.headers("mill-2")), 403)
            assert (await http.get(url)).json() == genuine
        assert plant.registry.refused["401"] == 2 and plant.registry.refused["403"] == 6
        await plant.until_done(90)  # the plant still finds mill-1 where it is


ONE_MILL = """
name: refused
namespace: refused
clock: {kind: accelerated, time_scale: 40}
transport: {default_time: 0}
bidding: {reply_window: 0.3}
resources:
  - {kind: workstation, name: mill-1, location: a, capabilities: [{name: milling, duration: 2, cost_rate: 1}]}
product_types:
  - {name: gear, plan: [{capability: milling}]}
orders:
  - {type: gear, quantity: 1, priority: 1, release: 1}
"""


async def test_a_resource_refused_for_good_stops_documenting_and_hands_the_step_back(tmp_path: Path) -> None:
    """The resource runs in a process of its own whose AAS writes the product's server refuses
    (401: it signs with a secret that is not the run's). It used to retry the write forever, its
    work order `running` and its queue stalled; now it notes the refusal, fails the work order
    and answers informFailure, so the product bids the step again and, refused each time, fails
    it with the reason instead of hanging."""
    sc = load_scenario_text(ONE_MILL)
    async with LivePlant(
        sc, tmp_path, broker=BROKER, clock="accelerated", time_scale=40, start_resources=False
    ) as plant:
        passwords = plant.credentials.passwords if plant.credentials else {}
        config = NodeConfig(
            sc.namespace, plant.broker.address, plant.registry_url, passwords=passwords,
            http_secret=plant.node.tokens._secret,
        )  # fmt: skip
        other = Node(config, plant.node.clock, plant.node.db)
        await other.start()
        try:
            await _start_resources(other, plant.plant, 0, 1)
            other.tokens = RunTokens(new_secret(), sc.namespace)  # its AAS writes: a wrong secret
            await plant.until_done(120)
            mill = other.agents["mill-1"]
            refusals = mill.counters["note:documentation-refused"]
            with plant.node.db.session() as s:
                orders = s.exec(select(WorkOrderRecord).where(WorkOrderRecord.resource == "mill-1")).all()
            assert orders and {o.state for o in orders} == {"failed"}  # none left running
            product = plant.agent("gear-1").role(ManufacturingDriver)
            assert product.record["status"] == "failed"
            assert "failed awards" in product.record["reason"]  # each award executed, refused, handed back
            assert refusals == len(orders) >= 2
            assert plant.node.server.refused["401"] == refusals  # one write each: no retrying
            assert product.docs.outcome(1) != "completed"
        finally:
            await other.stop()


async def test_reads_can_be_closed_too() -> None:
    """Reads are open by default; ``protect_reads`` makes them need a run's token as writes do."""
    tokens = RunTokens(new_secret(), "closed")
    store = AasStore()
    store.add("mill-1", build.shell("urn:mill-1", "Mill1", global_asset_id="urn:asset:mill-1"))
    async with AasServer(store, tokens=tokens, protect_reads=True) as server, httpx.AsyncClient() as http:
        _assert_refused(await http.get(f"{server.base_url}/shells"), 401)
        stranger = {"Authorization": f"Bearer {RunTokens(new_secret(), 'closed').token('mill-1')}"}
        _assert_refused(await http.get(f"{server.base_url}/shells", headers=stranger), 401)
        assert (await http.get(f"{server.base_url}/description")).status_code == 200
        mine = await http.get(f"{server.base_url}/shells", headers=tokens.headers("mill-2"))
        assert mine.status_code == 200 and mine.json()["result"][0]["id"] == "urn:mill-1"
        client = AasClient(server.base_url, token=lambda: tokens.token("mill-2"))
        assert (await client.get_shell("urn:mill-1")).id == "urn:mill-1"
        await client.aclose()
    async with AasServer(store, tokens=tokens) as server, httpx.AsyncClient() as http:
        assert (await http.get(f"{server.base_url}/shells")).status_code == 200  # the default: open
