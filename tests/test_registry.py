"""The AAS/Submodel registry over real HTTP, on SQLite always and on PostgreSQL when one answers.
Every answer is validated against the official AAS Registry / Submodel Registry OpenAPI files."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import httpx
import pytest
from conftest import SPEC_DIR, postgres_schema

from protocol.tokens import NS_ENV, SECRET_ENV, RunTokens, new_secret
from registry.client import BadRequest, HttpError, RegistryClient
from registry.conformance import AAS_REGISTRY, SUBMODEL_REGISTRY, SpecValidator
from registry.descriptors import (
    CAPABILITIES_EXT,
    EXPIRES_HEADER,
    LEASE_HEADER,
    aas_server_base,
    capabilities_of,
    shell_descriptor,
    short_name_of,
    submodel_descriptor,
)
from registry.identifiers import b64url_encode as enc
from registry.service import RegistryServer, serve_registry
from registry.store import RegistryStore

MILLING = "https://twinbid.dev/capabilities/milling"
DRILLING = "https://twinbid.dev/capabilities/drilling"

#: The run's token secret: writes name the agents whose descriptors they write (protocol/tokens.py).
SECRET = new_secret()
TOKENS = RunTokens(SECRET, "test")


def writer() -> dict[str, str]:
    """A write token of the run naming the test's agents, made when used: a token lives
    LIFETIME seconds, and a module is imported long before its tests run in a full suite."""
    return {"Authorization": f"Bearer {TOKENS.token_for(tuple(f'mill-{n}' for n in range(100)))}"}


@pytest.fixture(scope="module")
def validator() -> SpecValidator:
    return SpecValidator.load(SPEC_DIR, [AAS_REGISTRY, SUBMODEL_REGISTRY])


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.sqlite'}"
        return
    with postgres_schema() as url:
        yield url


@pytest.fixture
async def registry(db_url: str, validator: SpecValidator):
    server = RegistryServer(db_url, purge_interval=0.1, max_body_bytes=32 * 1024, tokens=TOKENS)
    url = await server.start(port=0)
    http = httpx.AsyncClient(base_url=url, event_hooks={"response": [validator.hook]}, headers=writer())
    server.http = http
    yield server
    await http.aclose()
    await server.stop()


def mill(n: int = 1, caps: tuple[str, ...] = (MILLING,), base: str = "http://127.0.0.1:9001") -> dict:
    return shell_descriptor(
        aas_id=f"https://twinbid.dev/ids/default/mill-{n}/aas",
        short_name=f"mill-{n}",
        base_url=base,
        id_short=f"Mill{n}",
        capabilities=caps,
        global_asset_id=f"https://twinbid.dev/ids/default/mill-{n}/asset",
        asset_type="workstation",
        submodels=[
            {
                "id": f"https://twinbid.dev/ids/default/mill-{n}/sm/Status",
                "idShort": "Status",
                "semanticId": "https://twinbid.dev/aas/Status/1/0",
            }
        ],
    )


def assert_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    message = response.json()["messages"][0]
    assert message["code"] == str(status) and message["messageType"] == "Error"


async def test_descriptor_crud(registry: RegistryServer) -> None:
    h = registry.http
    d = mill(1)
    r = await h.post("/shell-descriptors", json=d)
    assert r.status_code == 201 and r.json() == d
    assert r.headers["location"] == f"/shell-descriptors/{enc(d['id'])}"
    assert_error(await h.post("/shell-descriptors", json=d), 409)
    got = (await h.get(f"/shell-descriptors/{enc(d['id'])}")).json()
    assert got == d
    assert short_name_of(got) == "mill-1" and capabilities_of(got) == [MILLING]
    assert aas_server_base(got) == "http://127.0.0.1:9001"
    # PUT replaces (204), PUT of an unknown id creates (201)
    d2 = {**d, "idShort": "Mill1b"}
    assert (await h.put(f"/shell-descriptors/{enc(d['id'])}", json=d2)).status_code == 204
    assert (await h.get(f"/shell-descriptors/{enc(d['id'])}")).json()["idShort"] == "Mill1b"
    d3 = mill(3)
    r = await h.put(f"/shell-descriptors/{enc(d3['id'])}", json=d3)
    assert r.status_code == 201 and r.json()["id"] == d3["id"]
    listed = (await h.get("/shell-descriptors")).json()
    assert [x["id"] for x in listed["result"]] == sorted([d["id"], d3["id"]]) and listed[
        "paging_metadata"
    ] == {}
    assert (await h.delete(f"/shell-descriptors/{enc(d['id'])}")).status_code == 204
    assert_error(await h.get(f"/shell-descriptors/{enc(d['id'])}"), 404)
    assert_error(await h.delete(f"/shell-descriptors/{enc(d['id'])}"), 404)
    assert (await h.get("/description")).json()["profiles"]


async def test_paging_and_filters(registry: RegistryServer) -> None:
    h = registry.http
    for n in range(7):
        caps = (MILLING,) if n % 2 == 0 else (DRILLING, MILLING) if n == 3 else (DRILLING,)
        assert (await h.post("/shell-descriptors", json=mill(n, caps))).status_code == 201
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        body = (await h.get("/shell-descriptors", params=params)).json()
        seen += [x["id"] for x in body["result"]]
        pages += 1
        cursor = body["paging_metadata"].get("cursor")
        if not cursor:
            break
    assert pages == 3 and seen == sorted(mill(n)["id"] for n in range(7))
    milling = (await h.get("/shell-descriptors", params={"capability": MILLING})).json()["result"]
    assert sorted(short_name_of(x) for x in milling) == ["mill-0", "mill-2", "mill-3", "mill-4", "mill-6"]
    drilling = (await h.get("/shell-descriptors", params={"capability": DRILLING, "limit": 2})).json()
    assert len(drilling["result"]) == 2 and drilling["paging_metadata"]["cursor"]
    by_name = (await h.get("/shell-descriptors", params={"shortName": "mill-5"})).json()["result"]
    assert [x["idShort"] for x in by_name] == ["Mill5"]
    assert len((await h.get("/shell-descriptors", params={"assetKind": "Instance"})).json()["result"]) == 7
    assert (await h.get("/shell-descriptors", params={"assetKind": "Type"})).json()["result"] == []
    assert (
        len((await h.get("/shell-descriptors", params={"assetType": enc("workstation")})).json()["result"])
        == 7
    )
    assert (await h.get("/shell-descriptors", params={"capability": "urn:none"})).json()["result"] == []
    # capability index follows replacement
    d0 = mill(0, (DRILLING,))
    assert (await h.put(f"/shell-descriptors/{enc(d0['id'])}", json=d0)).status_code == 204
    milling = (await h.get("/shell-descriptors", params={"capability": MILLING})).json()["result"]
    assert "mill-0" not in {short_name_of(x) for x in milling}


async def test_nested_submodel_descriptors(registry: RegistryServer) -> None:
    h = registry.http
    d = mill(1)
    await h.post("/shell-descriptors", json=d)
    base = f"/shell-descriptors/{enc(d['id'])}/submodel-descriptors"
    listed = (await h.get(base)).json()
    assert [x["idShort"] for x in listed["result"]] == ["Status"]
    sd = submodel_descriptor(
        submodel_id="urn:sm:caps",
        base_url="http://127.0.0.1:9001",
        id_short="Capabilities",
        semantic_id="https://admin-shell.io/idta/CapabilityDescription/1/0/Submodel",
    )
    r = await h.post(base, json=sd)
    assert r.status_code == 201 and r.json() == sd
    assert_error(await h.post(base, json=sd), 409)
    assert (await h.get(f"{base}/{enc('urn:sm:caps')}")).json() == sd
    assert (await h.put(f"{base}/{enc('urn:sm:caps')}", json={**sd, "idShort": "Caps"})).status_code == 204
    assert (await h.put(f"{base}/{enc('urn:sm:new')}", json={**sd, "id": "urn:sm:new"})).status_code == 201
    assert_error(await h.put(f"{base}/{enc('urn:sm:other')}", json=sd), 400)  # id mismatch
    page = (await h.get(base, params={"limit": 2})).json()
    assert len(page["result"]) == 2 and page["paging_metadata"]["cursor"]
    assert (await h.delete(f"{base}/{enc('urn:sm:caps')}")).status_code == 204
    assert_error(await h.get(f"{base}/{enc('urn:sm:caps')}"), 404)
    assert_error(await h.delete(f"{base}/{enc('urn:sm:caps')}"), 404)
    assert_error(await h.get(f"/shell-descriptors/{enc('urn:none')}/submodel-descriptors"), 404)
    shell = (await h.get(f"/shell-descriptors/{enc(d['id'])}")).json()
    assert {x["id"] for x in shell["submodelDescriptors"]} == {
        d["submodelDescriptors"][0]["id"],
        "urn:sm:new",
    }


async def test_submodel_registry(registry: RegistryServer) -> None:
    h = registry.http
    sd = submodel_descriptor(
        submodel_id="urn:sm:1",
        base_url="http://127.0.0.1:9001",
        id_short="Status",
        semantic_id="https://twinbid.dev/aas/Status/1/0",
    )
    r = await h.post("/submodel-descriptors", json=sd)
    assert r.status_code == 201
    assert_error(await h.post("/submodel-descriptors", json=sd), 409)
    assert (await h.get(f"/submodel-descriptors/{enc('urn:sm:1')}")).json() == sd
    assert (await h.put(f"/submodel-descriptors/{enc('urn:sm:1')}", json=sd)).status_code == 204
    r = await h.put(
        f"/submodel-descriptors/{enc('urn:sm:2')}",
        json={**sd, "id": "urn:sm:2"},
        headers={LEASE_HEADER: "30"},
    )
    assert r.status_code == 201 and float(r.headers[EXPIRES_HEADER]) > time.time()
    assert len((await h.get("/submodel-descriptors")).json()["result"]) == 2
    assert len((await h.get("/submodel-descriptors", params={"limit": 1})).json()["result"]) == 1
    assert (await h.delete(f"/submodel-descriptors/{enc('urn:sm:1')}")).status_code == 204
    assert_error(await h.get(f"/submodel-descriptors/{enc('urn:sm:1')}"), 404)
    assert_error(
        await h.post("/submodel-descriptors", json={"id": "urn:sm:3"}), 400
    )  # endpoints are required


async def test_leases_expire_unless_renewed(registry: RegistryServer) -> None:
    h = registry.http
    short, long_ = mill(1), mill(2)
    r = await h.post("/shell-descriptors", json=short, headers={LEASE_HEADER: "1.0"})
    assert r.status_code == 201 and float(r.headers[EXPIRES_HEADER]) <= time.time() + 1.0
    await h.post("/shell-descriptors", json=long_, headers={LEASE_HEADER: "60"})
    permanent = mill(3)
    await h.post("/shell-descriptors", json=permanent)
    await asyncio.sleep(0.6)
    # renew by PUTting the same descriptor again (204: it was still alive)
    r = await h.put(f"/shell-descriptors/{enc(short['id'])}", json=short, headers={LEASE_HEADER: "1.0"})
    assert r.status_code == 204
    await asyncio.sleep(0.6)
    assert (await h.get(f"/shell-descriptors/{enc(short['id'])}")).status_code == 200  # renewed in time
    await asyncio.sleep(0.7)
    # expired: invisible everywhere at once ...
    assert_error(await h.get(f"/shell-descriptors/{enc(short['id'])}"), 404)
    ids = {x["id"] for x in (await h.get("/shell-descriptors")).json()["result"]}
    assert ids == {long_["id"], permanent["id"]}
    assert short["id"] not in {
        x["id"] for x in (await h.get("/shell-descriptors", params={"capability": MILLING})).json()["result"]
    }
    assert_error(await h.get(f"/shell-descriptors/{enc(short['id'])}/submodel-descriptors"), 404)
    # ... and purged by the background task
    for _ in range(50):
        if registry.store.count_rows()["registry_shell_descriptors"] == 2:
            break
        await asyncio.sleep(0.05)
    assert registry.store.count_rows() == {
        "registry_shell_descriptors": 2,
        "registry_shell_capabilities": 2,
        "registry_submodel_descriptors": 0,
    }
    # an expired id can be registered again (POST 201, not 409)
    assert (await h.post("/shell-descriptors", json=short, headers={LEASE_HEADER: "5"})).status_code == 201
    # nested writes keep the lease
    sd = submodel_descriptor(submodel_id="urn:sm:x", base_url="http://x")
    await h.post(f"/shell-descriptors/{enc(short['id'])}/submodel-descriptors", json=sd)
    ttl, expires = registry.store.lease_of(short["id"])
    assert ttl == 5 and expires is not None
    assert_error(await h.post("/shell-descriptors", json=mill(9), headers={LEASE_HEADER: "-1"}), 400)
    assert_error(await h.post("/shell-descriptors", json=mill(9), headers={LEASE_HEADER: "soon"}), 400)


async def test_bad_input(registry: RegistryServer) -> None:
    h = registry.http
    assert_error(await h.get("/shell-descriptors/%%%"), 400)
    assert_error(await h.get("/shell-descriptors/a"), 400)
    assert_error(await h.get(f"/shell-descriptors/{enc('urn:unknown')}"), 404)
    assert_error(await h.get(f"/submodel-descriptors/{enc('urn:unknown')}"), 404)
    assert_error(await h.get("/shell-descriptors", params={"limit": "-2"}), 400)
    assert_error(await h.get("/shell-descriptors", params={"cursor": "*"}), 400)
    assert_error(await h.get("/shell-descriptors", params={"assetKind": "Weird"}), 400)
    assert_error(
        await h.post("/shell-descriptors", content=b"{", headers={"content-type": "application/json"}), 400
    )
    assert_error(await h.post("/shell-descriptors", json=[1, 2]), 400)
    assert_error(await h.post("/shell-descriptors", json={"idShort": "NoId"}), 400)
    assert_error(await h.post("/shell-descriptors", json={"id": "urn:x", "idShort": "1bad"}), 400)
    assert_error(await h.post("/shell-descriptors", json={"id": "urn:x", "endpoints": []}), 400)
    assert_error(
        await h.post(
            "/shell-descriptors",
            json={"id": "urn:x", "extensions": [{"name": CAPABILITIES_EXT, "value": "milling"}]},
        ),
        400,
    )  # must be a JSON array
    d = mill(1)
    assert_error(await h.put(f"/shell-descriptors/{enc('urn:other')}", json=d), 400)
    huge = {**d, "description": [{"language": "en", "text": "x" * 40_000}]}
    assert_error(await h.post("/shell-descriptors", json=huge), 413)
    assert_error(await h.patch("/shell-descriptors"), 405)
    # still serving, nothing stored by the failures
    assert (await h.get("/shell-descriptors")).json()["result"] == []
    assert (await h.post("/shell-descriptors", json=d)).status_code == 201


async def test_client(registry: RegistryServer) -> None:
    async with RegistryClient(registry.base_url, tokens=TOKENS, agent="mill-1") as client:
        d1, d2 = mill(1, (MILLING,)), mill(2, (MILLING, DRILLING))
        assert await client.register(d1) is None
        expires = await client.register(d2, ttl=0.6)
        assert expires is not None and expires > time.time()
        assert (await client.get(d1["id"])) == d1
        assert await client.get("urn:none") is None
        assert sorted(x["id"] for x in await client.find_by_capability(MILLING)) == sorted(
            [d1["id"], d2["id"]]
        )
        assert [x["id"] for x in await client.find_by_capability(DRILLING)] == [d2["id"]]
        assert (await client.find_by_short_name("mill-2"))["id"] == d2["id"]
        assert len(await client.list(page_size=1)) == 2
        client.keepalive(d2["id"])  # renews every 0.2 s
        await asyncio.sleep(1.0)
        assert await client.get(d2["id"]) is not None
        client.stop_keepalive(d2["id"])
        await asyncio.sleep(0.9)
        assert await client.get(d2["id"]) is None  # lapsed
        assert await client.renew(d2["id"]) is not None  # renew re-registers
        assert await client.get(d2["id"]) is not None
        assert await client.deregister(d1["id"]) is True
        assert await client.deregister(d1["id"]) is False
        with pytest.raises(KeyError):
            await client.renew("urn:never")
        with pytest.raises(BadRequest):
            await client.register({"id": "urn:x", "idShort": "!"})
        sd = submodel_descriptor(submodel_id="urn:sm:c", base_url="http://x")
        await client.register_submodel(sd, ttl=30)
        assert await client.get_submodel("urn:sm:c") == sd
        assert await client.deregister_submodel("urn:sm:c") is True
        assert await client.get_submodel("urn:sm:c") is None


async def test_many_agents_capability_lookup(registry: RegistryServer) -> None:
    async with RegistryClient(registry.base_url, tokens=TOKENS) as client:
        caps = [f"https://twinbid.dev/capabilities/c{i}" for i in range(5)]
        await asyncio.gather(*(client.register(mill(n, (caps[n % 5], caps[(n + 1) % 5]))) for n in range(60)))
        found = await client.find_by_capability(caps[0], page_size=7)
        assert sorted(short_name_of(x) for x in found) == sorted(
            f"mill-{n}" for n in range(60) if 0 in (n % 5, (n + 1) % 5)
        )


def test_store_survives_restart(db_url: str) -> None:
    store = RegistryStore(db_url)
    store.put_shell(mill(1))
    store.put_shell(mill(2), ttl=1000)
    store.close()
    again = RegistryStore(db_url)
    assert [json.loads(b)["id"] for b in again.list_shells()[0]] == sorted([mill(1)["id"], mill(2)["id"]])
    assert again.lease_of(mill(2)["id"])[0] == 1000
    assert again.renew_shell(mill(2)["id"], 5) <= time.time() + 5.1
    with pytest.raises(KeyError):
        again.renew_shell("urn:gone")
    again.close()


async def test_client_retries_when_registry_starts_late(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = RegistryServer(f"sqlite:///{tmp_path / 'late.sqlite'}", tokens=TOKENS)

    async def start_later() -> None:
        await asyncio.sleep(0.2)
        await server.start(port=port)

    task = asyncio.create_task(start_later())
    try:
        async with RegistryClient(f"http://127.0.0.1:{port}", attempts=10, tokens=TOKENS) as client:
            await client.register(mill(1))
            assert (await client.get(mill(1)["id"]))["idShort"] == "Mill1"
    finally:
        await task
        await server.stop()
    async with RegistryClient(f"http://127.0.0.1:{port}", attempts=2, tokens=TOKENS) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(mill(1)["id"])


async def test_serve_registry_runs_until_cancelled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    monkeypatch.setenv(SECRET_ENV, SECRET)  # `twinbid registry serve` takes the run's secret from there
    monkeypatch.setenv(NS_ENV, "test")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    task = asyncio.create_task(serve_registry("127.0.0.1", port, f"sqlite:///{tmp_path / 'served.sqlite'}"))
    try:
        async with RegistryClient(f"http://127.0.0.1:{port}", attempts=10, tokens=TOKENS) as client:
            await client.register(mill(4))
            assert (await client.find_by_short_name("mill-4")) is not None
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert (tmp_path / "served.sqlite").exists()


def test_http_error_carries_spec_messages() -> None:
    request = httpx.Request("GET", "http://x/shell-descriptors/abc")
    response = httpx.Response(404, json={"messages": [{"code": "404", "text": "gone"}]}, request=request)
    from registry.client import error_from

    err = error_from(response)
    assert isinstance(err, HttpError) and err.status == 404 and err.text == "gone"


def test_validator_rejects_what_the_spec_forbids(validator: SpecValidator) -> None:
    """The conformance check is not a rubber stamp."""
    url = "http://127.0.0.1:1/shell-descriptors"
    ok = json.dumps({"result": [mill(1)], "paging_metadata": {}}).encode()
    assert validator.validate("GET", url, 200, {"content-type": "application/json"}, ok) == AAS_REGISTRY
    bad = json.dumps({"result": [{"idShort": "NoId"}], "paging_metadata": {}}).encode()
    with pytest.raises(AssertionError):
        validator.validate("GET", url, 200, {"content-type": "application/json"}, bad)
    with pytest.raises(AssertionError):  # error bodies must be a Result with UTC timestamps
        validator.validate(
            "GET",
            url + "/abc",
            404,
            {"content-type": "application/json"},
            b'{"messages": [{"code": "404", "timestamp": "2025-01-01T00:00:00+02:00"}]}',
        )
    validator.failures.clear()


def test_every_answer_matched_a_spec_route(validator: SpecValidator) -> None:
    """Runs last in this module: all answers seen by the tests above were checked against the specs."""
    if len(validator.checked) < 20:
        pytest.skip("run together with the other tests of this module")
    assert validator.failures == []
    assert set(validator.unmatched) <= {("PATCH", "/shell-descriptors")}  # the deliberate 405 probe
    statuses = {c.status for c in validator.checked}
    assert {200, 201, 204, 400, 404, 409, 413} <= statuses


def test_read_cache_bounds_staleness_across_processes(db_url: str) -> None:
    """Two registry processes on one database: each reads its own writes at once, the other's within cache_ttl."""
    a = RegistryStore(db_url, cache_ttl=0.3)
    b = RegistryStore(db_url, cache_ttl=0.3)
    try:
        a.put_shell(mill(1))
        assert b.get_shell_json(mill(1)["id"]) is not None  # a miss is never cached: visible at once
        assert len(b.list_shells(capability=MILLING)[0]) == 1
        a.put_shell(mill(2))
        a.delete_shell(mill(1)["id"])
        assert a.get_shell_json(mill(1)["id"]) is None  # own writes: at once
        time.sleep(0.35)
        assert b.get_shell_json(mill(1)["id"]) is None  # the other's: within cache_ttl
        assert [json.loads(x)["id"] for x in b.list_shells(capability=MILLING)[0]] == [mill(2)["id"]]
        uncached = RegistryStore(db_url, cache_ttl=0)
        a.put_shell(mill(3))
        assert len(uncached.list_shells()[0]) == 2
        uncached.close()
    finally:
        a.close()
        b.close()
