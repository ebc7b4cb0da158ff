"""Registry lookup benchmark: lookups/s and latency with 100 concurrent httpx clients on loopback.

The registry runs in its own process (as ``twinbid registry serve`` would), populated with N shell
descriptors. 100 ``httpx.AsyncClient`` s (one keep-alive connection each, like 100 agents) look
descriptors up — half by id (``GET /shell-descriptors/{id}``), half by capability
(``GET /shell-descriptors?capability=...``):

* **saturation**: every client sends its next lookup as soon as the previous answer arrives. This gives
  the capacity (lookups/s); latency here is queueing (Little's law: 100 in flight / throughput).
* **paced**: the same clients, each sending at a fixed interval, so the total offered load is a share
  of that capacity (``--loads``, default 20/40/60/80 %). This is the latency an agent sees from a busy
  but not overloaded registry; the target (p50 <= 2 ms, no errors) is checked here.

Besides the client-observed latency it reports the registry's own time per lookup (``Server-Timing``).
Usage: ``python bench/bench_registry.py [--seconds 4] [--descriptors 200] [--db-url URL]``. It prints a
table, the machine, and the figures as one JSON object on the last line; it stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machineinfo import machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLIENTS = 100
CAPABILITIES = [f"https://twinbid.dev/capabilities/cap{i}" for i in range(10)]
TARGET_P50_MS = 2.0


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def use_uvloop() -> str:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return "uvloop"
    except ImportError:
        return "asyncio"


def serve_child(port: int, db_url: str) -> None:
    """Child process: run the registry until terminated."""
    use_uvloop()
    from registry.service import serve_registry

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_registry("127.0.0.1", port, db_url))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def wait_ready(base: str, deadline: float) -> None:
    import httpx

    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{base}/description")).status_code == 200:
                    return
            await asyncio.sleep(0.05)
    raise RuntimeError("registry did not start")


async def populate(base: str, n: int) -> list[str]:
    from registry.client import RegistryClient
    from registry.descriptors import shell_descriptor

    ids = []
    async with RegistryClient(base) as client:
        for i in range(n):
            desc = shell_descriptor(
                aas_id=f"https://twinbid.dev/ids/bench/agent-{i}/aas",
                short_name=f"agent-{i}",
                base_url="http://127.0.0.1:9",
                id_short=f"Agent{i}",
                capabilities=[CAPABILITIES[i % 10], CAPABILITIES[(i * 7 + 3) % 10]],
                submodels=[{"id": f"https://twinbid.dev/ids/bench/agent-{i}/sm/Status", "idShort": "Status"}],
            )
            await client.register(desc, ttl=3600)
            ids.append(desc["id"])
    return ids


def make_clients(base: str) -> list[Any]:
    """100 clients, one keep-alive connection each. One SSL context is shared: httpx otherwise builds one
    per client (~50 ms each here), which is set-up cost, not lookup cost."""
    import ssl

    import httpx

    context = ssl.create_default_context()
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    return [
        httpx.AsyncClient(base_url=base, limits=limits, timeout=10.0, verify=context) for _ in range(CLIENTS)
    ]


async def run_phase(
    clients: list[Any], ids: list[str], seconds: float, interval: float | None
) -> dict[str, Any]:
    """Run the clients for ``seconds``: closed loop (``interval`` None) or one lookup per ``interval`` each."""
    import httpx

    from registry.identifiers import b64url_encode

    lat: dict[str, list[float]] = {"by_id": [], "by_capability": []}
    server_ms: list[float] = []
    errors = 0
    stop_at = time.monotonic() + seconds
    rng = random.Random(7)

    async def one_client(k: int, client: httpx.AsyncClient) -> None:
        nonlocal errors
        i = k
        next_at = time.monotonic() + (rng.random() * interval if interval else 0.0)
        while True:
            if interval:
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at += interval
            if time.monotonic() >= stop_at:
                return
            i += 1
            if i % 2:
                kind, url, params = "by_id", f"/shell-descriptors/{b64url_encode(ids[i % len(ids)])}", None
            else:
                kind, url, params = (
                    "by_capability",
                    "/shell-descriptors",
                    {"capability": CAPABILITIES[i % 10]},
                )
            t0 = time.perf_counter()
            try:
                response = await client.get(url, params=params)
                ok = response.status_code == 200
                if ok and kind == "by_capability":
                    ok = len(response.json()["result"]) > 0
                timing = response.headers.get("server-timing", "")
                if "dur=" in timing:
                    server_ms.append(float(timing.split("dur=", 1)[1]))
            except httpx.HTTPError:
                ok = False
            elapsed = time.perf_counter() - t0
            if ok:
                lat[kind].append(elapsed)
            else:
                errors += 1

    started = time.monotonic()
    await asyncio.gather(*(one_client(k, c) for k, c in enumerate(clients)))
    wall = time.monotonic() - started
    everything = lat["by_id"] + lat["by_capability"]

    def ms(values: list[float], q: float) -> float:
        return round(pct(values, q) * 1000, 3)

    return {
        "lookups": len(everything),
        "errors": errors,
        "lookups_per_s": round(len(everything) / wall, 1),
        "p50_ms": ms(everything, 50),
        "p99_ms": ms(everything, 99),
        "by_id_p50_ms": ms(lat["by_id"], 50),
        "by_capability_p50_ms": ms(lat["by_capability"], 50),
        "server_p50_ms": round(pct(server_ms, 50), 3),
        "server_p99_ms": round(pct(server_ms, 99), 3),
    }


async def run_raw_phase(port: int, ids: list[str], seconds: float, rate: float) -> dict[str, Any]:
    """The same paced by-id lookups from 100 minimal HTTP/1.1 keep-alive clients (asyncio streams, no httpx):
    separates the registry + loopback share of the latency from the httpx client's own cost."""
    from registry.identifiers import b64url_encode

    lat: list[float] = []
    errors = 0
    interval = CLIENTS / rate
    stop_at = time.monotonic() + seconds
    rng = random.Random(11)

    async def one_client(k: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        next_at = time.monotonic() + rng.random() * interval
        i = k
        try:
            while True:
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at += interval
                if time.monotonic() >= stop_at:
                    return
                i += 1
                path = f"/shell-descriptors/{b64url_encode(ids[i % len(ids)])}"
                t0 = time.perf_counter()
                writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                if head.startswith(b"HTTP/1.1 200"):
                    lat.append(time.perf_counter() - t0)
                else:
                    errors += 1
        finally:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*(one_client(k) for k in range(CLIENTS)))
    wall = time.monotonic() - started
    return {
        "offered_per_s": round(rate, 1),
        "lookups_per_s": round(len(lat) / wall, 1),
        "p50_ms": round(pct(lat, 50) * 1000, 3),
        "p99_ms": round(pct(lat, 99) * 1000, 3),
        "errors": errors,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    tmp = tempfile.TemporaryDirectory(prefix="bench-registry-")
    db_url = args.db_url or f"sqlite:///{Path(tmp.name) / 'registry.sqlite'}"
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(port), db_url], cwd=ROOT)  # noqa: ASYNC220
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(base, time.monotonic() + 20)
        ids = await populate(base, args.descriptors)
        clients = make_clients(base)
        try:
            await run_phase(clients, ids, 1.0, None)  # warm-up: connections open, caches filled
            saturation = await run_phase(clients, ids, args.seconds, None)
            capacity = float(saturation["lookups_per_s"])
            paced: dict[str, Any] = {}
            for share in args.loads:
                rate = max(10.0, share * capacity)
                phase = await run_phase(clients, ids, args.seconds, CLIENTS / rate)
                phase["offered_per_s"] = round(rate, 1)
                paced[f"{round(share * 100)}%"] = phase
        finally:
            await asyncio.gather(*(c.aclose() for c in clients))
        raw = {f"{rate:g}/s": await run_raw_phase(port, ids, args.seconds, rate) for rate in args.raw_rates}
    finally:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        tmp.cleanup()
    db = "postgresql" if args.db_url and "postgres" in args.db_url else "sqlite"
    return {
        "saturation": saturation,
        "paced": paced,
        "raw_client_probe": raw,
        "db": db,
        "descriptors": args.descriptors,
        "clients": CLIENTS,
    }


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve_child(int(sys.argv[2]), sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="duration of each phase")
    parser.add_argument("--descriptors", type=int, default=200)
    parser.add_argument("--db-url", default=None, help="registry database (default: SQLite in a temp dir)")
    parser.add_argument(
        "--loads",
        type=float,
        nargs="+",
        default=[0.2, 0.4, 0.6, 0.8],
        help="paced phases, shares of capacity",
    )
    parser.add_argument(
        "--raw-rates",
        type=float,
        nargs="*",
        default=[100.0, 1000.0, 3000.0],
        help="lookups/s for the minimal-client probe (by id); none to skip",
    )
    args = parser.parse_args()
    loop = use_uvloop()
    result = asyncio.run(main_async(args))
    result["loop"] = loop
    result["machine"] = machine()

    print(
        f"registry lookups: {CLIENTS} concurrent httpx clients (one keep-alive connection each), loopback, "
        f"{result['db']}, {args.descriptors} descriptors, {args.seconds:g} s per phase, {loop}; "
        "half by id, half by capability"
    )
    header = (
        f"{'phase':<14}{'offered/s':>10}{'lookups/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'id p50':>8}{'cap p50':>8}"
        f"{'srv p50':>9}{'srv p99':>9}{'errors':>7}"
    )
    print(header)
    print("-" * len(header))
    rows = [("saturation", result["saturation"])] + [(f"paced {k}", v) for k, v in result["paced"].items()]
    for name, r in rows:
        print(
            f"{name:<14}{r.get('offered_per_s', '-'):>10}{r['lookups_per_s']:>10}{r['p50_ms']:>9}{r['p99_ms']:>9}"
            f"{r['by_id_p50_ms']:>8}{r['by_capability_p50_ms']:>8}{r['server_p50_ms']:>9}{r['server_p99_ms']:>9}"
            f"{r['errors']:>7}"
        )
    for name, r in result["raw_client_probe"].items():
        print(
            f"{'raw ' + name:<14}{r['offered_per_s']:>10}{r['lookups_per_s']:>10}{r['p50_ms']:>9}{r['p99_ms']:>9}"
            f"{'':>8}{'':>8}{'':>9}{'':>9}{r['errors']:>7}"
        )
    print("(raw = 100 minimal asyncio HTTP/1.1 clients, by-id lookups only: the registry + loopback share)")
    errors = sum(r["errors"] for _, r in rows) + sum(r["errors"] for r in result["raw_client_probe"].values())
    met = [name for name, r in rows if r["p50_ms"] <= TARGET_P50_MS]
    paced_p50 = statistics.median(r["p50_ms"] for _, r in rows[1:])
    result["summary"] = {
        "capacity_lookups_per_s": result["saturation"]["lookups_per_s"],
        "paced_median_p50_ms": paced_p50,
        "registry_side_median_p50_ms": statistics.median(r["server_p50_ms"] for _, r in rows),
        "target_p50_ms": TARGET_P50_MS,
        "target_met_in": met,
        "raw_client_p50_ms": {k: v["p50_ms"] for k, v in result["raw_client_probe"].items()},
        "errors": errors,
    }
    print(
        f"capacity {result['saturation']['lookups_per_s']} lookups/s; median of the paced p50s "
        f"{paced_p50:.3f} ms; registry-side p50 {result['summary']['registry_side_median_p50_ms']:.3f} ms; "
        f"p50 <= {TARGET_P50_MS:g} ms met in: {', '.join(met) or 'none'}; errors: {errors}"
    )
    m = result["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['implementation']} {m['python']}, {m['os']}")
    print(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
