"""Helpers of the security and fuzz tests: a live plant in this process, and the fuzz tally.

``LivePlant`` starts what ``twinbid run`` starts - a broker with the run's accounts, the registry,
one node with every agent of a scenario - but leaves the test in charge: it can reach each agent's
inbound handler (``agent.on_raw``), read its counters, and talk to the broker with any account.

``Tally`` counts fuzz cases per surface and prints one line per surface
(``FUZZ surface=... cases=... rejected=... accepted=... crashed=0 hangs=0``), also appended as
JSON to ``$TWINBID_FUZZ_REPORT`` when that is set, so a run's figures can be quoted.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings

from agents.persistence import open_database
from agents.persistence.database import sqlite_url
from agents.runtime.agent import Agent
from agents.runtime.node import Node, NodeConfig
from protocol.broker import RunningBroker, start_broker
from protocol.credentials import Credentials
from protocol.frame import Message, MessageType, Role, make_message, parse_message
from protocol.mosquitto import MosquittoTLS
from protocol.recorder import Recorder
from protocol.tokens import RunTokens, new_secret
from protocol.transport import BrokerAddress, MqttTransport
from registry.service import RegistryServer
from scenarios.launcher import Plant, _start_products, _start_resources, offered_capabilities
from scenarios.schema import Scenario
from shopfloor.clock import make_clock


def fuzz_settings(cases: int) -> settings:
    """Hypothesis settings of every fuzz run: a fixed number of cases, reproducible (derandomized,
    no example database), no deadline or health checks (a live plant answers at its own pace)."""
    return settings(
        max_examples=cases,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )


class LivePlant:
    """A scenario's agents on one node, with a broker that enforces the run's accounts."""

    def __init__(
        self,
        scenario: Scenario,
        out: Path,
        *,
        broker: str | None = "mosquitto",
        auth: bool = True,
        tls: MosquittoTLS | None = None,
        clock: str = "virtual",
        time_scale: float = 1.0,
        record: bool = False,
        start_resources: bool = True,
    ) -> None:
        self.scenario = scenario
        self.start_resources = start_resources  # False: the caller runs them (on a node of its own)
        self.out = Path(out)
        self.broker_url = broker
        self.credentials = Credentials(scenario.namespace, self.out / "broker") if auth else None
        self.tls = tls
        self.clock_kind = clock
        self.time_scale = time_scale
        self.broker: RunningBroker | None = None
        self.registry: RegistryServer | None = None
        self.node: Node | None = None
        self.products: list[str] = []
        self.registry_url = ""
        self.record = record
        self.recorder: Recorder | None = None

    async def __aenter__(self) -> LivePlant:
        sc, out = self.scenario, self.out
        out.mkdir(parents=True, exist_ok=True)
        if self.credentials is not None:
            for r in sc.resources:
                self.credentials.add_agent(r.name, offered_capabilities(r))
            for p in sc.product_instances():
                self.credentials.add_agent(p.name)
            self.credentials.add_observer()
        self.broker = await asyncio.to_thread(
            lambda: start_broker(self.broker_url, out, credentials=self.credentials, tls=self.tls)
        )
        if self.record:  # what the broker delivered, through the observer account (messages.jsonl)
            recorder = Recorder(self.address(), sc.namespace, out / "messages.jsonl", client_id="recorder")
            self.recorder = await asyncio.to_thread(recorder.start)
        secret = new_secret()  # the run's: the node's agents write to the registry with its tokens
        self.registry = RegistryServer(
            sqlite_url(out / "registry.db"), tokens=RunTokens(secret, sc.namespace)
        )
        registry_url = self.registry_url = await self.registry.start()
        db_url = sqlite_url(out / "run.db")
        db = open_database(db_url)
        plant = Plant(
            sc, out, self.broker.address, registry_url, db_url, self.clock_kind, self.time_scale, None, 1
        )
        clock = make_clock(self.clock_kind, time_scale=self.time_scale)
        passwords = self.credentials.passwords if self.credentials is not None else {}
        self.node = Node(
            NodeConfig(
                sc.namespace, self.broker.address, registry_url, passwords=passwords, http_secret=secret
            ),
            clock,
            db,
        )
        await self.node.start()
        await clock.start()
        self.plant = plant
        if self.start_resources:
            await _start_resources(self.node, plant, 0, 1)
        self.products = await _start_products(self.node, plant, 0, 1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.node is not None:
            await self.node.stop()
            await self.node.clock.stop()
        if self.registry is not None:
            await self.registry.stop()
        if self.recorder is not None:
            await asyncio.to_thread(self.recorder.stop)
        if self.broker is not None:
            await asyncio.to_thread(self.broker.stop)

    def agent(self, name: str) -> Agent:
        assert self.node is not None
        return self.node.agents[name]

    def address(self, name: str | None = None) -> BrokerAddress:
        """The broker address with ``name``'s account (the observer's when None)."""
        assert self.broker is not None
        if self.credentials is None:
            return self.broker.address
        if name is None:
            return self.credentials.observer_address(self.broker.address)
        return self.credentials.address(self.broker.address, name)

    async def until_done(self, limit: float = 60.0) -> None:
        """Wait until every product twin finished (or fail the test)."""
        deadline = time.monotonic() + limit
        while True:
            if all(self.agent(p).finished for p in self.products):
                return
            if time.monotonic() > deadline:
                unfinished = [p for p in self.products if not self.agent(p).finished]
                raise AssertionError(f"products not finished after {limit}s: {unfinished}")
            await asyncio.sleep(0.05)

    def counter(self, kind: str) -> int:
        """Sum of one counter over every agent (e.g. ``note:forged-sender``)."""
        assert self.node is not None
        return sum(a.counters.get(kind, 0) for a in self.node.agents.values())


#: Notes an agent writes when it refuses an input (agents/runtime/agent.py, the bidding machines).
REJECTION_NOTES = (
    "bad-topic",
    "bad-frame",
    "forged-sender",
    "wrong-receiver",
    "no-role",
    "not-participant",
    "wrong-product",
    "not-understood",
    "duplicate",
    "late",
    "out-of-sequence",
    "bad-elements",
    "stray-confirm",
)


def rejections(agents: list[Agent]) -> int:
    """Every refusal the agents counted (a note of a kind that means 'input not acted upon')."""
    total = 0
    for a in agents:
        # A copy first: the fuzzers read the counters from their own thread while the agents'
        # loop thread goes on counting (timers, messages still in flight), and a Python loop over
        # the live dict failed with "dictionary changed size during iteration" (CI, session 8).
        # dict() copies in one C call, which the GIL does not interrupt.
        for key, n in dict(a.counters).items():
            if key.startswith("note:") and key[5:] in REJECTION_NOTES:
                total += n
    return total


@dataclass
class Tally:
    """Fuzz cases of one surface: how many ran, were refused, accepted, crashed or hung."""

    surface: str
    cases: int = 0
    rejected: int = 0
    accepted: int = 0
    crashed: int = 0
    hangs: int = 0
    started: float = field(default_factory=time.monotonic)
    failures: list[str] = field(default_factory=list)

    def crash(self, what: str) -> None:
        self.crashed += 1
        if len(self.failures) < 20:
            self.failures.append(what)

    def report(self) -> dict[str, Any]:
        line = {
            "surface": self.surface,
            "cases": self.cases,
            "rejected": self.rejected,
            "accepted": self.accepted,
            "crashed": self.crashed,
            "hangs": self.hangs,
            "seconds": round(time.monotonic() - self.started, 2),
        }
        print("FUZZ " + " ".join(f"{k}={v}" for k, v in line.items()), flush=True)
        target = os.environ.get("TWINBID_FUZZ_REPORT")
        if target:
            with open(target, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        return line

    def check(self) -> None:
        """Report, then fail the test if anything crashed or hung."""
        self.report()
        assert self.crashed == 0 and self.hangs == 0, "\n".join(self.failures)


class Insider:
    """An insider: a client on the broker with an agent's own account (a second connection of it),
    publishing only where the broker lets that account publish, and reading that agent's inbox."""

    def __init__(self, plant: LivePlant, account: str) -> None:
        self.plant = plant
        self.ns = plant.scenario.namespace
        self.account = account
        self.aas_id = plant.agent(account).aas_id
        self.inbox: list[Message] = []
        self.transport: MqttTransport | None = None

    async def __aenter__(self) -> Insider:
        async def handler(topic: str, payload: bytes) -> None:
            try:
                self.inbox.append(parse_message(payload))
            except ValueError:
                pass

        self.transport = MqttTransport(
            f"{self.account}-x", self.plant.address(self.account), handler, connect_retries=1
        )
        await self.transport.connect()
        await self.transport.subscribe(f"i40/{self.ns}/to/{self.account}/+")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.transport is not None
        await self.transport.close(timeout=2)

    async def call(self, capability: str, elements: list[dict[str, Any]], **frame: Any) -> Message:
        msg = make_message(
            MessageType.CALL_FOR_PROPOSAL,
            sender=self.aas_id,
            sender_role=Role.REQUESTER,
            conversation_id=frame.pop("conversation_id", f"attack-{len(self.inbox)}-{id(elements)}"),
            elements=elements,
            **frame,
        )
        assert self.transport is not None
        await self.transport.publish(f"i40/{self.ns}/cfp/{capability}/{self.account}", msg.to_json())
        await self.transport.flush(5)
        return msg

    async def publish(self, topic_tail: str, msg: Message, copies: int = 1) -> None:
        assert self.transport is not None
        payload = msg.to_json()
        for _ in range(copies):
            await self.transport.publish(f"i40/{self.ns}/{topic_tail}/{self.account}", payload)
        await self.transport.flush(30)

    async def accept_proposals(self, calls: list[Message], wait: float) -> list[Message]:
        """Accept every proposal that answers one of `calls` within `wait` seconds (what a thief
        would do)."""
        accepted: list[Message] = []
        ids = {c.id for c in calls}
        loop = asyncio.get_running_loop()
        end = loop.time() + wait
        while loop.time() < end:
            for m in self.inbox:
                if m.type is MessageType.PROPOSAL and m.in_reply_to in ids and m not in accepted:
                    accept = make_message(
                        MessageType.ACCEPT_PROPOSAL,
                        sender=self.aas_id,
                        sender_role=Role.REQUESTER,
                        conversation_id=m.conversation,
                        receiver=m.sender,
                        in_reply_to=m.id,
                    )
                    bidder = next(n for n, a in self.plant.node.agents.items() if a.aas_id == m.sender)
                    assert self.transport is not None
                    await self.transport.publish(
                        f"i40/{self.ns}/to/{bidder}/{self.account}", accept.to_json()
                    )
                    accepted.append(m)
            await asyncio.sleep(0.05)
        return accepted


