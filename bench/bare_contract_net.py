"""The floor under the negotiation benchmark: a bare-bones contract net written directly on gmqtt.

Issue 11 measures twinbid against "a bare-bones contract net written directly on gmqtt, with no
persistence, no AAS and no state machine". That figure depends on the machine as much as
twinbid's does, so the negotiation benchmark runs this net on the same reference workload,
through the same kind of private mosquitto, in the same session, and reports twinbid's figures
as ratios to it.

The net, per step: the product publishes a call for proposals (QoS 1) on its capability's topic;
each of the k resources offering it answers with a proposal (its cost rate as price); when all k
have answered the product accepts the cheapest (ties by name) and rejects the others; the winner
sends ``informConfirm`` and, the processing time being zero, ``inform`` (done); on the inform the
product calls for its next step. 2k + 3 messages per step, like twinbid's. Latency: call for
proposals to ``informConfirm``, as twinbid's. One gmqtt connection per agent (as twinbid), gmqtt's
own acknowledgement (PUBACK before the callback), orjson payloads, nothing written anywhere.

    python bench/bare_contract_net.py [--k 5] [--processes 1] [--products 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gmqtt
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_workload import N_RES, STEPS, capability, cost_rate, offered_by


@dataclass
class _Counts:
    sent: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    first_call: float | None = None
    last_done: float | None = None
    steps: int = 0


class _Agent:
    """One gmqtt connection; publishes QoS 1 and retries later when gmqtt's window is full."""

    def __init__(self, name: str, counts: _Counts) -> None:
        self.name = name
        self.counts = counts
        self.client = gmqtt.Client(f"bare-{name}")
        self.client.on_message = self._on_message

    async def connect(self, port: int, topics: list[str]) -> None:
        await self.client.connect("127.0.0.1", port, keepalive=60)
        for t in topics:
            self.client.subscribe(t, qos=1)

    def publish(self, topic: str, body: dict[str, Any]) -> None:
        self.send(topic, self.encode(topic, body))

    def send(self, topic: str, payload: bytes) -> None:
        try:
            self.client.publish(topic, payload, qos=1)
        except OverflowError:  # more in flight than the broker's receive maximum: a moment later
            asyncio.get_running_loop().call_later(0.001, self.send, topic, payload)
            return
        self.counts.sent += 1

    def encode(self, topic: str, body: dict[str, Any]) -> bytes:
        """The wire form of a message (bench_floor.py puts VDI/VDE 2193 frames here)."""
        return orjson.dumps(body)

    def decode(self, payload: bytes) -> dict[str, Any]:
        return orjson.loads(payload)

    def _on_message(self, _client: Any, topic: str, payload: bytes, _qos: int, _props: Any) -> int:
        self.handle(self.decode(payload))
        return 0

    def handle(self, msg: dict[str, Any]) -> None:
        raise NotImplementedError


