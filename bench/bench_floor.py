"""How fast can a faithful implementation be here? The bare net with twinbid's guarantees added one by one.

Issue 11 sets twinbid's throughput target against a bare-bones contract net (bare_contract_net.py:
no frames, no persistence, no log). twinbid reaches a small fraction of that net. This benchmark
asks how much of the gap any implementation that keeps the architecture's guarantees must pay,
by adding to the same net, on the same workload and broker, in the same session, the least each
guarantee needs, written as cheaply as this stack allows:

- ``frames``: every message is a VDI/VDE 2193-1 frame with its interaction elements as AAS
  submodel-element JSON (twinbid's own codec, ``protocol.frame`` and ``protocol.elements``:
  the standard's wire form, built without validation and parsed with it, as a receiver must;
  the rung "+ frames, read unchecked" reads them with orjson alone, to show what checking costs);
- ``journal``: write before you send — every message received (inbox row, its conversation's
  state) and every message to send (outbox row) is committed to one SQLite database (WAL,
  synchronous=NORMAL, as twinbid) before a message goes out; raw ``sqlite3``, group commit on the
  event loop, one database for all processes as ``twinbid run`` has. (Cheaper than twinbid
  still: the MQTT acknowledgement goes out at once, not after the commit, and nothing is
  deduplicated on read.)
- ``recorder``: the negotiation log — a process of its own subscribed to every message, writing
  each with its receive time to a JSON Lines file.

Each rung is run ``--repeat`` times, alternately, and the medians printed; the last rung is twinbid
itself on the same workload (``bench_negotiation.one``: real launcher, persistence and AAS
documentation on). Nothing in the other rungs is twinbid's agent code: they are floors, so
twinbid's own cost is the gap between the top floor and twinbid, and a target above the top floor
cannot be met by any implementation that keeps these guarantees on this machine and stack.
Configurations: the reference workload at ``--k`` (default 5) in each of ``--processes``, and one
product alone with 10 bidders (light load; ``--no-alone`` leaves it out).

    python bench/bench_floor.py [--k 5] [--processes 1,2] [--products 100] [--repeat 3] [--no-alone] [--json]
    twinbid bench floor --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import multiprocessing as mp
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import gmqtt
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bare_contract_net import run_bare
from machineinfo import machine
from reference_workload import ALONE

from protocol.elements import Bid, Booking, Reason, StepCall, StepResult
from protocol.frame import MessageType, Role, make_message, parse_message

RUNGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("bare", ()),
    ("+ frames, read unchecked", ("frames", "unchecked")),
    ("+ frames", ("frames",)),
    ("+ frames + journal", ("frames", "journal")),
    ("+ frames + journal + recorder", ("frames", "journal", "recorder")),
    ("twinbid", ("twinbid",)),  # the real thing, through the launcher (bench_negotiation.one)
)

_TYPES = {
    "cfp": MessageType.CALL_FOR_PROPOSAL,
    "proposal": MessageType.PROPOSAL,
    "accept": MessageType.ACCEPT_PROPOSAL,
    "reject": MessageType.REJECT_PROPOSAL,
    "informConfirm": MessageType.INFORM_CONFIRM,
    "inform": MessageType.INFORM,
}
_NAMES = {v: k for k, v in _TYPES.items()}


def _aas(name: str) -> str:
    return f"https://twinbid.dev/ids/bench/{name}/aas"


def _short(aas_id: str) -> str:
    return aas_id.rsplit("/", 2)[-2]


def _frame(name: str, topic: str, body: dict[str, Any]) -> bytes:
    """The bare net's message as the standard's frame, with the content twinbid's messages carry."""
    kind = body["type"]
    # A call goes to its capability's topic; every other message to its receiver's own.
    receiver = None if kind == "cfp" else _aas(topic.rsplit("/", 1)[-1])
    reply_by = None
    role = Role.REQUESTER if kind in ("cfp", "accept", "reject") else Role.PROVIDER
    if kind == "cfp":
        reply_by = int(time.time() * 1000) + 5000
        elements = StepCall(
            product=body["product"],
            step=1,
            capability=f"c{body['capability']}",
            location="entry",
            release=0.0,
        ).to_json_elements()
    elif kind == "proposal":
        elements = Bid(
            resource=name, capability="c0", earliest_start=0.0, completion=0.0, duration=0.0, setup=0.0,
            transport=0.0, price=float(body["price"]), valid_until=10.0, location=name,
        ).to_json_elements()  # fmt: skip
    elif kind in ("accept", "reject"):
        elements = [] if kind == "accept" else Reason("not-selected").to_json_elements()
    elif kind == "informConfirm":
        elements = Booking(resource=name, start=0.0, completion=0.0).to_json_elements()
    else:
        elements = StepResult(resource=name, started=0.0, finished=0.0, location=name).to_json_elements()
    return make_message(
        _TYPES[kind], sender=_aas(name), sender_role=role, conversation_id=body["conv"],
        receiver=receiver, reply_by=reply_by, elements=elements,
    ).to_json()  # fmt: skip


