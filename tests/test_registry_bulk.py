"""Registration at swarm scale: the registry's bulk extension, the client's batching and fallback,
the node's registrar (batches, renewals, retries) and the registry as a process of its own — all over
real HTTP with real registry servers and SQLite databases."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from agents.runtime.directory import Directory
from agents.runtime.registrar import Registrar
from protocol.elements import capability_semantic_id
from protocol.tokens import RunTokens, new_secret
from registry.client import BULK_PATH, LOOKUP_PATH, HttpError, RegistryClient
from registry.descriptors import EXPIRES_HEADER, LEASE_HEADER, shell_descriptor, short_name_of
from registry.identifiers import b64url_encode as enc
from registry.part2 import InLoopServer
from registry.process import RegistryProcess
from registry.service import RegistryServer

MILLING = capability_semantic_id("milling")
DRILLING = capability_semantic_id("drilling")

#: The run's token secret: writes name the agents whose descriptors they write (protocol/tokens.py).
SECRET = new_secret()
TOKENS = RunTokens(SECRET, "test")


def writer() -> dict[str, str]:
    """A write token of the run naming the test's agents, made when used: a token lives
    LIFETIME seconds, and a module is imported long before its tests run in a full suite."""
    return {"Authorization": f"Bearer {TOKENS.token_for(tuple(f'r{n}' for n in range(100)))}"}


def agent(n: int, caps: tuple[str, ...] = (MILLING,)) -> dict[str, Any]:
    return shell_descriptor(
        aas_id=f"https://twinbid.dev/ids/bulk/r{n}/aas",
        short_name=f"r{n}",
        base_url="http://127.0.0.1:9001",
        id_short=f"r{n}",
        capabilities=list(caps),
        submodels=[{"id": f"https://twinbid.dev/ids/bulk/r{n}/sm", "idShort": "Nameplate"}],
        namespace="bulk",
        asset_type="workstation",
    )


@pytest.fixture
async def registry(tmp_path: Path):
    server = RegistryServer(f"sqlite:///{tmp_path / 'registry.db'}", purge_interval=0.1, tokens=TOKENS)
    await server.start(port=0)
    yield server
    await server.stop()


class Counting:
    """httpx event hook: the requests a client sent, by method and path."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    async def __call__(self, request: httpx.Request) -> None:
        self.seen.append((request.method, request.url.path))


def counted_client(url: str, counter: Counting) -> RegistryClient:
    http = httpx.AsyncClient(event_hooks={"request": [counter]}, timeout=5.0)
    client = RegistryClient(url, client=http, tokens=TOKENS)
    client._own_http = http  # closed by the test
    return client


async def test_bulk_put_creates_replaces_all_or_none_with_one_lease(registry: RegistryServer) -> None:
    async with httpx.AsyncClient(base_url=registry.base_url, headers=writer()) as h:
        batch = [agent(n) for n in range(3)]
        r = await h.put(BULK_PATH, json=batch, headers={LEASE_HEADER: "0.5"})
        assert r.status_code == 200 and r.json() == {"created": 3, "replaced": 0}
        assert float(r.headers[EXPIRES_HEADER]) == pytest.approx(time.time() + 0.5, abs=0.3)
        assert (await h.get(f"/shell-descriptors/{enc(batch[1]['id'])}")).json() == batch[1]  # verbatim
        changed = {**batch[0], "idShort": "r0b"}
        r = await h.put(BULK_PATH, json=[changed, batch[1], agent(3)])  # no header: permanent
        assert r.json() == {"created": 1, "replaced": 2} and EXPIRES_HEADER not in r.headers
        found = (await h.get("/shell-descriptors", params={"capability": MILLING})).json()["result"]
        assert [short_name_of(d) for d in found] == ["r0", "r1", "r2", "r3"]
        assert found[0]["idShort"] == "r0b"
        # one invalid descriptor: a 400 naming it, and nothing of the batch is stored
        bad = {**agent(5), "endpoints": [{"interface": "AAS-3.0"}]}
        r = await h.put(BULK_PATH, json=[agent(4), bad])
        assert r.status_code == 400 and "descriptor 1" in r.json()["messages"][0]["text"]
        assert (await h.get(f"/shell-descriptors/{enc(agent(4)['id'])}")).status_code == 404
        assert (await h.put(BULK_PATH, json=agent(4))).status_code == 400  # not an array
        await asyncio.sleep(0.8)  # r2 kept the lease of the first batch; the others were replaced without one
        left = (await h.get("/shell-descriptors")).json()["result"]
        assert sorted(short_name_of(d) for d in left) == ["r0", "r1", "r3"]


