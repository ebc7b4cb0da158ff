"""Who is who: short names, AAS ids, AAS endpoints and who offers a capability.

The registry is the source of truth; this cache keeps the hot path off HTTP.
Agents of the same process are known without asking. Capability lookups are
cached for a short time, so newly registered resources are seen in later rounds.
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
            descriptor = await self.registry.get(aas_id)
            if descriptor:
                entry = _entry(descriptor)
                if entry:
                    self.add(entry)
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
        found = await self.registry.find_by_capability(capability_semantic_id(capability))
        ids: frozenset[str] = frozenset()
        for descriptor in found:
            entry = _entry(descriptor)
            if entry:
                self.add(entry)
                ids |= {entry.aas_id}
        self._bidders[capability] = (started, ids)
        return ids

    def forget(self, aas_id: str) -> None:
        """Drop a cached remote entry (its endpoint may have changed); local agents stay."""
        if aas_id in self._local:
            return
        entry = self._by_id.pop(aas_id, None)
        if entry:
            self._by_name.pop(entry.name, None)


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