def _body(kind: str, conv: str, message_id: str, sender: str, **content: Any) -> dict[str, Any]:
    """The bare net's message from what a reader took out of a frame: the product answers the
    resources, the resources answer the product, and the sender is the one named."""
    body: dict[str, Any] = {"type": kind, "conv": conv, "id": message_id, **content}
    if kind in ("accept", "reject"):
        body["product"] = sender
    elif kind in ("informConfirm", "inform"):
        body["resource"] = sender
    return body


def _unframe_unchecked(payload: bytes) -> dict[str, Any]:
    """The frame read as a receiver that trusts every sender would: no validation at all."""
    data = orjson.loads(payload)
    frame = data["frame"]
    kind = _NAMES[MessageType(frame["type"])]
    content: dict[str, Any] = {}
    if kind in ("cfp", "proposal"):
        items = data["interactionElements"][0]["value"]
        values = {p["idShort"]: p.get("value") for p in items}
        if kind == "cfp":  # the capability is the element of modelType Capability
            capability = next(p["idShort"] for p in items if p.get("modelType") == "Capability")
            content = {"product": values["product"], "capability": int(capability[1:])}
        else:
            content = {"resource": values["resource"], "price": float(values["price"])}
    sender = _short(frame["sender"]["identification"]["id"])
    return _body(kind, frame["conversationId"], frame["messageId"], sender, **content)


def _unframe(payload: bytes) -> dict[str, Any]:
    msg = parse_message(payload)
    kind = _NAMES[msg.type]
    content: dict[str, Any] = {}
    if kind == "cfp":
        call = StepCall.from_json_elements(msg.interactionElements)
        content = {"product": call.product, "capability": int(call.capability[1:])}
    elif kind == "proposal":
        bid = Bid.from_json_elements(msg.interactionElements)
        content = {"resource": bid.resource, "price": bid.price}
    return _body(kind, msg.conversation, msg.id, _short(msg.sender), **content)


