"""Order taking: vendors submit a product instance's AAS over HTTP and are notified of its progress.

* :class:`OrderTakingService` — the HTTP service (``POST /orders``, ``TakeOrder`` on its own AAS), ending in
  the ``on_order(AcceptedOrder)`` callback; progress back in with ``notify`` / ``on_node_event``.
* :class:`WebhookOutbox` — persisted, signed, retried progress notifications.
* :mod:`agents.ordertaking.tables` — the service's tables (import before ``create_all``).
* :mod:`agents.ordertaking.auth` — vendors, API key hashes, rate limits.

See docs/vendors.md.
"""

from agents.ordertaking.auth import VendorConfig, VendorDirectory, generate_api_key, hash_api_key
from agents.ordertaking.errors import OrderRejected, Problem, Rejection
from agents.ordertaking.service import AcceptedOrder, OrderTakingConfig, OrderTakingService
from agents.ordertaking.upload import UploadLimits
from agents.ordertaking.webhooks import WebhookOutbox, sign, verify_signature

__all__ = [
    "AcceptedOrder",
    "OrderRejected",
    "OrderTakingConfig",
    "OrderTakingService",
    "Problem",
    "Rejection",
    "UploadLimits",
    "VendorConfig",
    "VendorDirectory",
    "WebhookOutbox",
    "generate_api_key",
    "hash_api_key",
    "sign",
    "verify_signature",
]
