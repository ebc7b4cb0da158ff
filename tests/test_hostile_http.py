"""Bodies nested too deeply for the JSON parser, against the real AAS server and registry over HTTP
(issue 21 finding 8): a body nested 100,000 deep was a 500 (RecursionError) on the AAS server.
Every such body is a 400 with the spec's Result body, and the server goes on serving."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from agents.aas import build as b
from agents.aas import ids
from agents.aas.server import AasServer
from agents.aas.store import AasStore
from protocol.tokens import RunTokens, new_secret
from registry.identifiers import b64url_encode as enc
from registry.service import RegistryServer

pytestmark = pytest.mark.timeout(120)

#: 100,000 deep as in the finding; 990 sits just under Python's recursion limit, where the JSON
#: parser succeeds and what reads its result (basyx, pydantic) recurses once per level.
DEPTHS = [100_000, 990]


def nested(depth: int) -> bytes:
    """A well-formed object whose `value` is `depth` arrays deep (what a Property's value could be)."""
    return b'{"idShort": "x", "modelType": "Property", "valueType": "xs:string", "value": ' + (
        b"[" * depth + b"]" * depth + b"}"
    )


def assert_result_400(response: httpx.Response) -> None:
    assert response.status_code == 400, (response.status_code, response.text[:300])
    message = response.json()["messages"][0]
    assert message["messageType"] == "Error" and message["code"] == "400"
    assert "nested too deeply" in message["text"], message["text"]


@pytest.fixture
async def aas() -> AsyncIterator[httpx.AsyncClient]:
    store = AasStore()
    status = b.status(ids.submodel_id("mill-1", "Status"))
    store.add(
        "mill-1", b.shell(ids.shell_id("mill-1"), "Mill1", global_asset_id=ids.asset_id("mill-1")), status
    )
    tokens = RunTokens(new_secret(), "default")  # writes are the owner's: mill-1 writes its own AAS
    server = AasServer(store, max_body_bytes=1024 * 1024, tokens=tokens)
    url = await server.start(host="127.0.0.1", port=0)
    async with httpx.AsyncClient(base_url=url, timeout=30, headers=tokens.headers("mill-1")) as client:
        client.submodel = f"/submodels/{enc(status.id)}"  # type: ignore[attr-defined]
        yield client
    await server.stop()


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    tokens = RunTokens(new_secret(), "default")  # the registry takes writes of the run's agents only
    server = RegistryServer(
        f"sqlite:///{tmp_path / 'registry.db'}", max_body_bytes=1024 * 1024, tokens=tokens
    )
    url = await server.start(port=0)
    async with httpx.AsyncClient(base_url=url, timeout=30, headers=tokens.headers("mill-1")) as client:
        yield client
    await server.stop()


JSON = {"content-type": "application/json"}


@pytest.mark.parametrize("depth", DEPTHS)
async def test_a_body_nested_too_deeply_is_a_400_on_the_aas_server(
    aas: httpx.AsyncClient, depth: int
) -> None:
    body = nested(depth)
    assert_result_400(await aas.post(f"{aas.submodel}/submodel-elements", content=body, headers=JSON))  # type: ignore[attr-defined]
    assert_result_400(await aas.post(f"{aas.submodel}/submodel-elements", content=b"[" * depth, headers=JSON))  # type: ignore[attr-defined]
    assert (await aas.get(f"{aas.submodel}/submodel-elements")).status_code == 200  # type: ignore[attr-defined]


@pytest.mark.parametrize("depth", DEPTHS)
async def test_a_body_nested_too_deeply_is_a_400_on_the_registry(
    registry: httpx.AsyncClient, depth: int
) -> None:
    descriptor = b'{"id": "urn:x", "idShort": "X", "description": ' + b"[" * depth + b"]" * depth + b"}"
    assert_result_400(await registry.post("/shell-descriptors", content=descriptor, headers=JSON))
    assert_result_400(await registry.post("/shell-descriptors", content=b"[" * depth, headers=JSON))
    assert (await registry.get("/shell-descriptors")).status_code == 200
