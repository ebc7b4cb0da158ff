"""AAS server benchmark: GET of a 1,000-element submodel (target <= 50 ms).

An agent process (child) serves one submodel of 1,000 Properties (each with a semanticId, mixed value
types). Another process reads it over loopback with httpx:

* **first**: the first GET of a submodel nobody read before (full basyx serialisation);
* **warm**: repeated GETs — the server answers from its cached JSON;
* **after a write**: each GET follows a PATCH of one element (the server re-serialises only that element;
  the other 999 fragments stay cached);
* **client parse**: ``AasClient.get_submodel`` — GET plus parsing the JSON into basyx objects, which is
  what an agent pays to work with the submodel.

Also reported: basyx serialisation alone, in-process. Usage: ``python bench/bench_aas.py [--n 50]``.
Prints a table, the machine, and the figures as one JSON object on the last line; stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machineinfo import machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ELEMENTS = 1000
SUBMODEL_ID = "https://twinbid.dev/ids/bench/agent-0/sm/Big"
TARGET_MS = 50.0
FRESH = 20  # copies never read before: their first GET serialises everything


def big_submodel(submodel_id: str = SUBMODEL_ID) -> Any:
    from agents.aas import build as b

    elements = []
    for i in range(ELEMENTS):
        value: Any = (i * 0.25, i, f"value-{i}")[i % 3]
        elements.append(
            b.prop(f"P{i:04d}", value, semantic_id=f"https://twinbid.dev/aas/Bench/P{i % 50}/1/0")
        )
    return b.submodel(submodel_id, "Big", "https://twinbid.dev/aas/Bench/1/0", elements)


def serve_child(port: int) -> None:
    """Child process: one agent's AAS server with the big submodel, until terminated."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    from agents.aas.server import AasServer
    from agents.aas.store import AasStore

    async def run() -> None:
        store = AasStore()
        copies = [big_submodel(f"{SUBMODEL_ID}-{k}") for k in range(FRESH)]
        store.add("agent-0", None, big_submodel(), *copies)
        server = AasServer(store)
        await server.start(port=port)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 2),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1000, 2),
        "min_ms": round(ordered[0] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


async def measure(port: int, n: int) -> dict[str, Any]:
    import httpx

    from agents.aas.client import AasClient
    from registry.identifiers import b64url_encode

    base = f"http://127.0.0.1:{port}"
    url = f"{base}/submodels/{b64url_encode(SUBMODEL_ID)}"
    async with httpx.AsyncClient(timeout=30.0) as http:
        deadline = time.monotonic() + 20
        while True:
            try:
                if (await http.get(f"{base}/description")).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.05)
        first = []
        for k in range(FRESH):
            t0 = time.perf_counter()
            response = await http.get(f"{base}/submodels/{b64url_encode(f'{SUBMODEL_ID}-{k}')}")
            first.append(time.perf_counter() - t0)
            assert response.status_code == 200
        size = len((await http.get(url)).content)
        warm, cold = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            response = await http.get(url)
            warm.append(time.perf_counter() - t0)
            assert response.status_code == 200
        for i in range(n):
            patch = {"modelType": "Property", "idShort": "P0001", "valueType": "xs:long", "value": str(i)}
            assert (await http.patch(f"{url}/submodel-elements/P0001", json=patch)).status_code == 204
            t0 = time.perf_counter()
            response = await http.get(url)
            cold.append(time.perf_counter() - t0)
            assert response.json()["submodelElements"][1]["value"] == str(i)
    parsed = []
    async with AasClient(base) as client:
        for _ in range(max(5, n // 5)):
            t0 = time.perf_counter()
            sm = await client.get_submodel(SUBMODEL_ID)
            parsed.append(time.perf_counter() - t0)
            assert len(sm.submodel_element) == ELEMENTS
    return {
        "bytes": size,
        "first": stats(first),
        "warm": stats(warm),
        "cold": stats(cold),
        "client_parse": stats(parsed),
    }


def serialisation_only(n: int, fast: bool) -> dict[str, float]:
    from basyx.aas.adapter.json import AASToJsonEncoder

    from agents.aas.io import FastAASToJsonEncoder

    encoder = FastAASToJsonEncoder if fast else AASToJsonEncoder
    sm = big_submodel()
    times = []
    for _ in range(max(5, n // 5)):
        t0 = time.perf_counter()
        json.dumps(sm, cls=encoder)
        times.append(time.perf_counter() - t0)
    return stats(times)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve_child(int(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50, help="requests per measurement")
    args = parser.parse_args()
    port = free_port()
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], cwd=ROOT)
    try:
        with contextlib.suppress(ImportError):
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        result: dict[str, Any] = asyncio.run(measure(port, args.n))
    finally:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    result["serialise_basyx"] = serialisation_only(args.n, fast=False)
    result["serialise_fast"] = serialisation_only(args.n, fast=True)
    result["elements"] = ELEMENTS
    result["target_ms"] = TARGET_MS
    result["target_met"] = all(result[k]["median_ms"] <= TARGET_MS for k in ("first", "warm", "cold"))
    result["machine"] = machine()

    print(
        f"GET of a {ELEMENTS}-element submodel ({result['bytes'] / 1024:.0f} KiB JSON) over loopback, httpx, "
        f"{args.n} requests each"
    )
    header = f"{'measurement':<34}{'median ms':>10}{'p90 ms':>9}{'min ms':>9}{'max ms':>9}"
    print(header)
    print("-" * len(header))
    labels = {
        "first": "first GET (nothing cached)",
        "warm": "GET, cached JSON",
        "cold": "GET after a PATCH of 1 element",
        "client_parse": "AasClient.get_submodel (+basyx)",
        "serialise_basyx": "serialise: basyx encoder",
        "serialise_fast": "serialise: cached-dispatch encoder",
    }
    for key, label in labels.items():
        r = result[key]
        print(f"{label:<34}{r['median_ms']:>10}{r['p90_ms']:>9}{r['min_ms']:>9}{r['max_ms']:>9}")
    verdict = "met" if result["target_met"] else "NOT met"
    print(f"target: GET <= {TARGET_MS:g} ms (median; first, cached, after a write): {verdict}")
    m = result["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['implementation']} {m['python']}, {m['os']}")
    print(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
