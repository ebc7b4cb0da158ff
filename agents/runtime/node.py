"""One agent process: the services every agent in it shares.

A node owns the clock, the journal (group commit to the run database), the AAS
server hosting the shells of all its agents, the directory (registry cache),
and one MQTT connection per agent. It also does the virtual clock's bookkeeping:
a message counts as in flight from the moment it is staged until the local
agent it was sent to has handled it, so simulated time never jumps while the
plant is still talking.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from basyx.aas import model
from httpx_aiohttp import AiohttpTransport

from agents.aas.client import AasClient
from agents.aas.ids import plant_id_prefix
from agents.aas.server import AasServer
from agents.aas.store import AasStore
from agents.persistence import Database, Journal
from agents.persistence.reader import StateReader
from agents.persistence.tables import AgentRecord
from agents.runtime.agent import Agent
from agents.runtime.directory import Directory, Entry
from agents.runtime.gc_policy import tune_for_agents
from agents.runtime.registrar import Registrar, log_failure
from protocol.elements import capability_semantic_id
from protocol.frame import DEFAULT_MAX_MESSAGE_BYTES
from protocol.message_cache import MessageCache
from protocol.signing import public_key_text
from protocol.tokens import RunTokens, new_secret
from protocol.topics import matches
from protocol.transport import BrokerAddress, MqttTransport
from registry.client import RegistryClient
from registry.descriptors import SIGNING_KEY_EXT, shell_descriptor
from shopfloor.clock import Clock

log = logging.getLogger(__name__)

EventHook = Callable[[Agent, str, str | None, int | None, dict[str, Any]], None]


@dataclass
class NodeConfig:
    ns: str
    broker: BrokerAddress
    registry_url: str | None = None
    passwords: dict[str, str] = field(default_factory=dict)  # agent name -> MQTT password
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_inflight: int = 16
    registry_ttl: float = 300.0  # renewed every 100 s: each renewal is a registry write
    aas_host: str = "127.0.0.1"
    aas_port: int = 0
    #: the run's token secret (protocol/tokens.py), shared by every process of the run; None: one
    #: made for this node alone (its AAS server then accepts writes from its own agents only)
    http_secret: str | None = None
    #: what the agents' Ed25519 keys derive from (protocol/signing.py), kept by the run's record
    #: across resumes; None: the token secret
    signing_secret: str | None = None
    protect_reads: bool = False  # True: reads of the AAS server need a run's token too


class Node:
    def __init__(self, config: NodeConfig, clock: Clock, db: Database) -> None:
        self.config = config
        self.ns = config.ns
        #: the id space of this plant's own agents (a vendor's product keeps its vendor's ids)
        self.plant_ids = plant_id_prefix(config.ns)
        self.clock = clock
        self.db = db
        self.journal = Journal(db)
        self.state = StateReader(db)  # what agents read back at start (preloaded for a takeover)
        self.store = AasStore()
        secret = config.http_secret or new_secret()
        self.tokens = RunTokens(secret, config.ns)
        #: what the agents' Ed25519 keys are derived from (protocol/signing.py)
        self.signing_secret = config.signing_secret or secret
        self.server = AasServer(self.store, tokens=self.tokens, protect_reads=config.protect_reads)
        self.registry = (
            RegistryClient(config.registry_url, tokens=self.tokens) if config.registry_url else None
        )
        self.directory = Directory(self.registry)
        # Registrations in batches, leases renewed together (agents/runtime/registrar.py).
        self.registrar = Registrar(self.registry, config.registry_ttl) if self.registry else None
        # Parses inbound payloads (size limit first), once per payload for all agents here.
        self.messages = MessageCache(config.max_message_bytes)
        self.agents: dict[str, Agent] = {}
        self.transports: dict[str, MqttTransport] = {}
        self._queues: dict[str, asyncio.Queue] = {}
        self._publishers: dict[str, asyncio.Task] = {}
        self._filters: list[tuple[str, str]] = []  # (topic filter, agent name) of local agents
        self._in_flight = 0
        # A virtual clock split over processes (shopfloor/barrier.py) counts the deliveries this
        # process sends to agents in other processes and receives from them; which filters live
        # elsewhere is known once every process has started (until then topics are kept).
        self._split = hasattr(clock, "count_sent")
        self._remote_filters: list[str] | None = None
        self._unrouted: list[str] = []
        if self._split:
            clock.on_table = self._set_peers
        # httpx's API on aiohttp's connection pool: httpcore's pool polled every idle connection on
        # each request, ~2.8 ms of CPU a request with a few dozen in flight (the resources' PATCHes
        # of step documentation into products' AAS in other processes); aiohttp's ~0.3 ms.
        # (With a transport given, httpx leaves its pool limits to the transport.)
        transport = AiohttpTransport(limits=httpx.Limits(max_connections=64))
        self._http = httpx.AsyncClient(timeout=10.0, transport=transport)
        self._aas_clients: dict[tuple[str, str], AasClient] = {}
        self.event_hooks: list[EventHook] = []
        self.finished_hooks: list[Callable[[Agent], None]] = []
        self.first_publish_hooks: list[Callable[[int], None]] = []  # recovery time: the first action
        self._published_any = False
        self.base_url = ""

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        tune_for_agents()
        self.journal.start()
        self.base_url = await self.server.start(self.config.aas_host, self.config.aas_port)

    async def stop(self) -> None:
        # Every agent at once: their roles stop, one commit covers what they staged, then their
        # connections close, 64 at a time (it went agent by agent, a commit and a disconnect
        # each, and rebuilt the topic filter list for each: quadratic in a swarm of thousands).
        agents = list(self.agents.values())
        for agent in agents:
            await agent.on_stop()
        await self.journal.commit()
        limit = asyncio.Semaphore(64)

        async def detach(agent: Agent) -> None:
            async with limit:
                await self._detach(agent, everyone=True)

        await asyncio.gather(*(detach(a) for a in agents))
        self._filters = []
        await self.journal.close()
        await self.server.stop()
        for c in self._aas_clients.values():
            await c.aclose()
        await self._http.aclose()
        if self.registrar:
            await self.registrar.close()
        if self.registry:
            await self.registry.aclose()

    async def add_agent(
        self, agent: Agent, *, capabilities: tuple[str, ...] = (), submodels: list[dict] = ()
    ) -> None:
        """Recover the agent's state, connect it, subscribe it, register it, start its roles."""
        name = agent.name
        self.agents[name] = agent
        entry = Entry(name, agent.aas_id, self.base_url, tuple(capabilities))
        self.directory.add(entry, local=True)
        restarted = self._mark_started(agent)
        self._queues[name] = asyncio.Queue()
        self._publishers[name] = asyncio.get_running_loop().create_task(
            self._publish_loop(agent), name=f"pub:{name}"
        )
        if restarted:
            # Before recovering: what the last incarnation decided goes out before anything this
            # one decides, and this one's messages continue its seq (the published watermark
            # relies on seq order).
            self._republish_unsent(agent)
        await agent.recover()
        filters = agent.topic_filters()
        self._filters += [(f, name) for f in filters]
        self.state.forget(name)  # everything read back is in the agent now
        password = self.config.passwords.get(name)
        broker = BrokerAddress(
            **{**self.config.broker.__dict__, "username": name if password else None, "password": password}
        )
        # A message is acknowledged to the broker once what it caused is committed, in one write
        # with the messages it caused (half the writes to the socket were PUBACKs of their own).
        transport = MqttTransport(
            name,
            broker,
            agent.on_raw,
            max_inflight=self.config.max_inflight,
            ack_after=self.journal.after_commit,
        )
        self.transports[name] = transport
        await transport.connect()
        await transport.subscribe(*filters)
        signing_key = self._publish_signing_key(agent)
        if self.registry:
            descriptor = shell_descriptor(
                aas_id=agent.aas_id,
                short_name=name,
                base_url=self.base_url,
                id_short=name.replace("-", "_") if name[0].isalpha() else f"a_{name.replace('-', '_')}",
                capabilities=[capability_semantic_id(c) for c in capabilities],
                submodels=list(submodels),
                namespace=self.ns,
                asset_type=agent.kind,
                extra_extensions={SIGNING_KEY_EXT: signing_key},
            )
            if restarted:
                # Its descriptor is still registered (the lease outlives a quick restart): renew it
                # in the background and resume at once.
                self.registrar.submit(descriptor).add_done_callback(log_failure)
            else:
                await self.registrar.register(descriptor)
        await agent.on_start()

    def _publish_signing_key(self, agent: Agent) -> str:
        """The agent's public key (protocol/signing.py), also as an extension of its shell."""
        key = public_key_text(self.signing_secret, agent.name)
        shell = self.store.get_shell(agent.aas_id)
        if shell is not None:
            for old in [e for e in shell.extension if e.name == SIGNING_KEY_EXT]:
                shell.extension.remove(old)
            shell.extension.add(
                model.Extension(SIGNING_KEY_EXT, value_type=model.datatypes.String, value=key)
            )
            self.store.changed(agent.aas_id)
        return key

    async def remove_agent(self, agent: Agent, *, deregister: bool = True) -> None:
        await agent.on_stop()
        await self.journal.commit()
        await self._detach(agent)
        if deregister and self.registry:
            await self.registry.deregister(agent.aas_id)

    async def _detach(self, agent: Agent, *, everyone: bool = False) -> None:
        """Publish what the agent has queued, then disconnect it and forget it."""
        queue = self._queues.get(agent.name)
        if queue is not None:
            await queue.join()
        task = self._publishers.pop(agent.name, None)
        if task:
            task.cancel()
        transport = self.transports.pop(agent.name, None)
        if transport:
            await transport.close()
        self._forget(agent, filters=not everyone)  # all of them going: filters cleared once

    def _forget(self, agent: Agent, *, filters: bool = True) -> None:
        """No more deliveries to it, no more lease renewals for it (a dead agent's lease runs
        out unless it restarts), not one of this node's agents any longer."""
        if filters:  # a pass over every agent's filters: once per agent would be quadratic
            self._filters = [(f, n) for f, n in self._filters if n != agent.name]
        if self.registrar:
            self.registrar.forget(agent.aas_id)
        self.agents.pop(agent.name, None)

    async def crash_agent(self, agent: Agent) -> None:
        """Drop an agent as a crash would: memory, timers, queued publications and connection gone.

        What it committed stays in the database; unpublished outbox rows go out after its restart.
        """
        agent.cancel_timers()
        for role in agent.roles:
            role.on_crash()
        task = self._publishers.pop(agent.name, None)
        if task:
            task.cancel()
        self._queues.pop(agent.name, None)
        transport = self.transports.pop(agent.name, None)
        if transport:
            with contextlib.suppress(Exception):
                await transport.close(timeout=0.05)
        self._forget(agent)
        self.store.remove_owner(agent.name)
        self.store.set_write_hook(agent.name, None)

    def _mark_started(self, agent: Agent) -> bool:
        """Was this agent here before (a restart)? The record goes through the journal: a
        synchronous write here would queue behind every other process's commits."""
        row = self.state.agent(agent.name)
        record = {
            "name": agent.name,
            "kind": agent.kind,
            "aas_id": agent.aas_id,
            "status": "running",
            "started_wall_ms": row.started_wall_ms
            if row
            else (self.clock.origin_epoch_ms if self.clock.kind != "virtual" else 0),
            "restarts": row.restarts + 1 if row else 0,
        }
        self.journal.put(AgentRecord, record)
        return row is not None

    # --- publishing -------------------------------------------------------------------------------

    def local_receivers(self, topic: str) -> int:
        return sum(1 for f, _ in self._filters if matches(f, topic))

    def publish_after_commit(self, agent: Agent, topic: str, payload: bytes, row: dict) -> None:
        queue = self._queues.get(agent.name)
        if queue is None:  # the agent crashed (in-process fault injection): a dead agent says nothing
            return
        # Only the virtual clock needs to know how many local deliveries are in flight.
        n = self.local_receivers(topic) if self.clock.kind == "virtual" else 0
        if n:
            self._in_flight += n
            self.clock.add_pending(n)
        if self._split:
            self._count_remote(topic)
        self.journal.after_commit(lambda: queue.put_nowait((topic, payload, row)), agent.name)

    def publish_event_after_commit(self, agent: Agent, topic: str, payload: bytes) -> None:
        queue = self._queues.get(agent.name)
        if queue is not None:
            self.journal.after_commit(lambda: queue.put_nowait((topic, payload, None)), agent.name)

    def delivered(self, agent: Agent, topic: str) -> None:
        if self._split and topic.rsplit("/", 1)[-1] not in self.agents:
            self.clock.count_received(1)  # from another process: the barrier balances it
        elif self._in_flight > 0:
            self._in_flight -= 1
            self.clock.done_pending(1)

    def topic_filters(self) -> list[str]:
        """What this process's agents are subscribed to (for a split virtual clock's barrier)."""
        return [f for f, _ in self._filters]

    def _set_peers(self, table: dict[int, list[str]]) -> None:
        share = self.clock.share
        self._remote_filters = [f for s, filters in table.items() if s != share for f in filters]
        unrouted, self._unrouted = self._unrouted, []
        for topic in unrouted:
            self._count_remote(topic)

    def _count_remote(self, topic: str) -> None:
        if self._remote_filters is None:
            self._unrouted.append(topic)
        else:
            self.clock.count_sent(sum(1 for f in self._remote_filters if matches(f, topic)))

    async def _publish_loop(self, agent: Agent) -> None:
        queue = self._queues[agent.name]
        unacked: list[int] = []  # seqs handed to the broker, not yet known to be acknowledged
        # The agent's outbox is published in seq order; once the broker has acknowledged
        # everything handed over so far, the agent's watermark moves to the last seq (one small
        # row per batch, not a flag per message). A publish that failed for a passing reason
        # (the transport closing) holds the watermark where it is until the next start.
        watermark, held = 0, False
        while True:
            topic, payload, row = await queue.get()
            try:
                transport = self.transports.get(agent.name)
                while transport is None:
                    await asyncio.sleep(0.01)
                    transport = self.transports.get(agent.name)
                await transport.publish(topic, payload, qos=1)
                if not self._published_any:
                    self._published_any = True
                    now_ms = int(time.time() * 1000)
                    for hook in self.first_publish_hooks:
                        hook(now_ms)
                if row is not None:
                    unacked.append(row["seq"])
                if unacked and (queue.qsize() == 0 or len(unacked) >= 64):
                    # An outbox row counts as published once the broker acknowledged it; what was
                    # only handed to the socket when the process died goes out again on restart.
                    await transport.flush(timeout=10)
                    last = max(unacked)
                    unacked = []
                    if not held and last > watermark:
                        watermark = last
                        # Rides on the next batch: lost in a crash, it only means messages the
                        # broker already has go out again, and receivers drop what they have seen.
                        self.journal.update(AgentRecord, (agent.name,), {"published_seq": last}, wake=False)
            except TimeoutError:  # not acknowledged yet: the rows wait for the next flush
                log.warning(
                    "%s: the broker has not acknowledged %d messages in 10 s", agent.name, len(unacked)
                )
            except (ValueError, TypeError):
                # It can never be published (larger than the broker allows): counted as gone, or
                # every later message would be sent again at each restart.
                log.exception("%s: publishing on %s failed", agent.name, topic)
                if row is not None:
                    unacked.append(row["seq"])
            except Exception:
                log.exception("%s: publishing on %s failed", agent.name, topic)
                held = held or (row is not None)
            finally:
                queue.task_done()

    def _republish_unsent(self, agent: Agent) -> None:
        """After a restart: what was committed but maybe never published goes out again (receivers dedupe)."""
        for r in self.state.unsent(agent.name):
            row = r.model_dump()
            agent._seq = max(agent._seq, row["seq"])
            self.publish_after_commit(agent, row["topic"], row["payload"].encode(), row)
        agent._seq = max(agent._seq, self.state.last_seq(agent.name))

    # --- services for roles -----------------------------------------------------------------------

    def aas_client(self, base_url: str, agent: str) -> AasClient:
        """A client of the AAS server at ``base_url`` whose writes carry ``agent``'s token."""
        client = self._aas_clients.get((base_url, agent))
        if client is None:
            client = AasClient(base_url, client=self._http, token=lambda: self.tokens.token(agent))
            self._aas_clients[(base_url, agent)] = client
        return client

    def on_event(self, agent: Agent, kind: str, product: str | None, step: int | None, data: dict) -> None:
        for hook in self.event_hooks:
            hook(agent, kind, product, step, data)

    def agent_finished(self, agent: Agent) -> None:
        for hook in self.finished_hooks:
            hook(agent)