async def test_client_register_many_splits_by_size_and_finds_every_descriptor(
    registry: RegistryServer,
) -> None:
    counter = Counting()
    client = counted_client(registry.base_url, counter)
    try:
        descriptors = [agent(n) for n in range(40)]
        size = len(httpx.Request("PUT", "http://x", json=descriptors[0]).content)
        expires = await client.register_many(descriptors, ttl=60, max_bytes=10 * size)
        assert expires == pytest.approx(time.time() + 60, abs=2)
        assert 4 <= len(counter.seen) <= 6 and {p for _, p in counter.seen} == {BULK_PATH}
        found = await client.find_by_capability(MILLING)
        assert sorted(d["id"] for d in found) == sorted(d["id"] for d in descriptors)
        counter.seen.clear()
        assert await client.renew(descriptors[7]["id"]) is not None  # the client remembers them
        assert counter.seen == [("PUT", f"/shell-descriptors/{enc(descriptors[7]['id'])}")]
    finally:
        await client.aclose()
        await client._own_http.aclose()


async def test_client_register_many_falls_back_to_one_put_each_without_the_extension(
    registry: RegistryServer,
) -> None:
    """A registry without the bulk route (another implementation of the standard API)."""

    async def standard_only(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] in (BULK_PATH, LOOKUP_PATH):
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await registry.app(scope, receive, send)

    server = InLoopServer(standard_only)
    url = await server.start("127.0.0.1", 0)
    counter = Counting()
    client = counted_client(url, counter)
    try:
        await client.register_many([agent(n) for n in range(3)], ttl=60)
        await client.register_many([agent(n) for n in range(3, 5)], ttl=60)
        assert counter.seen[0] == ("PUT", BULK_PATH)
        assert [p for _, p in counter.seen[1:]] == [
            f"/shell-descriptors/{enc(agent(n)['id'])}" for n in range(5)
        ]
        assert len(await client.find_by_capability(MILLING)) == 5
        counter.seen.clear()
        found, offered = await client.lookup([agent(1)["id"], "urn:nobody"], [MILLING, DRILLING])
        assert list(found) == [agent(1)["id"]] and len(offered[MILLING]) == 5 and offered[DRILLING] == []
        assert counter.seen[0] == ("POST", LOOKUP_PATH) and len(counter.seen) == 5  # then one each
    finally:
        await client.aclose()
        await client._own_http.aclose()
        await server.stop()


async def test_registrar_batches_concurrent_registrations_and_renews_them_together(
    registry: RegistryServer,
) -> None:
    counter = Counting()
    client = counted_client(registry.base_url, counter)
    registrar = Registrar(client, ttl=0.9)  # renewed every 0.3 s
    try:
        await asyncio.gather(*(registrar.register(agent(n)) for n in range(50)))
        assert registrar.live == 50 and len(counter.seen) <= 3  # not one request per agent
        assert len(await client.find_by_capability(MILLING)) == 50  # each returned once registered
        registrar.forget(agent(0)["id"])
        await asyncio.sleep(2.0)  # more than twice the lease: only renewals keep them
        found = await client.find_by_capability(MILLING)
        assert sorted(short_name_of(d) for d in found) == sorted(f"r{n}" for n in range(1, 50))
        renewals = [p for _, p in counter.seen if p == BULK_PATH]
        assert 5 <= len(renewals) <= 12  # one request per period for all 49, not 49
    finally:
        await registrar.close()
        await client.aclose()
        await client._own_http.aclose()