class _Resource(_Agent):
    def __init__(self, r: int, k: int, counts: _Counts) -> None:
        super().__init__(f"r{r}", counts)
        self.r = r
        self.caps = offered_by(r, k)

    def topics(self) -> list[str]:
        return [f"bare/cfp/c{c}" for c in self.caps] + [f"bare/res/{self.name}"]

    def handle(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        reply_to = f"bare/prod/{msg['product']}"
        if kind == "cfp":
            price = cost_rate(self.r, msg["capability"])
            self.publish(
                reply_to, {"type": "proposal", "conv": msg["conv"], "resource": self.name, "price": price}
            )
        elif kind == "accept":
            self.publish(reply_to, {"type": "informConfirm", "conv": msg["conv"], "resource": self.name})
            self.publish(
                reply_to, {"type": "inform", "conv": msg["conv"], "resource": self.name, "done": True}
            )
        # a reject needs nothing: no hold is kept


class _Product(_Agent):
    def __init__(self, p: int, k: int, counts: _Counts, done: asyncio.Future) -> None:
        super().__init__(f"p{p}", counts)
        self.p, self.k, self.step = p, k, 0
        self.done = done
        self.proposals: list[tuple[int, str]] = []
        self.called_at = 0.0

    def topics(self) -> list[str]:
        return [f"bare/prod/{self.name}"]

    def call(self) -> None:
        self.proposals = []
        self.called_at = time.perf_counter()
        if self.counts.first_call is None:
            self.counts.first_call = time.time()
        c = capability(self.p, self.step)
        body = {"type": "cfp", "conv": f"{self.name}-{self.step}", "product": self.name, "capability": c}
        self.publish(f"bare/cfp/c{c}", body)

    def handle(self, msg: dict[str, Any]) -> None:
        if msg["conv"] != f"{self.name}-{self.step}":
            return
        kind = msg["type"]
        if kind == "proposal":
            self.proposals.append((msg["price"], msg["resource"]))
            if len(self.proposals) == self.k:
                winner = min(self.proposals)[1]
                for _, r in self.proposals:
                    kind = "accept" if r == winner else "reject"
                    self.publish(f"bare/res/{r}", {"type": kind, "conv": msg["conv"], "product": self.name})
        elif kind == "informConfirm":
            self.counts.latencies_ms.append((time.perf_counter() - self.called_at) * 1000)
        elif kind == "inform":
            self.counts.steps += 1
            self.step += 1
            if self.step < STEPS:
                self.call()
            else:
                self.counts.last_done = time.time()
                if not self.done.done():
                    self.done.set_result(None)


async def _share(
    port: int,
    k: int,
    products: list[int],
    resources: list[int],
    ready: Any,
    go: Any,
    layers: tuple[str, ...] = (),
    workdir: str | None = None,
) -> dict:
    counts = _Counts()
    loop = asyncio.get_running_loop()
    resource_cls, product_cls, close = _Resource, _Product, None
    if layers:  # what a faithful implementation cannot leave out, added one by one (bench_floor.py)
        from bench_floor import layered

        resource_cls, product_cls, close = layered(layers, workdir, _Resource, _Product)
    res = [resource_cls(r, k, counts) for r in resources]
    prods = [product_cls(p, k, counts, loop.create_future()) for p in products]
    for a in [*res, *prods]:
        await a.connect(port, a.topics())
    await asyncio.sleep(0.3)  # the SUBACKs
    ready.set()
    await loop.run_in_executor(None, go.wait)
    for p in prods:
        p.call()
    if prods:
        await asyncio.wait_for(asyncio.gather(*(p.done for p in prods)), timeout=300)
    await asyncio.sleep(0.2)  # the last acknowledgements
    for a in [*res, *prods]:
        await a.client.disconnect()
    if close is not None:
        await close()
    return {
        "sent": counts.sent,
        "steps": counts.steps,
        "latencies_ms": counts.latencies_ms,
        "first_call": counts.first_call,
        "last_done": counts.last_done,
    }


def _share_process(out: Any, *args: Any) -> None:
    """A share in a process of its own: ``_share(*args)``, its figures put on ``out``."""
    out.put(asyncio.run(_share(*args)))


def run_bare(
    port: int,
    k: int,
    processes: int = 1,
    products: int = 100,
    layers: tuple[str, ...] = (),
    workdir: str | None = None,
) -> dict[str, Any]:
    """Run the net on a broker at 127.0.0.1:port; the figures as the negotiation benchmark's.
    ``layers`` (with a ``workdir`` for their files) adds bench_floor.py's layers."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    go = ctx.Event()
    procs, readies = [], []
    for i in range(processes):
        ready = ctx.Event()
        share_p = [p for p in range(products) if p % processes == i]
        share_r = [r for r in range(N_RES) if r % processes == i]
        proc = ctx.Process(
            target=_share_process,
            args=(out, port, k, share_p, share_r, ready, go, layers, workdir),
            daemon=True,
        )
        proc.start()
        procs.append(proc)
        readies.append(ready)
    for ready in readies:
        if not ready.wait(60):
            raise RuntimeError("a share of the bare contract net did not connect within 60 s")
    go.set()
    results = [out.get(timeout=360) for _ in procs]
    for proc in procs:
        proc.join(10)
    steps = sum(r["steps"] for r in results)
    lat = sorted(x for r in results for x in r["latencies_ms"])
    span = max(r["last_done"] for r in results if r["last_done"]) - min(
        r["first_call"] for r in results if r["first_call"]
    )
    return {
        "k": k,
        "processes": processes,
        "products": products,
        "steps": steps,
        "steps_per_s": round(steps / span, 1),
        "latency_p50_ms": round(statistics.median(lat), 2),
        "latency_p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2),
        "messages_per_step": round(sum(r["sent"] for r in results) / steps, 2),
    }


def main() -> None:
    from machineinfo import machine

    from protocol.mosquitto import MosquittoProcess

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--products", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, MosquittoProcess(Path(tmp), persistence=False) as mosq:
        print(
            json.dumps({"machine": machine(), **run_bare(mosq.port, args.k, args.processes, args.products)})
        )


if __name__ == "__main__":
    main()