class _Journal:
    """Group commit on the event loop: rows staged by the handlers, messages held until their commit.

    On the loop, not in a writer thread: with SQLite that was faster both ways (k = 5 two
    processes, 3 alternating runs: 579 against 470 steps/s; one product alone: p50 4.4 against
    6.2 ms), as twinbid's own journal found for SQLite before."""

    def __init__(self, path: str) -> None:
        self._rows: list[tuple[str, tuple]] = []
        self._held: list[Callable[[], None]] = []
        self._task: asyncio.Task | None = None
        # The processes take turns through a file lock, as twinbid's journals do: SQLite's own busy
        # handler sleeps in steps of milliseconds.
        self._lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT)
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # as twinbid: a commit survives a killed process
        conn.execute("PRAGMA busy_timeout=30000")
        for ddl in (
            "inbox (agent TEXT, id TEXT, conv TEXT, body BLOB, PRIMARY KEY (agent, id))",
            "outbox (agent TEXT, seq INTEGER, topic TEXT, body BLOB, PRIMARY KEY (agent, seq))",
            "conversation (agent TEXT, conv TEXT, state BLOB, PRIMARY KEY (agent, conv))",
        ):
            conn.execute(f"CREATE TABLE IF NOT EXISTS {ddl}")
        self._conn = conn

    def stage(self, sql: str, row: tuple) -> None:
        self._rows.append((sql, row))
        self._kick()

    def after_commit(self, action: Callable[[], None]) -> None:
        self._held.append(action)
        self._kick()

    def _kick(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._rows or self._held:
            rows, held = self._rows, self._held
            self._rows, self._held = [], []
            self._write(rows)
            for action in held:
                action()
            await asyncio.sleep(0)  # what the handlers stage meanwhile is the next batch

    def _write(self, rows: list[tuple[str, tuple]]) -> None:
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            for sql, row in rows:
                self._conn.execute(sql, row)
            self._conn.execute("COMMIT")
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)

    async def close(self) -> None:
        if self._task is not None:
            await self._task
        self._conn.close()
        os.close(self._lock)


def layered(
    layers: tuple[str, ...], workdir: str | None, resource_cls: type, product_cls: type
) -> tuple[type, type, Callable[[], Awaitable[None]] | None]:
    """The bare net's two agent classes with ``layers`` added (called in each share's process)."""
    frames, journal = "frames" in layers, None
    unframe = _unframe_unchecked if "unchecked" in layers else _unframe
    if "journal" in layers:
        journal = _Journal(str(Path(workdir or ".") / "floor.db"))

    class Layered:
        name: str
        counts: Any

        def encode(self, topic: str, body: dict[str, Any]) -> bytes:
            return _frame(self.name, topic, body) if frames else orjson.dumps(body)

        def decode(self, payload: bytes) -> dict[str, Any]:
            return unframe(payload) if frames else orjson.loads(payload)

        def send(self, topic: str, payload: bytes) -> None:
            if journal is None:
                super().send(topic, payload)  # type: ignore[misc]
                return
            self._seq = getattr(self, "_seq", 0) + 1
            journal.stage("INSERT INTO outbox VALUES (?, ?, ?, ?)", (self.name, self._seq, topic, payload))
            journal.after_commit(lambda: super(Layered, self).send(topic, payload))

        def _on_message(self, client: Any, topic: str, payload: bytes, qos: int, props: Any) -> int:
            body = self.decode(payload)
            if journal is not None:
                key = body.get("id") or f"{topic}:{hash(payload)}"
                journal.stage(
                    "INSERT OR IGNORE INTO inbox VALUES (?, ?, ?, ?)", (self.name, key, body["conv"], payload)
                )
            self.handle(body)
            if journal is not None:
                journal.stage(
                    "INSERT OR REPLACE INTO conversation VALUES (?, ?, ?)",
                    (self.name, body["conv"], orjson.dumps(self.state(body))),
                )
            return 0

        def state(self, body: dict[str, Any]) -> dict[str, Any]:
            """What the agent would need to resume this conversation."""
            return {"conv": body["conv"], "last": body["type"], "proposals": getattr(self, "proposals", None)}

    resource = type("LayeredResource", (Layered, resource_cls), {})
    product = type("LayeredProduct", (Layered, product_cls), {})
    return resource, product, (journal.close if journal is not None else None)


def _recorder_main(port: int, path: str, ready: Any, stop: Any) -> None:
    out = open(path, "ab", buffering=1 << 16)

    async def main() -> None:
        client = gmqtt.Client("floor-recorder")

        def on_message(_c: Any, topic: str, payload: bytes, _qos: int, _p: Any) -> int:
            received = time.time() * 1000
            out.write(
                b'{"received_ms":%.3f,"topic":%s,"message":%s}\n' % (received, orjson.dumps(topic), payload)
            )
            return 0

        client.on_message = on_message
        await client.connect("127.0.0.1", port, keepalive=60)
        client.subscribe("bare/#", qos=1)
        await asyncio.sleep(0.3)
        ready.set()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, stop.wait)
        await asyncio.sleep(0.3)
        await client.disconnect()

    try:
        asyncio.run(main())
    finally:
        out.close()