async def test_registrar_waits_for_a_registry_that_starts_late(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = RegistryClient(f"http://127.0.0.1:{port}", attempts=1, tokens=TOKENS)
    registrar = Registrar(client, ttl=60, max_delay=0.2)
    server = RegistryServer(f"sqlite:///{tmp_path / 'late.db'}", tokens=TOKENS)
    try:
        waiting = asyncio.gather(*(registrar.register(agent(n)) for n in range(5)))
        await asyncio.sleep(0.5)
        assert not waiting.done()  # refused connections: the agents wait, nothing raises
        await server.start(port=port)
        await asyncio.wait_for(waiting, 5)
        assert len(await client.find_by_capability(MILLING)) == 5
    finally:
        await registrar.close()
        await client.aclose()
        await server.stop()


async def test_registrar_reports_a_refused_descriptor_to_its_agent_only(registry: RegistryServer) -> None:
    async with RegistryClient(registry.base_url, tokens=TOKENS) as client:
        registrar = Registrar(client, ttl=60)
        bad = {**agent(1), "endpoints": [{"interface": "AAS-3.0"}]}
        outcomes = await asyncio.gather(
            registrar.register(agent(0)),
            registrar.register(bad),
            registrar.register(agent(2)),
            return_exceptions=True,
        )
        assert outcomes[0] is None and outcomes[2] is None  # in the same batch as the bad one
        assert isinstance(outcomes[1], HttpError) and outcomes[1].status == 400
        assert sorted(short_name_of(d) for d in await client.find_by_capability(MILLING)) == ["r0", "r2"]
        assert registrar.live == 2
        await registrar.close()


async def test_registry_process_serves_ignores_ctrl_c_and_stops_with_its_parent(tmp_path: Path) -> None:
    proc = RegistryProcess(f"sqlite:///{tmp_path / 'registry.db'}", http_secret=SECRET, ns="test")
    url = await proc.start()
    child = proc.process
    assert child is not None and proc.running
    try:
        os.kill(child.pid, signal.SIGINT)  # a Ctrl-C reaches the whole process group
        async with RegistryClient(url, tokens=TOKENS) as client:
            await client.register_many([agent(n) for n in range(3)], ttl=60)
            assert len(await client.find_by_capability(MILLING)) == 3
        # the launcher dying closes the child's standard input: it exits by itself
        assert child.stdin is not None
        child.stdin.close()
        await asyncio.wait_for(asyncio.to_thread(child.wait), 10)
        assert child.returncode == 0
    finally:
        await proc.stop()
    assert not proc.running and (tmp_path / "registry.db").exists()
    again = RegistryProcess(
        f"sqlite:///{tmp_path / 'registry.db'}", http_secret=SECRET, ns="test"
    )  # the data outlives the process
    url = await again.start()
    try:
        async with RegistryClient(url, tokens=TOKENS) as client:
            assert len(await client.find_by_capability(MILLING)) == 3
    finally:
        await again.stop()


async def test_bulk_lookup_answers_ids_and_capabilities_in_one_request(registry: RegistryServer) -> None:
    async with httpx.AsyncClient(base_url=registry.base_url, headers=writer()) as h:
        await h.put(BULK_PATH, json=[agent(n, (MILLING,) if n < 3 else (DRILLING,)) for n in range(5)])
        await h.put(BULK_PATH, json=[agent(9)], headers={LEASE_HEADER: "0.2"})
        await asyncio.sleep(0.4)  # r9's lease ran out: invisible
        ids = [agent(1)["id"], agent(4)["id"], agent(9)["id"], "urn:nobody"]
        r = await h.post(LOOKUP_PATH, json={"ids": ids, "capabilities": [MILLING, DRILLING, "urn:none"]})
        assert r.status_code == 200
        body = r.json()
        assert body["ids"] == {agent(1)["id"]: agent(1), agent(4)["id"]: agent(4, (DRILLING,))}
        assert [short_name_of(d) for d in body["capabilities"][MILLING]] == ["r0", "r1", "r2"]
        assert [short_name_of(d) for d in body["capabilities"][DRILLING]] == ["r3", "r4"]
        assert body["capabilities"]["urn:none"] == []
        for bad in ([1, 2], {"ids": "x"}, {"ids": [1]}, {"ids": ["x"] * 2001}):
            assert (await h.post(LOOKUP_PATH, json=bad)).status_code == 400


async def test_directory_sends_the_lookups_its_agents_wait_for_together(registry: RegistryServer) -> None:
    async with RegistryClient(registry.base_url, tokens=TOKENS) as client:
        await client.register_many([agent(n, (MILLING,) if n % 2 else (DRILLING,)) for n in range(40)])
        directory = Directory(client)
        ids = [agent(n)["id"] for n in range(40)] + ["urn:nobody"]
        entries, millers, drillers = await asyncio.gather(
            asyncio.gather(*(directory.by_id(i) for i in ids + ids)),  # each id asked twice at once
            directory.bidders("milling"),
            directory.bidders("drilling"),
        )
        assert directory.lookups <= 2  # not 81 + 2
        names = [*(f"r{n}" for n in range(40)), None]
        assert [e.name if e else None for e in entries] == names + names
        assert millers == {agent(n)["id"] for n in range(1, 40, 2)}
        assert drillers == {agent(n)["id"] for n in range(0, 40, 2)}
        before = directory.lookups
        assert (await directory.by_id(agent(7)["id"])).name == "r7"  # cached now: no request
        assert directory.lookups == before
        assert (
            await directory.by_id("urn:nobody") is None and directory.lookups == before + 1
        )  # misses ask again


async def test_directory_lookups_fail_for_their_waiters_only_while_the_registry_is_down(
    tmp_path: Path,
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with RegistryClient(f"http://127.0.0.1:{port}", attempts=1, tokens=TOKENS) as client:
        directory = Directory(client)
        with pytest.raises(httpx.ConnectError):
            await directory.by_id(agent(1)["id"])
        server = RegistryServer(f"sqlite:///{tmp_path / 'r.db'}", tokens=TOKENS)
        await server.start(port=port)
        try:
            await client.register_many([agent(1)])
            assert (await directory.by_id(agent(1)["id"])).name == "r1"
        finally:
            await server.stop()


async def test_a_crashed_agent_stops_renewing_its_lease(
    registry: RegistryServer, mosquitto, tmp_path: Path
) -> None:
    """An agent crashed in its process (a scenario fault) is gone as a killed process would be:
    its descriptor lapses with its lease while its neighbours' are renewed; a restart registers
    it again."""
    from agents.persistence import open_database
    from agents.persistence.database import sqlite_url
    from agents.runtime.agent import Agent
    from agents.runtime.node import Node, NodeConfig
    from shopfloor.clock import make_clock

    db = open_database(sqlite_url(tmp_path / "run.db"))
    config = NodeConfig(  # renewed every 0.3 s; the node's agents register with the run's tokens
        "test", mosquitto.address, registry.base_url, registry_ttl=0.9, http_secret=SECRET
    )
    node = Node(config, make_clock("real"), db)
    await node.start()
    client = RegistryClient(registry.base_url, tokens=TOKENS)
    try:
        for name in ("r1", "r2"):
            await node.add_agent(Agent(node, name, f"urn:{name}"), capabilities=("milling",))
        assert sorted(short_name_of(d) for d in await client.find_by_capability(MILLING)) == ["r1", "r2"]
        await node.crash_agent(node.agents["r1"])
        await asyncio.sleep(2.0)  # more than twice the lease
        assert [short_name_of(d) for d in await client.find_by_capability(MILLING)] == ["r2"]
        await node.add_agent(Agent(node, "r1", "urn:r1"), capabilities=("milling",))  # the restart
        await asyncio.sleep(0.5)  # renewed in the background
        assert sorted(short_name_of(d) for d in await client.find_by_capability(MILLING)) == ["r1", "r2"]
    finally:
        await node.stop()
        await client.aclose()
        db.dispose()
