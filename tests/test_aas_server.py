"""The per-process AAS server over real HTTP (uvicorn in the test's event loop, httpx): every answer is
validated against the official Submodel/AAS Repository OpenAPI files; writes go through the owner's hook;
bad input gets the spec's error body and the server keeps serving."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time

import httpx
import pytest
from basyx.aas import model
from conftest import SPEC_DIR

from agents.aas import build as b
from agents.aas import ids
from agents.aas.client import AasClient, BadRequest, Conflict, NotFound
from agents.aas.server import AasServer
from agents.aas.store import AasStore, WriteKind, WriteRejected, WriteRequest
from agents.aas.verify import verify_objects
from protocol.tokens import RunTokens, new_secret
from registry.conformance import AAS_REPOSITORY, SUBMODEL_REPOSITORY, SpecValidator
from registry.identifiers import b64url_encode as enc


@pytest.fixture(scope="module")
def validator() -> SpecValidator:
    return SpecValidator.load(SPEC_DIR, [SUBMODEL_REPOSITORY, AAS_REPOSITORY])


class World:
    """Two agents in one process: a workstation and a product, served by one AAS server."""

    def __init__(self) -> None:
        self.store = AasStore()
        self.status = b.status(ids.submodel_id("mill-1", "Status"))
        self.caps = b.capabilities(ids.submodel_id("mill-1", "Capabilities"), ["milling", "drilling"])
        self.ops = b.submodel(
            ids.submodel_id("mill-1", "Operations"),
            "Operations",
            "https://twinbid.dev/aas/Ops/1/0",
            [
                b.operation(
                    "EstimateDuration", inputs={"quantity": b.DT.Int}, outputs={"duration": b.DT.Double}
                ),
                b.operation("Sleepy"),
                b.operation("Broken"),
                b.operation("Unbound"),
            ],
        )
        self.mill = b.shell(ids.shell_id("mill-1"), "Mill1", global_asset_id=ids.asset_id("mill-1"))
        self.store.add("mill-1", self.mill, self.status, self.caps, self.ops)
        self.doc = b.process_documentation(ids.submodel_id("gear-7", "ProcessDocumentation"))
        self.order = b.order(
            ids.submodel_id("gear-7", "Order"),
            order_id="o-7",
            product_type="gear",
            priority=2,
            due_date=dt.datetime(2025, 6, 1, tzinfo=dt.UTC),
            customization={"color": "red"},
        )
        self.gear = b.shell(ids.shell_id("gear-7"), "Gear7", global_asset_id=ids.asset_id("gear-7"))
        self.store.add("gear-7", self.gear, self.order, self.doc)
        self.writes: list[WriteRequest] = []

        async def product_hook(op: WriteRequest) -> None:
            # the product twin validates, "persists" (records) and applies its own writes
            if op.kind is WriteKind.DELETE:
                raise WriteRejected("documentation records are never deleted", status=403)
            if op.element is not None and op.element.id_short == "Forbidden":
                raise WriteRejected("not allowed here")
            self.writes.append(op)
            await asyncio.sleep(0)  # the owner may await its own persistence
            self.store.apply(op)

        self.store.set_write_hook("gear-7", product_hook)

        async def estimate(call):
            return [b.prop("duration", call.inputs()["quantity"] * 1.5, b.DT.Double)]

        async def sleepy(call):
            await asyncio.sleep(5)

        async def broken(call):
            raise RuntimeError("spindle jammed")

        self.store.register_operation(self.ops.id, "EstimateDuration", estimate)
        self.store.register_operation(self.ops.id, "Sleepy", sleepy)
        self.store.register_operation(self.ops.id, "Broken", broken)


@pytest.fixture
async def world(validator: SpecValidator):
    w = World()
    w.tokens = RunTokens(new_secret(), "default")
    server = AasServer(w.store, tokens=w.tokens, max_body_bytes=64 * 1024)
    url = await server.start(host="127.0.0.1", port=0)
    # Writes are the workstation's own (its AAS accepts no one else's; the product's hook takes any).
    client = httpx.AsyncClient(
        base_url=url, event_hooks={"response": [validator.hook]}, headers=w.tokens.headers("mill-1")
    )
    w.server, w.http, w.url = server, client, url
    yield w
    await client.aclose()
    await server.stop()


def sm_url(submodel_id: str, rest: str = "") -> str:
    return f"/submodels/{enc(submodel_id)}{rest}"


def assert_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["messages"][0]["messageType"] == "Error"
    assert body["messages"][0]["code"] == str(status)
    assert body["messages"][0]["timestamp"].endswith("Z")


async def test_port_zero_reports_real_port(world: World) -> None:
    assert world.server.port and world.server.port > 0
    assert world.url == f"http://127.0.0.1:{world.server.port}"
    assert (await world.http.get("/description")).json()["profiles"]


async def test_read_routes(world: World) -> None:
    h = world.http
    shells = (await h.get("/shells")).json()
    assert {s["id"] for s in shells["result"]} == {world.mill.id, world.gear.id}
    page1 = (await h.get("/shells", params={"limit": 1})).json()
    assert len(page1["result"]) == 1 and page1["paging_metadata"]["cursor"]
    page2 = (await h.get("/shells", params={"limit": 1, "cursor": page1["paging_metadata"]["cursor"]})).json()
    assert page2["result"][0]["id"] != page1["result"][0]["id"] and page2["paging_metadata"] == {}
    assert (await h.get("/shells", params={"idShort": "Gear7"})).json()["result"][0]["id"] == world.gear.id
    asset = enc(json.dumps({"name": "globalAssetId", "value": world.mill.asset_information.global_asset_id}))
    assert [s["id"] for s in (await h.get("/shells", params={"assetIds": asset})).json()["result"]] == [
        world.mill.id
    ]

    shell = (await h.get(f"/shells/{enc(world.mill.id)}")).json()
    assert shell["assetInformation"]["globalAssetId"] == ids.asset_id("mill-1")
    refs = (await h.get(f"/shells/{enc(world.mill.id)}/submodel-refs")).json()["result"]
    assert {r["keys"][0]["value"] for r in refs} == {world.status.id, world.caps.id, world.ops.id}

    subs = (
        await h.get("/submodels", params={"semanticId": enc("https://twinbid.dev/aas/Status/1/0")})
    ).json()
    assert [s["id"] for s in subs["result"]] == [world.status.id]
    assert len((await h.get("/submodels", params={"limit": 2})).json()["result"]) == 2
    assert len((await h.get("/submodels", params={"level": "core"})).json()["result"]) == 5

    caps = (await h.get(sm_url(world.caps.id))).json()
    assert caps["semanticId"]["keys"][0]["value"].startswith(
        "https://admin-shell.io/idta/CapabilityDescription"
    )
    core = (await h.get(sm_url(world.caps.id), params={"level": "core"})).json()
    assert "value" not in core["submodelElements"][0]
    value = (await h.get(sm_url(world.order.id, "/$value"))).json()
    assert value["Priority"] == 2 and value["Customization"] == {"color": "red"}
    elements = (await h.get(sm_url(world.status.id, "/submodel-elements"), params={"limit": 4})).json()
    assert len(elements["result"]) == 4 and elements["paging_metadata"]["cursor"]
    rest = (
        await h.get(
            sm_url(world.status.id, "/submodel-elements"),
            params={"limit": 4, "cursor": elements["paging_metadata"]["cursor"]},
        )
    ).json()
    assert [e["idShort"] for e in elements["result"] + rest["result"]] == [
        e.id_short for e in world.status.submodel_element
    ]  # model order, across pages
    assert rest["paging_metadata"] == {}
    state = (await h.get(sm_url(world.status.id, "/submodel-elements/State"))).json()
    assert state["value"] == "idle"
    path = "CapabilitySet.millingContainer.milling"
    cap = (await h.get(sm_url(world.caps.id, f"/submodel-elements/{path}"))).json()
    assert cap["modelType"] == "Capability"
    assert (await h.get(sm_url(world.order.id, "/submodel-elements/Priority/$value"))).json() == 2
    assert (await h.get("/openapi.json")).json()["info"]["title"] == "twinbid AAS server"


async def test_writes_go_through_the_owner(world: World) -> None:
    h = world.http
    record = b.step_record_element(b.StepRecord(1, "milling", outcome="scheduled", winner="mill-1"))
    from agents.aas.io import to_jsonable

    body = to_jsonable(record)
    r = await h.put(sm_url(world.doc.id, "/submodel-elements/Step001"), json=body)
    assert r.status_code == 201 and r.headers["location"].endswith("/submodel-elements/Step001")
    assert r.json()["idShort"] == "Step001"
    # PUT is idempotent: same request again -> 204, same state, one element
    r = await h.put(sm_url(world.doc.id, "/submodel-elements/Step001"), json=body)
    assert r.status_code == 204
    assert [e.id_short for e in world.doc.submodel_element] == ["Step001"]
    assert [(w.kind, w.path) for w in world.writes] == [
        (WriteKind.PUT, "Step001"),
        (WriteKind.PUT, "Step001"),
    ]
    assert all(w.owner == "gear-7" for w in world.writes)
    # the server's JSON cache follows the owner's writes
    doc = (await h.get(sm_url(world.doc.id))).json()
    assert [e["idShort"] for e in doc["submodelElements"]] == ["Step001"]

    # PATCH merges: Outcome changes, Winner stays, a new child is added
    patch = {
        "modelType": "SubmodelElementCollection",
        "idShort": "Step001",
        "value": [
            {"modelType": "Property", "idShort": "Outcome", "valueType": "xs:string", "value": "completed"},
            {"modelType": "Property", "idShort": "Finished", "valueType": "xs:double", "value": "42.5"},
        ],
    }
    assert (await h.patch(sm_url(world.doc.id, "/submodel-elements/Step001"), json=patch)).status_code == 204
    (rec,) = b.read_step_records(world.doc)
    assert (rec.outcome, rec.winner, rec.finished) == ("completed", "mill-1", 42.5)

    # POST creates inside a collection; a second POST of the same idShort conflicts
    note = {
        "modelType": "Property",
        "idShort": "OperatorNote",
        "valueType": "xs:string",
        "value": "burr removed",
    }
    r = await h.post(sm_url(world.doc.id, "/submodel-elements/Step001"), json=note)
    assert r.status_code == 201 and r.json()["value"] == "burr removed"
    assert_error(await h.post(sm_url(world.doc.id, "/submodel-elements/Step001"), json=note), 409)
    r = await h.post(sm_url(world.doc.id, "/submodel-elements"), json={**note, "idShort": "Remark"})
    assert r.status_code == 201
    assert_error(
        await h.post(sm_url(world.doc.id, "/submodel-elements"), json={**note, "idShort": "Remark"}), 409
    )

    # the owner may refuse
    assert_error(await h.delete(sm_url(world.doc.id, "/submodel-elements/Remark")), 403)
    assert_error(
        await h.post(sm_url(world.doc.id, "/submodel-elements"), json={**note, "idShort": "Forbidden"}), 400
    )
    assert verify_objects([world.gear, world.order, world.doc]) == []

    # without a hook the store applies directly (default hook)
    r = await h.patch(
        sm_url(world.status.id, "/submodel-elements/QueueLength"),
        json={"modelType": "Property", "idShort": "QueueLength", "valueType": "xs:int", "value": "4"},
    )
    assert r.status_code == 204 and b.element_value(b.child(world.status, "QueueLength")) == 4
    assert (await h.delete(sm_url(world.status.id, "/submodel-elements/Location"))).status_code == 204
    assert_error(await h.get(sm_url(world.status.id, "/submodel-elements/Location")), 404)


async def test_put_keeps_element_order(world: World) -> None:
    before = [e.id_short for e in world.status.submodel_element]
    r = await world.http.put(
        sm_url(world.status.id, "/submodel-elements/State"),
        json={"modelType": "Property", "idShort": "State", "valueType": "xs:string", "value": "busy"},
    )
    assert r.status_code == 204
    assert [e.id_short for e in world.status.submodel_element] == before
    assert (await world.http.get(sm_url(world.status.id, "/$value"))).json()["State"] == "busy"


async def test_invoke(world: World) -> None:
    h = world.http
    arg = {"value": {"modelType": "Property", "idShort": "quantity", "valueType": "xs:int", "value": "4"}}
    r = await h.post(
        sm_url(world.ops.id, "/submodel-elements/EstimateDuration/invoke"), json={"inputArguments": [arg]}
    )
    assert r.status_code == 200
    out = r.json()
    assert out["executionState"] == "Completed" and out["success"] is True
    assert out["outputArguments"][0]["value"]["value"] == "6.0"
    r = await h.post(
        sm_url(world.ops.id, "/submodel-elements/Sleepy/invoke"), json={"clientTimeoutDuration": "PT0.05S"}
    )
    assert r.json()["executionState"] == "Timeout" and r.json()["success"] is False
    r = await h.post(sm_url(world.ops.id, "/submodel-elements/Broken/invoke"), json={})
    assert r.json()["executionState"] == "Failed" and "spindle jammed" in r.json()["messages"][0]["text"]
    assert_error(await h.post(sm_url(world.ops.id, "/submodel-elements/Unbound/invoke"), json={}), 501)
    assert_error(await h.post(sm_url(world.status.id, "/submodel-elements/State/invoke"), json={}), 405)
    assert_error(
        await h.post(
            sm_url(world.ops.id, "/submodel-elements/Sleepy/invoke"), json={"clientTimeoutDuration": "soon"}
        ),
        400,
    )
    assert_error(
        await h.post(
            sm_url(world.ops.id, "/submodel-elements/EstimateDuration/invoke"),
            json={"inputArguments": [{"value": {"idShort": "x"}}]},
        ),
        400,
    )


async def test_bad_input(world: World) -> None:
    h = world.http
    assert_error(await h.get("/shells/not*base64"), 400)
    assert_error(await h.get("/shells/" + enc("urn:unknown")), 404)
    assert_error(await h.get(sm_url("urn:unknown")), 404)
    assert_error(await h.get("/submodels/%C3%28"), 400)
    assert_error(await h.get(sm_url(world.status.id, "/submodel-elements/Nope")), 404)
    assert_error(await h.get(sm_url(world.status.id, "/submodel-elements/1bad")), 400)
    assert_error(await h.get(sm_url(world.status.id, "/submodel-elements/State.Deeper")), 404)
    assert_error(await h.get("/shells", params={"limit": "zero"}), 400)
    assert_error(await h.get("/shells", params={"limit": "0"}), 400)
    assert_error(await h.get("/shells", params={"cursor": "!!"}), 400)
    assert_error(await h.get("/shells", params={"assetIds": enc("not json")}), 400)
    assert_error(await h.get(sm_url(world.status.id), params={"level": "shallow"}), 400)
    url = sm_url(world.status.id, "/submodel-elements/State")
    assert_error(await h.put(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert_error(await h.put(url, json=["a", "list"]), 400)
    assert_error(await h.put(url, json={"modelType": "Property", "idShort": "State"}), 400)  # no valueType
    assert_error(
        await h.put(url, json={"modelType": "Property", "idShort": "Other", "valueType": "xs:string"}), 400
    )
    assert_error(await h.put(url, json={"modelType": "Submodel", "id": "urn:x"}), 400)
    assert_error(
        await h.put(
            sm_url(world.status.id, "/submodel-elements/Missing.Child"),
            json={"modelType": "Property", "idShort": "Child", "valueType": "xs:string"},
        ),
        404,
    )
    assert_error(
        await h.patch(
            sm_url(world.status.id, "/submodel-elements/Missing"),
            json={"modelType": "Property", "idShort": "Missing", "valueType": "xs:string"},
        ),
        404,
    )
    assert_error(
        await h.patch(url, json={"modelType": "Range", "idShort": "State", "valueType": "xs:int"}), 400
    )
    assert_error(
        await h.put(
            url,
            params={"level": "core"},
            json={"modelType": "Property", "idShort": "State", "valueType": "xs:string"},
        ),
        400,
    )
    assert_error(
        await h.post(
            sm_url(world.status.id, "/submodel-elements/State"),
            json={"modelType": "Property", "idShort": "Sub", "valueType": "xs:string"},
        ),
        400,
    )
    assert_error(await h.post(sm_url(world.status.id, "/submodel-elements"), content=b""), 400)
    big = {"modelType": "Property", "idShort": "Big", "valueType": "xs:string", "value": "x" * 100_000}
    assert_error(await h.post(sm_url(world.status.id, "/submodel-elements"), json=big), 413)

    async def chunks():  # no Content-Length: counted while streaming
        for _ in range(20):
            yield b" " * 8192

    assert_error(
        await h.post(
            sm_url(world.status.id, "/submodel-elements"),
            content=chunks(),
            headers={"content-type": "application/json"},
        ),
        413,
    )
    assert_error(await h.get("/no/such/route"), 404)
    assert_error(await h.get("/submodels/$metadata"), 501)
    assert_error(await h.get(sm_url(world.status.id, "/submodel-elements/$value")), 501)
    assert_error(await h.delete("/shells"), 405)
    # ... and the server keeps serving
    assert (await h.get(sm_url(world.status.id, "/submodel-elements/State"))).status_code == 200
    assert b.element_value(b.child(world.status, "State")) == "idle"


async def test_aas_client(world: World) -> None:
    async with AasClient(world.url, token=lambda: world.tokens.token("mill-1")) as client:
        shell = await client.get_shell(world.gear.id)
        assert shell.id == world.gear.id
        assert set(await client.get_submodel_refs(world.gear.id)) == {world.order.id, world.doc.id}
        order = await client.get_submodel(world.order.id)
        assert b.element_value(b.child(order, "Priority")) == 2
        assert (await client.get_submodel_value(world.order.id))["Priority"] == 2
        assert (await client.get_element_value(world.order.id, "Customization.color")) == "red"
        record = b.step_record_element(b.StepRecord(2, "drilling", outcome="scheduled"))
        assert await client.put_element(world.doc.id, "Step002", record) is True
        assert await client.put_element(world.doc.id, "Step002", record) is False
        element = await client.get_element(world.doc.id, "Step002")
        assert isinstance(element, model.SubmodelElementCollection)
        await client.patch_element(world.status.id, "State", b.prop("State", "busy"))
        assert b.element_value(b.child(world.status, "State")) == "busy"
        created = await client.post_element(world.doc.id, b.prop("Note", "hello"), parent_path="Step002")
        assert created.id_short == "Note"
        with pytest.raises(Conflict):
            await client.post_element(world.doc.id, b.prop("Note", "again"), parent_path="Step002")
        with pytest.raises(NotFound):
            await client.get_submodel("urn:nope")
        with pytest.raises(BadRequest):
            await client.put_element(world.status.id, "State", b.prop("Other", "x"))
        result = await client.invoke(world.ops.id, "EstimateDuration", {"quantity": 2})
        assert result.success and result.output_values() == {"duration": 3.0}
        await client.delete_element(world.status.id, "Location")


async def test_client_retries_transient_failures_only() -> None:
    calls = {"n": 0}

    async def flaky(scope, receive, send):
        if scope["type"] != "http":
            return
        calls["n"] += 1
        status, body = (503, b'{"messages":[]}') if calls["n"] <= 2 else (200, sm_json)
        if scope["path"].endswith("/missing"):
            status, body = 404, b'{"messages":[{"text":"nope"}]}'
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    from agents.aas.io import to_json
    from registry.part2 import InLoopServer

    sm_json = to_json(b.status("urn:sm:status")).encode()
    server = InLoopServer(flaky)
    url = await server.start()
    try:
        async with AasClient(url) as client:
            sm = await client.get_submodel("urn:sm:status")
            assert sm.id == "urn:sm:status" and calls["n"] == 3
            calls["n"] = 10
            with pytest.raises(NotFound):  # a 404 is final: one call, no retry
                await client._send("GET", f"{url}/missing")
            assert calls["n"] == 11
    finally:
        await server.stop()
    # connection refused while the server is down, then it comes up: the retry succeeds
    store = AasStore()
    store.add("x", None, b.status("urn:sm:late"))
    late = AasServer(store)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def start_later() -> None:
        await asyncio.sleep(0.15)
        await late.start(port=port)

    starter = asyncio.create_task(start_later())
    try:
        async with AasClient(f"http://127.0.0.1:{port}", attempts=8) as client:
            assert (await client.get_submodel("urn:sm:late")).id == "urn:sm:late"
    finally:
        await starter
        await late.stop()


async def test_two_servers_in_one_loop_and_restart() -> None:
    a, b2 = AasServer(), AasServer()
    url_a, url_b = await a.start(), await b2.start()
    assert url_a != url_b
    async with httpx.AsyncClient() as h:
        assert (await h.get(f"{url_a}/shells")).json() == {"result": [], "paging_metadata": {}}
        assert (await h.get(f"{url_b}/description")).status_code == 200
    await a.stop()
    await b2.stop()
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as h:
            await h.get(f"{url_a}/shells")
    # stop is idempotent, a new server can take the port
    await a.stop()
    c = AasServer()
    port = int(url_a.rsplit(":", 1)[1])
    assert await c.start(port=port) == url_a
    await c.stop()


async def test_large_submodel_get_is_fast() -> None:
    store = AasStore()
    big = b.submodel(
        "urn:sm:big",
        "Big",
        "https://twinbid.dev/aas/Big/1/0",
        [b.prop(f"P{i:04d}", i * 0.5) for i in range(1000)],
    )
    store.add("big", None, big)
    server = AasServer(store)
    url = await server.start()
    try:
        async with httpx.AsyncClient(base_url=url) as h:
            first = time.perf_counter()
            r = await h.get(sm_url(big.id))
            cold = time.perf_counter() - first
            assert r.status_code == 200 and len(r.json()["submodelElements"]) == 1000
            times = []
            for _ in range(10):
                t = time.perf_counter()
                await h.get(sm_url(big.id))
                times.append(time.perf_counter() - t)
        assert cold < 0.5 and sorted(times)[5] < 0.05, (cold, times)
    finally:
        await server.stop()


def test_store_rules() -> None:
    store = AasStore()
    sm = b.status("urn:sm:s")
    store.add("a", None, sm)
    with pytest.raises(ValueError):
        store.put_submodel(b.status("urn:sm:s"), owner="b")  # another agent's submodel
    first = store.submodel_json(sm.id)
    assert store.submodel_json(sm.id) is first  # cached
    with store.edit(sm.id) as edited:
        b.update_status(edited, state="down")
    assert b'"down"' in store.submodel_json(sm.id)
    store.remove_owner("a")
    assert store.get_submodel(sm.id) is None


def test_validator_loaded_both_specs(validator: SpecValidator) -> None:
    dropped = validator.specs[SUBMODEL_REPOSITORY].dropped_parameters
    assert (
        "/submodels/{submodelIdentifier}/submodel-elements/{idShortPath}/invoke/$value",
        "aasIdentifier",
    ) in dropped


def test_validator_rejects_what_the_spec_forbids(validator: SpecValidator) -> None:
    url = "http://127.0.0.1:1/submodels/" + enc("urn:x")
    bad = b'{"modelType": "Submodel", "id": "urn:x", "submodelElements": [{"modelType": "Property", "idShort": "p"}]}'
    with pytest.raises(AssertionError):  # valueType missing, idShort too short
        validator.validate("GET", url, 200, {"content-type": "application/json"}, bad)
    validator.failures.clear()


def test_every_answer_matched_a_spec_route(validator: SpecValidator) -> None:
    """Runs last in this module: every answer seen above was validated; only /openapi.json is ours alone."""
    if len(validator.checked) < 20:
        pytest.skip("run together with the other tests of this module")
    assert validator.failures == []
    # the deliberate probes of routes/methods the spec does not have, and our OpenAPI document
    assert set(validator.unmatched) <= {
        ("GET", "/openapi.json"),
        ("GET", "/no/such/route"),
        ("DELETE", "/shells"),
    }
    assert {c.spec for c in validator.checked} == {SUBMODEL_REPOSITORY, AAS_REPOSITORY}
    assert {200, 201, 204, 400, 403, 404, 405, 409, 413, 501} <= {c.status for c in validator.checked}