class PlantThread:
    """A ``LivePlant`` on an event loop of its own thread, so synchronous tests (hypothesis,
    schemathesis) can drive it: ``call(coroutine)`` runs a coroutine there and waits for it.

    Exceptions that nothing awaited (a task of an agent that failed in the background) are
    collected in ``loop_errors`` by the loop's exception handler: the fuzz suite counts them as
    crashes too.
    """

    def __init__(self, plant: LivePlant, *, extra: Any = None) -> None:
        self.plant = plant
        self.extra = extra  # async callable(plant) -> anything, run after the plant is up
        self.extra_result: Any = None
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[str] = []
        self._thread: Any = None

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, (ConnectionError, asyncio.CancelledError)):
            return
        self.loop_errors.append(f"{context.get('message')}: {exc!r}")

    def start(self, timeout: float = 120.0) -> PlantThread:
        import threading

        self.loop.set_exception_handler(self._handle)
        self._thread = threading.Thread(target=self.loop.run_forever, name="live-plant", daemon=True)
        self._thread.start()
        self.call(self.plant.__aenter__(), timeout)
        if self.extra is not None:
            self.extra_result = self.call(self.extra(self.plant), timeout)
        return self

    def call(self, coro: Any, timeout: float) -> Any:
        """Run ``coro`` on the plant's loop; ``TimeoutError`` after ``timeout`` seconds (a hang)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def stop(self) -> None:
        try:
            self.call(self.plant.__aexit__(None, None, None), 60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
