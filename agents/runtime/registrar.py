"""A node's registrations: its agents' shell descriptors, registered in batches and renewed together.

Why: registering each agent with its own HTTP exchange, and renewing each lease with its own
task, cost ~10 ms of CPU per agent at start (client and registry together) and, with thousands
of agents, thousands of renewals queued in one HTTP connection pool whose bookkeeping grows with
the square of the queue — enough to starve the event loop and drop MQTT connections. Here the
descriptors that arrive while one request is in flight go out together in the next one (the
registry's bulk extension, ``PUT /twinbid/bulk/shell-descriptors``; one PUT each on a registry
without it), and one task per node renews every live lease in a few requests per period.

Each node still registers only its own agents, with the same descriptors and leases as before:
nothing is decided centrally. A registry slowed down by a start-up storm makes the agents wait
(transient errors are retried with back-off); it does not abort the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

import httpx

from registry.client import HttpError, RegistryClient

log = logging.getLogger(__name__)


class Registrar:
    """``await registrar.register(descriptor)`` returns once the registry holds it; until
    :meth:`forget`, its lease is renewed every ``ttl / 3`` with the node's other agents."""

    def __init__(self, registry: RegistryClient, ttl: float | None, *, max_delay: float = 10.0) -> None:
        self.registry = registry
        self.ttl = ttl
        self.max_delay = max_delay
        self._pending: dict[str, tuple[dict, asyncio.Future[None]]] = {}
        self._live: dict[str, dict] = {}  # aas id -> descriptor, renewed every period
        self._wake: asyncio.Event | None = None
        self._sender: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self.requests = 0  # registration requests sent (renewals included), for tests and benchmarks

    def submit(self, descriptor: dict) -> asyncio.Future[None]:
        """Queue a registration; the future is done once the registry took it."""
        loop = asyncio.get_running_loop()
        if self._wake is None:
            self._wake = asyncio.Event()
        aas_id = descriptor["id"]
        previous = self._pending.pop(aas_id, None)
        future: asyncio.Future[None] = loop.create_future()
        if previous is not None:  # the newer descriptor replaces it; whoever waited waits for it
            future.add_done_callback(lambda f, p=previous[1]: _chain(f, p))
        self._pending[aas_id] = (descriptor, future)
        if self._sender is None or self._sender.done():
            self._sender = loop.create_task(self._send_loop(), name="registrar")
        self._wake.set()
        return future

    async def register(self, descriptor: dict) -> None:
        """Register (or re-register) and wait until the registry holds the descriptor."""
        await asyncio.shield(self.submit(descriptor))

    def forget(self, aas_id: str) -> None:
        """Stop registering and renewing ``aas_id`` (before it is deregistered)."""
        self._live.pop(aas_id, None)
        pending = self._pending.pop(aas_id, None)
        if pending is not None and not pending[1].done():
            pending[1].cancel()

    @property
    def live(self) -> int:
        return len(self._live)

    async def close(self) -> None:
        for task in (self._sender, self._renewer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for _, future in self._pending.values():
            future.cancel()
        self._pending.clear()

    # --- inside ------------------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        assert self._wake is not None
        delay = 0.5
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._pending:
                continue
            batch, self._pending = self._pending, {}
            try:
                self.requests += 1
                await self.registry.register_many([d for d, _ in batch.values()], ttl=self.ttl)
            except (HttpError, httpx.HTTPError) as exc:
                if isinstance(exc, HttpError) and exc.status < 500:
                    # The registry refuses a descriptor (a bug, not a load problem): one at a time,
                    # so that only the agent whose descriptor it is hears of it.
                    await self._one_by_one(batch, exc)
                    continue
                log.warning(
                    "registering %d agents failed (%s); retrying in %.1f s",
                    len(batch),
                    exc or type(exc).__name__,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_delay)
                for aas_id, item in batch.items():
                    if item[1].cancelled():  # forgotten meanwhile
                        continue
                    newer = self._pending.get(aas_id)
                    if newer is None:
                        self._pending[aas_id] = item
                    else:  # a newer submission of the same id wins; whoever waited waits for it
                        newer[1].add_done_callback(lambda f, p=item[1]: _chain(f, p))
                self._wake.set()
                continue
            delay = 0.5
            for aas_id, (descriptor, future) in batch.items():
                if not future.cancelled():
                    self._live[aas_id] = descriptor
                    if not future.done():
                        future.set_result(None)
            self._ensure_renewer()

    def _ensure_renewer(self) -> None:
        if self.ttl and (self._renewer is None or self._renewer.done()):
            self._renewer = asyncio.get_running_loop().create_task(self._renew_loop(), name="registrar-renew")

    async def _one_by_one(self, batch: dict[str, tuple[dict, asyncio.Future[None]]], exc: HttpError) -> None:
        if len(batch) == 1:
            for _, future in batch.values():
                if not future.done():
                    future.set_exception(exc)
            return
        for aas_id, (descriptor, future) in batch.items():
            if future.done():
                continue
            try:
                await self.registry.register(descriptor, ttl=self.ttl)
            except (HttpError, httpx.HTTPError) as one:
                future.set_exception(one)
            else:
                self._live[aas_id] = descriptor
                future.set_result(None)
        self._ensure_renewer()

    async def _renew_loop(self) -> None:
        """Every ttl/3: re-PUT every live descriptor (recreating any that expired meanwhile).

        The first renewal at a random point of the period, so that the nodes of a plant started
        together do not renew together; a failed renewal is retried after a tenth of the period
        (a lease outlives two missed periods)."""
        assert self.ttl
        period = self.ttl / 3
        delay = period * random.uniform(0.5, 1.0)
        while True:
            await asyncio.sleep(delay)
            delay = period
            descriptors = list(self._live.values())
            if not descriptors:
                continue
            try:
                self.requests += 1
                await self.registry.register_many(descriptors, ttl=self.ttl)
            except (HttpError, httpx.HTTPError) as exc:
                log.warning(
                    "renewing the leases of %d agents failed: %s", len(descriptors), exc or type(exc).__name__
                )
                delay = period / 10


def log_failure(future: asyncio.Future[None]) -> None:
    """For a registration nobody awaits (a restarted agent resumes at once): its failure is
    logged here, not lost."""
    if not future.cancelled() and future.exception() is not None:
        log.warning("registration failed: %r", future.exception())


def _chain(source: asyncio.Future[None], target: asyncio.Future[None]) -> None:
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif source.exception() is not None:
        target.set_exception(source.exception())  # type: ignore[arg-type]
    else:
        target.set_result(None)