def run_floor(
    port: int,
    k: int,
    processes: int,
    layers: tuple[str, ...],
    products: int = 100,
    workdir: str | None = None,
) -> dict[str, Any]:
    """One run of the net with ``layers`` on a broker at 127.0.0.1:port; its database and log go
    to ``workdir`` when given (kept), else to a temporary folder."""
    with contextlib.ExitStack() as stack:
        work = workdir or stack.enter_context(tempfile.TemporaryDirectory())
        recorder = None
        if "recorder" in layers:
            ctx = mp.get_context("spawn")
            ready, stop = ctx.Event(), ctx.Event()
            recorder = ctx.Process(target=_recorder_main, args=(port, f"{work}/messages.jsonl", ready, stop))
            recorder.start()
            if not ready.wait(60):
                raise RuntimeError("the floor's recorder did not connect within 60 s")
        try:
            share_layers = tuple(layer for layer in layers if layer != "recorder")
            return run_bare(port, k, processes, products, layers=share_layers, workdir=work)
        finally:
            if recorder is not None:
                stop.set()
                recorder.join(30)


def main() -> None:
    from protocol.mosquitto import MosquittoProcess

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--products", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-alone", action="store_true", help="leave out one product alone with 10 bidders")
    ap.add_argument("--no-twinbid", action="store_true", help="leave out twinbid itself (the last rung)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rungs = tuple(r for r in RUNGS if not (args.no_twinbid and r[0] == "twinbid"))
    configs = [(args.k, int(p), args.products) for p in args.processes.split(",")]
    if not args.no_alone:
        configs.append(ALONE)
    runs: dict[tuple[str, tuple[int, int, int]], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp, MosquittoProcess(Path(tmp), persistence=False) as mosq:
        for i in range(args.repeat):
            order = rungs if i % 2 == 0 else tuple(reversed(rungs))  # alternate: the machine drifts
            for config in configs:
                k, p, products = config
                for label, layers in order:
                    if layers == ("twinbid",):
                        from bench_negotiation import one  # its own private mosquitto, as configured there

                        r = one(k, p, products)
                    else:
                        r = run_floor(mosq.port, k, p, layers, products)
                    runs.setdefault((label, config), []).append(r)
                    print(
                        f"  run {i + 1}: {label:30s} k={k} procs={p} products={products}: "
                        f"{r['steps_per_s']:8.1f} steps/s, p50 {r['latency_p50_ms']} ms",
                        file=sys.stderr,
                    )
    rows = []
    for config in configs:
        for label, _ in rungs:
            rs = runs[(label, config)]
            rows.append({
                "rung": label, "k": config[0], "processes": config[1], "products": config[2],
                "steps_per_s": statistics.median(r["steps_per_s"] for r in rs),
                "latency_p50_ms": statistics.median(r["latency_p50_ms"] for r in rs),
                "latency_p99_ms": statistics.median(r["latency_p99_ms"] for r in rs),
                "messages_per_step": rs[0]["messages_per_step"],
            })  # fmt: skip
    info = machine()
    print(f"machine: {info}")
    print(f"medians of {args.repeat} run(s); 10 steps a product; the last rows: one product alone")
    print(
        f"  {'rung':32s} {'k':>3s} {'procs':>5s} {'products':>8s} {'steps/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s}"
    )
    for row in rows:
        print(
            f"  {row['rung']:32s} {row['k']:3d} {row['processes']:5d} {row['products']:8d}"
            f" {row['steps_per_s']:9.1f} {row['latency_p50_ms']:8.2f} {row['latency_p99_ms']:8.2f}"
        )
    if args.json:
        print(json.dumps({"machine": info, "repeat": args.repeat, "rungs": rows}))


if __name__ == "__main__":
    main()
