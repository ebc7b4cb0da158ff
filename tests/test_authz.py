"""Who may write what through the AAS API: authenticated agents of the run, authorized by the owner.

Issue 21 finding 1, reproduced on a live plant (real broker with accounts, real AAS HTTP server,
real registry): a stranger on the host PUT a "completed" Step002 and the product skipped the step;
a PATCH rewrote a finished product's Step001 with Resource evil-corp; a resource's own AAS was
writable by anyone. Each write here is made over real HTTP as a stranger (no token), as the wrong
agent (a valid token of another agent), and where it matters as the rightful owner.
"""

from __future__ import annotations

from pathlib import Path

import httpx
from conftest import HAVE_MOSQUITTO
from fuzzing import LivePlant
from sqlmodel import select

from agents.aas import docjson
from agents.aas.build import step_id_short
from agents.aas.ids import submodel_id
from agents.persistence.tables import WorkOrderRecord
from agents.product.driver import ManufacturingDriver
from registry.identifiers import b64url_encode
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
