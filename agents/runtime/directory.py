"""Who is who: short names, AAS ids, AAS endpoints and who offers a capability.

The registry is the source of truth; this cache keeps the hot path off HTTP.
Agents of the same process are known without asking. Capability lookups are
cached for a short time, so newly registered resources are seen in later rounds.
The lookups the agents of a node wait for at the same time go to the registry in
one request (its bulk lookup extension), not one each.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from protocol.elements import capability_semantic_id
from registry.client import RegistryClient
from registry.descriptors import aas_server_base, capabilities_of, short_name_of

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    aas_id: str
    base_url: str | None  # the AAS server that hosts the shell
    capabilities: tuple[str, ...] = ()  # capability short names


class Directory:
    def __init__(self, registry: RegistryClient | None, *, capability_ttl: float = 10.0) -> None:
        self.registry = registry
        self.capability_ttl = capability_ttl
        self._by_id: dict[str, Entry] = {}
        self._by_name: dict[str, Entry] = {}
        self._bidders: dict[str, tuple[float, frozenset[str]]] = {}
        self._lookups: dict[str, asyncio.Future[frozenset[str]]] = {}
        self._local: set[str] = set()
        # Registry lookups the agents wait for, sent together (see _send_lookups): by id, by capability.
        self._want_ids: dict[str, asyncio.Future[Entry | None]] = {}
        self._want_caps: dict[str, asyncio.Future[list[dict]]] = {}
        self._asked_ids: dict[str, asyncio.Future[Entry | None]] = {}  # in the request in flight
        self._sender: asyncio.Task[None] | None = None
        self.lookups = 0  # registry requests made for lookups (tests, benchmarks)

    def add(self, entry: Entry, *, local: bool = False) -> None:
        self._by_id[entry.aas_id] = entry
        self._by_name[entry.name] = entry
        if local:
            self._local.add(entry.aas_id)

    def local(self, aas_id: str) -> Entry | None:
        return self._by_id.get(aas_id)

    async def by_id(self, aas_id: str) -> Entry | None:
        entry = self._by_id.get(aas_id)
        if entry is None and self.registry is not None:
            future = self._want_ids.get(aas_id) or self._asked_ids.get(aas_id)
            if future is None:
                future = self._want_ids[aas_id] = asyncio.get_running_loop().create_future()
                self._kick()
            entry = await asyncio.shield(future)
        return entry

    async def by_name(self, name: str) -> Entry | None:
        entry = self._by_name.get(name)
        if entry is None and self.registry is not None:
            descriptor = await self.registry.find_by_short_name(name)
            if descriptor:
                entry = _entry(descriptor)
                if entry:
                    self.add(entry)
        return entry

    async def bidders(self, capability: str) -> frozenset[str]:
        """AAS ids of the shells registered as offering `capability`.

        A stale answer is returned at once while one lookup refreshes it in the background, and
        concurrent misses share one lookup: a hundred products calling for the same capability
        when its entry expires would otherwise ask the registry a hundred times.
        """
        cached = self._bidders.get(capability)
        now = time.monotonic()
        if cached and now - cached[0] < self.capability_ttl:
            return cached[1]
        if self.registry is None:
            ids = frozenset(e.aas_id for e in self._by_id.values() if capability in e.capabilities)
            self._bidders[capability] = (now, ids)
            return ids
        lookup = self._lookups.get(capability)
        if lookup is None:
            lookup = self._lookups[capability] = asyncio.ensure_future(self._lookup(capability))
            lookup.add_done_callback(lambda _: self._lookups.pop(capability, None))
        if cached:  # stale: answer now, the refresh lands for the next call
            lookup.add_done_callback(_consume)
            return cached[1]
        return await asyncio.shield(lookup)

    async def _lookup(self, capability: str) -> frozenset[str]:
        assert self.registry is not None
        started = time.monotonic()
        semantic_id = capability_semantic_id(capability)
        future = self._want_caps.get(semantic_id)
        if future is None:
            future = self._want_caps[semantic_id] = asyncio.get_running_loop().create_future()
            self._kick()
        found = await asyncio.shield(future)
        ids: frozenset[str] = frozenset()
        for descriptor in found:
            entry = _entry(descriptor)
            if entry:
                self.add(entry)
                ids |= {entry.aas_id}
        self._bidders[capability] = (started, ids)
        return ids

    def _kick(self) -> None:
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(
                self._send_lookups(), name="directory-lookups"
            )

    async def _send_lookups(self) -> None:
        """One registry request for every lookup waiting, while any wait (bulk lookup extension;
        one standard request each on a registry without it). What comes in while a request is in
        flight goes in the next: under load the batches grow by themselves, idle they are single.

        Why: thousands of agents starting and meeting their first peers each asked the registry on
        their own, and the HTTP client's per-request cost was a fifth of an agent process's CPU."""
        assert self.registry is not None
        while self._want_ids or self._want_caps:
            ids, self._want_ids = self._want_ids, {}
            caps, self._want_caps = self._want_caps, {}
            self._asked_ids = ids
            try:
                self.lookups += 1
                found, offered = await self.registry.lookup(list(ids), list(caps))
            except Exception as exc:  # every waiter sees the failure, as its own request would have
                for future in (*ids.values(), *caps.values()):
                    if not future.done():
                        future.set_exception(exc)
                        future.add_done_callback(_retrieved)  # a waiter that was cancelled: no noise
                continue
            finally:
                self._asked_ids = {}
            for aas_id, future in ids.items():
                descriptor = found.get(aas_id)
                entry = _entry(descriptor) if descriptor else None
                if entry:
                    self.add(entry)
                if not future.done():
                    future.set_result(entry)
            for semantic_id, future in caps.items():
                if not future.done():
                    future.set_result(offered.get(semantic_id, []))

    def forget(self, aas_id: str) -> None:
        """Drop a cached remote entry (its endpoint may have changed); local agents stay."""
        if aas_id in self._local:
            return
        entry = self._by_id.pop(aas_id, None)
        if entry:
            self._by_name.pop(entry.name, None)


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _consume(future: asyncio.Future) -> None:
    """A background refresh nobody awaits: its failure is logged here, not lost."""
    if not future.cancelled() and future.exception() is not None:
        log.warning("capability lookup failed: %r", future.exception())


def _entry(descriptor: dict) -> Entry | None:
    name = short_name_of(descriptor)
    if not name:
        return None
    caps = tuple(c.rsplit("/", 1)[-1] for c in capabilities_of(descriptor))
    return Entry(name, descriptor["id"], aas_server_base(descriptor), caps)
