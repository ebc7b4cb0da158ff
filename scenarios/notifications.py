"""Progress notifications to vendors for the orders a scenario places on their behalf.

An order with `vendor:` whose vendor has a `notify` URL gets every progress event of its products
(`manufacturing-accepted`, `step-scheduled`, `step-completed`, `manufacturing-completed`, the
failures) POSTed there: signed (HMAC-SHA256 with the secret derived from the vendor's API key when
one is given), with an idempotency key, retried with back-off from a persisted outbox
(`agents.ordertaking.webhooks.WebhookOutbox`). Events are queued only after the product's
journal committed the change they announce.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from agents.ordertaking.auth import derive_webhook_secret
from agents.ordertaking.webhooks import WebhookOutbox
from agents.persistence.database import Database
from scenarios.schema import Scenario

log = logging.getLogger(__name__)


class ScenarioNotifier:
    def __init__(self, scenario: Scenario, db: Database) -> None:
        self.urls = {v.name: v.notify for v in scenario.vendors if v.notify}
        secrets = {}
        for v in scenario.vendors:
            key = os.environ.get(v.api_key_env) if v.api_key_env else None
            if key:
                secrets[v.name] = derive_webhook_secret(key)
        self.vendor_of = {p.name: p.vendor for p in scenario.product_instances() if p.vendor in self.urls}
        # One outbox for the run: the order-taking service shares it for the orders it takes.
        self.outbox = WebhookOutbox(db, secrets) if scenario.vendors else None

    @property
    def active(self) -> bool:
        return self.outbox is not None

    def on_event(
        self, agent: Any, kind: str, product: str | None, step: int | None, data: dict[str, Any]
    ) -> None:
        """A `Node.event_hooks` hook."""
        vendor = self.vendor_of.get(product or "")
        if vendor is None or self.outbox is None:
            return
        event = {
            "order": product,
            "kind": kind,
            "product": product,
            "step": step,
            "sim": agent.now(),
            "data": data,
        }
        outbox, url = self.outbox, self.urls[vendor]

        def enqueue() -> None:
            try:
                outbox.enqueue(vendor, url, event)
            except Exception:
                log.exception("queueing %s of %s for %s failed", kind, product, vendor)

        agent.node.journal.after_commit(enqueue)

    async def start(self) -> None:
        if self.outbox is not None:
            await self.outbox.start()

    async def stop(self, wait: float = 10.0) -> None:
        if self.outbox is not None:
            await self.outbox.flush(wait)
            await self.outbox.stop()
