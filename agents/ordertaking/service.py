"""The order-taking service: vendors submit a product instance's AAS over HTTP; the plant takes it as an order.

Two ways in, the same checks (see :mod:`agents.ordertaking.upload` and :mod:`agents.ordertaking.params`):

* ``POST /orders`` — the AAS as V3.1 JSON (``application/json``), as an AASX package
  (``application/asset-administration-shell-package+xml``), or as ``multipart/form-data`` (part ``file``);
  order parameters as query parameters or form fields. ``GET /orders``, ``GET /orders/{orderId}`` (status,
  events, and the product's process documentation), ``GET /orders/{orderId}/aas``.
* The service's own AAS (served with the Part 2 API by :mod:`agents.aas.server`): the ``TakeOrder``
  Operation of the ``OrderTaking`` submodel, ``POST .../TakeOrder/invoke`` (synchronous) and
  ``POST .../TakeOrder/invoke-async`` with ``operation-status`` / ``operation-results`` (implemented here:
  the AAS server has no asynchronous invocation).

Every request except reading the service's AAS needs a vendor's API key (``Authorization: Bearer <key>`` or
``X-API-Key``); a vendor sees only its own orders; per-vendor token buckets answer 429 with ``Retry-After``.

An accepted order ends in the ``on_order`` callback with an :class:`AcceptedOrder`. Progress comes back with
:meth:`OrderTakingService.notify` (or the node event hook :meth:`OrderTakingService.on_node_event`): the
order's status moves on and a signed webhook goes to the vendor through the persisted
:class:`~agents.ordertaking.webhooks.WebhookOutbox`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from basyx.aas import model
from basyx.aas.adapter import aasx
from fastapi import FastAPI, Request
from sqlmodel import select
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from agents.aas import build
from agents.aas.client import AasClient
from agents.aas.io import AasReadError, aasx_bytes, environment_json, read_json
from agents.aas.server import create_app
from agents.aas.store import (
    AasStore,
    InvokeRequest,
    StoreError,
    WriteRejected,
    WriteRequest,
    operation_variables_json,
    parse_operation_arguments,
)
from agents.persistence.database import Database
from agents.persistence.tables import EventRecord
from protocol.tokens import RunTokens
from registry.client import HttpError, RegistryClient
from registry.descriptors import aas_server_base, shell_descriptor
from registry.part2 import (
    ApiError,
    InLoopServer,
    MalformedIdentifier,
    b64url_decode,
    json_bytes,
    json_response,
    make_cursor,
    parse_cursor,
    parse_limit,
    read_json_body,
    utc_timestamp,
)

from .auth import (
    Authenticator,
    Rate,
    RateLimiter,
    VendorConfig,
    VendorDirectory,
    derive_webhook_secret,
    retry_after,
)
from .errors import Problem, Rejection
from .params import FIELDS, OrderParams, parse_order_params, resolve_product_type
from .service_aas import OPERATION, service_objects
from .tables import VendorOrderRecord, create_tables
from .upload import (
    AASX_TYPES,
    JSON_TYPES,
    MULTIPART_TYPE,
    Upload,
    UploadLimits,
    VendorAas,
    kind_of,
    media_type,
    parse_multipart,
    read_upload,
    unsupported_type,
)
from .webhooks import WebhookOutbox

__all__ = [
    "AcceptedOrder",
    "Caller",
    "OnOrder",
    "OrderTakingConfig",
    "OrderTakingService",
    "current_caller",
]

log = logging.getLogger(__name__)

#: Order statuses, in the order an order moves through them (``failed`` and ``completed`` are final).
STATUSES = ("received", "accepted", "running", "completed", "failed")
FINAL = ("completed", "failed")
_EVENT_STATUS = {
    "manufacturing-accepted": "accepted",
    "step-scheduled": "running",
    "step-completed": "running",
    "step-rebid": "running",
    "step-reawarded": "running",
    "step-failed": "running",
    "manufacturing-completed": "completed",
    "manufacturing-failed": "failed",
}


def _advance(current: str, kind: str) -> str:
    """The status after an event of ``kind`` (never backwards, never out of a final status)."""
    target = _EVENT_STATUS.get(kind)
    if target is None or current in FINAL:
        return current
    if current not in STATUSES or STATUSES.index(target) > STATUSES.index(current):
        return target
    return current


def _now_ms() -> int:
    return int(time.time() * 1000)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---------------------------------------------------------------------------------------------------------------------
# what the plant receives
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AcceptedOrder:
    """An order that passed every check, handed to ``on_order``.

    ``product`` is a fresh, unique short name (``[a-z0-9-]+``) for the product twin; ``shell`` and
    ``submodels`` are the vendor's basyx objects as read from the upload (``files``: an AASX package's
    supplementary files). ``plan`` is ``product_types[product_type]`` as given to the service. ``resumed`` is
    True when the service hands an unfinished order over again after a restart (``on_order`` must be
    idempotent per ``order_id``/``product``, as ``start_product`` is).
    """

    order_id: str
    vendor: str
    product: str
    product_type: str
    priority: int
    due: float | None
    notify_url: str | None
    customization: Mapping[str, Any]
    shell: model.AssetAdministrationShell
    submodels: tuple[model.Submodel, ...]
    plan: Any = None
    files: aasx.AbstractSupplementaryFileContainer | None = None
    resumed: bool = False

    @property
    def aas_id(self) -> str:
        return self.shell.id

    @property
    def global_asset_id(self) -> str:
        return self.shell.asset_information.global_asset_id or ""

    @property
    def objects(self) -> list[model.Identifiable]:
        return [self.shell, *self.submodels]


OnOrder = Callable[[AcceptedOrder], Awaitable[None]]
AasSource = Callable[[str], Awaitable[list[model.Identifiable] | None]]


@dataclass(frozen=True)
class Caller:
    """The authenticated vendor of the current request (the key only lives as long as the request)."""

    vendor: VendorConfig
    key: str = field(repr=False)


#: Set by the authentication gate for every protected request (read by the operation handlers).
current_caller: ContextVar[Caller | None] = ContextVar("twinbid_order_caller", default=None)


@dataclass
class OrderTakingConfig:
    limits: UploadLimits = field(default_factory=UploadLimits)
    #: New orders per vendor (POST /orders, TakeOrder invocations).
    submit_rate: Rate = field(default_factory=lambda: Rate(burst=10, per_second=1.0))
    #: Status queries per vendor.
    read_rate: Rate = field(default_factory=lambda: Rate(burst=120, per_second=20.0))
    #: Failed logins per client address (a client over it gets 429 before its key is even checked).
    auth_failure_rate: Rate = field(default_factory=lambda: Rate(burst=20, per_second=0.5))
    #: False: notification URLs must not point at private, loopback or reserved addresses.
    allow_private_notify: bool = True
    #: After a restart, hand unfinished orders to ``on_order`` again.
    resume_unfinished: bool = True
    #: How long a request waits for ``on_order``; slower hand-overs answer 202 and finish in the background.
    intake_timeout: float = 30.0
    #: Reading the product's live AAS for ``GET /orders/{id}`` gives up after this long (falls back to events).
    lookup_timeout: float = 3.0
    #: Results of asynchronous invocations are kept this long.
    handle_ttl: float = 3600.0
    short_name: str = "order-taking"
    namespace: str = "default"
    registry_ttl: float = 60.0


@dataclass
class _Handle:
    handle_id: str
    vendor: str
    submodel_id: str
    path: str
    created: float
    state: str = "Running"
    result: dict[str, Any] | None = None


_OP_PATH = re.compile(
    r"^/submodels/[^/]+/submodel-elements/[^/]+/"
    r"(invoke|invoke-async|invoke/\$value|invoke-async/\$value|operation-status/[^/]+|operation-results/[^/]+(/\$value)?)$"
)
_IDEMPOTENCY = re.compile(r"^[\x21-\x7e]{1,200}$")


def _classify(method: str, path: str) -> str | None:
    """None: public (the service's own AAS, description, OpenAPI); else the rate-limit bucket kind."""
    if path == "/orders" or path.startswith("/orders/"):
        return "submit" if method == "POST" else "read"
    if _OP_PATH.match(path):
        return "submit" if method == "POST" else "read"
    return None


class _Gate:
    """ASGI middleware: API key -> vendor (401), rate limits (429), ``current_caller`` for the handlers."""

    def __init__(self, app: ASGIApp, service: OrderTakingService) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        kind = _classify(scope["method"], scope["path"])
        if kind is None:
            await self.app(scope, receive, send)
            return
        svc = self.service
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        key = headers.get("x-api-key", "").strip()
        auth = headers.get("authorization", "")
        if not key and auth[:7].lower() == "bearer ":
            key = auth[7:].strip()
        challenge = {"WWW-Authenticate": 'Bearer realm="twinbid-orders"'}
        if not key:
            await _reject(
                scope,
                receive,
                send,
                401,
                "authentication required: send your API key as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                challenge,
            )
            return
        client = (scope.get("client") or ("?", 0))[0]
        vendor = svc.auth.cached(key)
        if vendor is None:
            if not svc.limiter.peek(client, "auth"):
                await _reject(
                    scope,
                    receive,
                    send,
                    429,
                    "too many failed logins from this address; try again later",
                    {"Retry-After": "10"},
                )
                return
            vendor = await svc.auth.verify(key)
        if vendor is None:
            svc.limiter.take(client, "auth")
            await _reject(scope, receive, send, 401, "invalid API key", challenge)
            return
        rate = vendor.submit_rate if kind == "submit" else vendor.read_rate
        wait = svc.limiter.take(vendor.name, kind, rate)
        if wait > 0:
            r = rate or svc.limiter.limits[kind]
            what = "new orders" if kind == "submit" else "queries"
            await _reject(
                scope,
                receive,
                send,
                429,
                f"rate limit of vendor {vendor.name!r} exceeded: {r.burst} {what} at once, then {r.per_second:g} per second; retry in {retry_after(wait)} s",
                {"Retry-After": retry_after(wait)},
            )
            return
        token = current_caller.set(Caller(vendor, key))
        try:
            await self.app(scope, receive, send)
        finally:
            current_caller.reset(token)


async def _reject(
    scope: Scope, receive: Receive, send: Send, status: int, text: str, headers: dict[str, str]
) -> None:
    await Rejection(status, text, headers=headers).response()(scope, receive, send)


def _caller() -> Caller:
    caller = current_caller.get()
    if caller is None:  # the gate covers every route that calls this; a guard against wiring mistakes
        raise Rejection(401, "authentication required")
    return caller


# ---------------------------------------------------------------------------------------------------------------------
# the service
# ---------------------------------------------------------------------------------------------------------------------


class OrderTakingService:
    """``base_url = await OrderTakingService(db, vendors, product_types, on_order).start(host, port)``.

    * ``db`` — the run database (``agents.persistence.Database``); the service's tables are created if missing.
    * ``vendors`` — a :class:`VendorDirectory`, or vendor entries (``VendorConfig``, dicts, a scenario's
      ``vendors`` list).
    * ``product_types`` — ``product type -> plan``: the types orders may name (the plan is passed through).
    * ``on_order`` — ``async (AcceptedOrder) -> None``; raise :class:`~agents.ordertaking.errors.OrderRejected`
      to refuse an order (the vendor gets the message), anything else is a 500.
    * ``outbox`` — the :class:`WebhookOutbox` (one on ``db`` is made and run if not given).
    * ``registry_url`` — to find the product twins' AAS for ``GET /orders/{id}``, and to register the service.
    * ``aas_source`` — ``async (product short name) -> [shell, submodels...] | None``, instead of the registry.
    * ``tokens`` — the run's token issuer (``protocol.tokens``): the registry takes the service's descriptor
      only with a token naming the service.
    * ``clock`` — the plant clock (``now()``, ``from_epoch_ms()``): due dates as ISO date-times, no due in the past.
    """

    def __init__(
        self,
        db: Database,
        vendors: VendorDirectory | Iterable[Any],
        product_types: Mapping[str, Any],
        on_order: OnOrder,
        *,
        outbox: WebhookOutbox | None = None,
        registry_url: str | None = None,
        aas_source: AasSource | None = None,
        clock: Any = None,
        config: OrderTakingConfig | None = None,
        tokens: RunTokens | None = None,
    ) -> None:
        self.db = db
        self.tokens = tokens  # the run's: registers the service's own descriptor, nothing else
        create_tables(db)
        self.config = config or OrderTakingConfig()
        self.vendors = (
            vendors if isinstance(vendors, VendorDirectory) else VendorDirectory.from_configs(vendors)
        )
        self.product_types = dict(product_types)
        self.on_order = on_order
        self.clock = clock
        self.outbox = outbox if outbox is not None else WebhookOutbox(db, self.vendors.configured_secret)
        self._own_outbox = outbox is None
        self.auth = Authenticator(self.vendors)
        cfg = self.config
        self.limiter = RateLimiter(
            {"submit": cfg.submit_rate, "read": cfg.read_rate, "auth": cfg.auth_failure_rate}
        )
        self.store = AasStore()
        self.shell, self.submodel = service_objects(
            cfg.short_name, cfg.namespace, self.product_types, cfg.limits.max_aasx_bytes
        )
        self.store.add(cfg.short_name, self.shell, self.submodel)
        self.store.set_write_hook(cfg.short_name, _read_only)
        self.store.register_operation(self.submodel.id, OPERATION, self._invoke_take_order)
        self.registry_url = registry_url
        self._registry: RegistryClient | None = None
        self._aas_source = aas_source
        self._client: httpx.AsyncClient | None = None
        self._handles: dict[str, _Handle] = {}
        self._ids_in_use: dict[str, str] = {}  # shell/submodel id -> order id
        self._by_product: dict[str, str] = {}  # product short name -> order id
        self._idempotency: dict[tuple[str, str], str] = {}  # (vendor, key) -> order id
        self._in_progress: set[tuple[str, str]] = set()
        self._read_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.app = self._make_app()
        self._http = InLoopServer(self.app)
        self.base_url = ""

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve in the running loop; returns the base URL. Resumes unfinished orders (``resume_unfinished``)."""
        self._load_index()
        self._catch_up_events()
        self._client = httpx.AsyncClient(timeout=self.config.lookup_timeout)
        await self.outbox.start()
        self.base_url = await self._http.start(host, port)
        with self.store.edit(self.submodel.id, "OrdersEndpoint") as sm:
            build.set_value(sm, "OrdersEndpoint", f"{self.base_url}/orders")
        if self.registry_url:
            self._registry = RegistryClient(self.registry_url, tokens=self.tokens)
            try:
                await self._registry.register(self._descriptor(), ttl=self.config.registry_ttl)
                self._registry.keepalive(self.shell.id)
            except Exception as exc:  # the service works without being listed
                log.warning("order-taking service could not register with %s: %s", self.registry_url, exc)
        if self.config.resume_unfinished:
            await self._resume()
        return self.base_url

    async def stop(self) -> None:
        await self._http.stop()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._registry is not None:
            self._registry.stop_keepalive(self.shell.id)
            with contextlib.suppress(Exception):
                await self._registry.deregister(self.shell.id)
            await self._registry.aclose()
            self._registry = None
        if self._own_outbox:
            await self.outbox.stop()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> OrderTakingService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _descriptor(self) -> dict[str, Any]:
        return shell_descriptor(
            aas_id=self.shell.id,
            short_name=self.config.short_name,
            base_url=self.base_url,
            id_short=self.shell.id_short,
            submodels=[{"id": self.submodel.id, "idShort": self.submodel.id_short}],
            global_asset_id=self.shell.asset_information.global_asset_id,
            namespace=self.config.namespace,
            asset_type="order-taking",
        )

    def _load_index(self) -> None:
        with self.db.session() as s:
            rows = s.exec(select(VendorOrderRecord)).all()
        for r in rows:
            self._by_product[r.product] = r.order_id
            for ident in json.loads(r.identifiers):
                self._ids_in_use[ident] = r.order_id
            if r.idempotency_key:
                self._idempotency[(r.vendor, r.idempotency_key)] = r.order_id

    async def _resume(self) -> None:
        with self.db.session() as s:
            rows = s.exec(
                select(VendorOrderRecord)
                .where(VendorOrderRecord.status.in_(("received", "accepted", "running")))  # type: ignore[attr-defined]
                .order_by(VendorOrderRecord.received_wall_ms)
            ).all()
        for r in rows:
            try:
                objects = read_json(r.environment.encode()).objects
                shell = next(o for o in objects if isinstance(o, model.AssetAdministrationShell))
                accepted = self._accepted(
                    r, shell, [o for o in objects if isinstance(o, model.Submodel)], None, resumed=True
                )
                await self.on_order(accepted)
                if r.status == "received":
                    self._set_status(r.order_id, "accepted")
            except Exception:
                log.exception("resuming order %s (%s) failed", r.order_id, r.product)

    # -- progress ----------------------------------------------------------------------------------------------

    def notify(
        self, product: str, kind: str, *, step: int | None = None, sim: float | None = None, **data: Any
    ) -> bool:
        """A progress event of a product twin: moves its order's status on and queues the vendor's webhook.

        Returns False if ``product`` is not a vendor order (a scenario product, say)."""
        order_id = self._by_product.get(product)
        if order_id is None:
            return False
        record = self._record(order_id)
        if record is None:
            return False
        status = _advance(record.status, kind)
        if status != record.status:
            reason = str(data.get("reason", "")) if status == "failed" else None
            self._set_status(order_id, status, reason)
        event = {
            "order": order_id,
            "product": product,
            "kind": kind,
            "step": step,
            "sim": sim,
            "data": _jsonable(data),
        }
        self.outbox.enqueue(record.vendor, record.notify_url, event)
        return True

    def on_node_event(
        self, agent: Any, kind: str, product: str | None, step: int | None, data: dict[str, Any]
    ) -> None:
        """``Node.event_hooks`` hook: ``node.event_hooks.append(service.on_node_event)``.

        The notification is queued once the product's state change is durable (after the node journal's next
        commit), so a vendor never hears of a step the plant could still forget; an event committed but not
        yet queued when the process died is queued at the next :meth:`start` from ``tb_event``.
        """
        if product is None or product not in self._by_product:
            return
        sim = agent.now() if hasattr(agent, "now") else None
        payload = dict(data)

        def send() -> None:
            try:
                self.notify(product, kind, step=step, sim=sim, **payload)
            except Exception:  # a notification problem must never break the product twin
                log.exception("recording %s of %s for its vendor failed", kind, product)

        journal = getattr(getattr(agent, "node", None), "journal", None)
        if journal is not None:
            journal.after_commit(send)
        else:
            send()

    def _catch_up_events(self) -> int:
        """Queue the durable progress events of vendor orders that never reached the outbox (idempotent)."""
        if not self._by_product:
            return 0
        with self.db.session() as s:
            rows = s.exec(
                select(EventRecord)
                .where(EventRecord.product.in_(list(self._by_product)))  # type: ignore[union-attr]
                .order_by(EventRecord.id)
            ).all()
        for row in rows:
            assert row.product is not None
            try:
                data = json.loads(row.data or "{}")
            except ValueError:
                data = {}
            self.notify(row.product, row.kind, step=row.step, sim=row.sim, **data)
        return len(rows)

    # -- records -----------------------------------------------------------------------------------------------

    def _record(self, order_id: str) -> VendorOrderRecord | None:
        with self.db.session() as s:
            return s.get(VendorOrderRecord, order_id)

    def _save(self, record: VendorOrderRecord) -> None:
        with self.db.session() as s:
            s.add(record)
            s.commit()

    def _set_status(self, order_id: str, status: str, reason: str | None = None) -> None:
        with self.db.session() as s:
            row = s.get(VendorOrderRecord, order_id)
            if row is None:
                return
            row.status = status
            if reason is not None:
                row.reason = reason[:2000]
            row.updated_wall_ms = _now_ms()
            s.add(row)
            s.commit()

    def _forget(self, record: VendorOrderRecord) -> None:
        with self.db.session() as s:
            row = s.get(VendorOrderRecord, record.order_id)
            if row is not None:
                s.delete(row)
                s.commit()
        self._release(record)

    def _release(self, record: VendorOrderRecord) -> None:
        for ident in json.loads(record.identifiers):
            if self._ids_in_use.get(ident) == record.order_id:
                del self._ids_in_use[ident]
        if self._by_product.get(record.product) == record.order_id:
            del self._by_product[record.product]
        if record.idempotency_key:
            self._idempotency.pop((record.vendor, record.idempotency_key), None)

    def order(self, order_id: str) -> VendorOrderRecord | None:
        """The stored record of an order (any vendor)."""
        return self._record(order_id)

    def _own_record(self, order_id: str, vendor: str) -> VendorOrderRecord:
        record = self._record(order_id) if len(order_id) <= 100 else None
        if record is None or record.vendor != vendor:  # another vendor's order does not exist for this one
            raise Rejection(404, Problem("orderId", f"no order {order_id[:100]!r}"))
        return record

    # -- intake ------------------------------------------------------------------------------------------------

    def _accepted(
        self,
        record: VendorOrderRecord,
        shell: model.AssetAdministrationShell,
        submodels: list[model.Submodel],
        files: aasx.AbstractSupplementaryFileContainer | None,
        *,
        resumed: bool = False,
    ) -> AcceptedOrder:
        return AcceptedOrder(
            order_id=record.order_id,
            vendor=record.vendor,
            product=record.product,
            product_type=record.product_type,
            priority=record.priority,
            due=record.due,
            notify_url=record.notify_url,
            customization=json.loads(record.customization),
            shell=shell,
            submodels=tuple(submodels),
            plan=self.product_types.get(record.product_type),
            files=files,
            resumed=resumed,
        )

    async def _prepare(
        self, caller: Caller, upload: Upload, raw: Mapping[str, Any], idempotency_key: str | None, source: str
    ) -> tuple[VendorOrderRecord, AcceptedOrder | None]:
        """Check everything and persist the order as ``received``. Returns (record, accepted) — accepted is None
        when an earlier request with the same Idempotency-Key already created the order."""
        vendor = caller.vendor
        if idempotency_key is not None:
            if not _IDEMPOTENCY.match(idempotency_key):
                raise Rejection(422, Problem("Idempotency-Key", "must be 1..200 printable ASCII characters"))
            earlier = self._idempotency.get((vendor.name, idempotency_key))
            if earlier is not None:
                record = self._record(earlier)
                if record is not None:
                    return record, None
            if (vendor.name, idempotency_key) in self._in_progress:
                raise Rejection(
                    409, Problem("Idempotency-Key", "a request with this key is still being processed")
                )
        cfg = self.config
        params = parse_order_params(
            raw,
            product_types=self.product_types,
            default_notify=vendor.notify,
            clock=self.clock,
            allow_private_notify=cfg.allow_private_notify,
            type_optional=True,
        )
        guard = (vendor.name, idempotency_key) if idempotency_key is not None else None
        if guard:
            self._in_progress.add(guard)
        try:
            async with (
                self._read_lock
            ):  # one package at a time: bounded memory, and basyx's log capture is global
                aas: VendorAas = await asyncio.to_thread(read_upload, upload, cfg.limits)
            params = resolve_product_type(params, aas.shell.asset_information.asset_type, self.product_types)
            return self._reserve(caller, aas, params, idempotency_key, source)
        finally:
            if guard:
                self._in_progress.discard(guard)

    def _reserve(
        self, caller: Caller, aas: VendorAas, params: OrderParams, idempotency_key: str | None, source: str
    ) -> tuple[VendorOrderRecord, AcceptedOrder]:
        vendor = caller.vendor.name
        identifiers = [aas.shell.id, *(sm.id for sm in aas.submodels)]
        problems = []
        for ident in identifiers:
            other = self._ids_in_use.get(ident)
            if other is None:
                continue
            record = self._record(other)
            if record is not None and record.vendor == vendor:
                problems.append(
                    Problem(
                        "id",
                        f"{ident!r} was already submitted as order {other}; a product instance is ordered once",
                    )
                )
            else:
                problems.append(Problem("id", f"{ident!r} is already in use in this plant"))
        if problems:
            raise Rejection(409, problems)
        order_id = "ord-" + secrets.token_hex(8)
        product = self._product_name(vendor, params.product_type)
        now = _now_ms()
        record = VendorOrderRecord(
            order_id=order_id,
            vendor=vendor,
            product=product,
            product_type=params.product_type,
            priority=params.priority,
            due=params.due,
            notify_url=params.notify_url,
            customization=json.dumps(params.customization, sort_keys=True),
            aas_id=aas.shell.id,
            global_asset_id=aas.shell.asset_information.global_asset_id or "",
            identifiers=json.dumps(identifiers),
            status="received",
            idempotency_key=idempotency_key,
            source=source,
            received_wall_ms=now,
            updated_wall_ms=now,
            environment=environment_json([aas.shell, *aas.submodels]),
        )
        for ident in identifiers:
            self._ids_in_use[ident] = order_id
        self._by_product[product] = order_id
        if idempotency_key is not None:
            self._idempotency[(vendor, idempotency_key)] = order_id
        try:
            self._save(record)
            if not self.vendors.configured_secret(vendor):
                self.outbox.remember_secret(vendor, derive_webhook_secret(caller.key))
        except Exception:
            self._release(record)
            raise
        return record, self._accepted(record, aas.shell, aas.submodels, aas.files)

    def _product_name(self, vendor: str, product_type: str) -> str:
        prefix = re.sub(r"[^a-z0-9]+", "-", product_type.lower()).strip("-")[:16].strip("-") or "product"
        for _ in range(50):
            name = f"{vendor[:16].strip('-')}-{prefix}-{secrets.token_hex(3)}"
            if name not in self._by_product:
                with self.db.session() as s:
                    taken = s.exec(
                        select(VendorOrderRecord.order_id).where(VendorOrderRecord.product == name)
                    ).first()
                if taken is None:
                    return name
        raise Rejection(503, "could not find a free product name; try again")

    async def _hand_over(self, record: VendorOrderRecord, accepted: AcceptedOrder) -> VendorOrderRecord:
        """Call ``on_order``; the order becomes ``accepted`` (or is withdrawn with the callback's reason)."""
        try:
            await self.on_order(accepted)
        except Rejection:
            self._forget(record)
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("on_order failed for %s (%s)", record.order_id, record.product)
            self._forget(record)
            raise Rejection(500, f"the plant could not take the order: {type(exc).__name__}: {exc}") from None
        current = self._record(record.order_id)
        if current is not None and current.status == "received":
            self._set_status(record.order_id, "accepted")
        return self._record(record.order_id) or record

    async def _take(
        self, caller: Caller, upload: Upload, raw: Mapping[str, Any], idempotency_key: str | None, source: str
    ) -> tuple[VendorOrderRecord, int]:
        """The whole intake; returns the record and the HTTP status (201 new, 200 replay, 202 still starting)."""
        record, accepted = await self._prepare(caller, upload, raw, idempotency_key, source)
        if accepted is None:
            return record, 200
        task = self._spawn(self._hand_over(record, accepted), f"hand-over:{record.order_id}")
        done, _ = await asyncio.wait({task}, timeout=self.config.intake_timeout)
        if not done:
            return record, 202
        return task.result(), 201

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None and not isinstance(t.exception(), Rejection):
                log.error("%s failed", name, exc_info=t.exception())

        task.add_done_callback(done)
        return task

    # -- views -------------------------------------------------------------------------------------------------

    def receipt(self, record: VendorOrderRecord) -> dict[str, Any]:
        return {
            "orderId": record.order_id,
            "status": record.status,
            "product": record.product,
            "productType": record.product_type,
            "priority": record.priority,
            "due": record.due,
            "notificationUrl": record.notify_url,
            "aasId": record.aas_id,
            "globalAssetId": record.global_asset_id,
            "receivedAt": _iso(record.received_wall_ms),
            "links": {"self": f"/orders/{record.order_id}", "aas": f"/orders/{record.order_id}/aas"},
        }

    async def order_document(self, record: VendorOrderRecord) -> dict[str, Any]:
        """Status, events (with delivery state) and the product's process documentation."""
        events = self.outbox.events(record.order_id)
        status = record.status
        for e in events:
            status = _advance(status, e["type"])
        doc = self.receipt(record)
        doc["status"] = status
        doc["reason"] = record.reason or None
        doc["customization"] = json.loads(record.customization)
        doc["updatedAt"] = _iso(record.updated_wall_ms)
        steps, source = await self._steps(record, events)
        doc["steps"] = steps
        doc["stepsSource"] = source
        doc["events"] = events
        return doc

    async def _steps(
        self, record: VendorOrderRecord, events: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], str | None]:
        objects = await self._product_objects(record.product)
        for obj in objects or ():
            if isinstance(obj, model.Submodel) and obj.id_short == "ProcessDocumentation":
                try:
                    return [_step_json(r) for r in build.read_step_records(obj)], "ProcessDocumentation"
                except Exception:
                    log.debug("unreadable ProcessDocumentation of %s", record.product, exc_info=True)
        steps: dict[int, dict[str, Any]] = {}
        for e in events:
            if e.get("step") is None or not str(e["type"]).startswith("step-"):
                continue
            s = steps.setdefault(int(e["step"]), {"index": int(e["step"])})
            s["outcome"] = {
                "step-scheduled": "scheduled",
                "step-completed": "completed",
                "step-failed": "failed",
            }.get(e["type"], s.get("outcome", "negotiating"))
            data = e.get("data") or {}
            for k_in, k_out in (
                ("resource", "resource"),
                ("start", "scheduledStart"),
                ("end", "scheduledEnd"),
                ("finished", "finished"),
                ("reason", "outcomeText"),
            ):
                if k_in in data:
                    s[k_out] = data[k_in]
        return [steps[i] for i in sorted(steps)], ("events" if steps else None)

    async def _product_objects(self, product: str) -> list[model.Identifiable] | None:
        """The product twin's live AAS (shell + submodels), or None if it cannot be reached now."""
        try:
            async with asyncio.timeout(self.config.lookup_timeout):
                if self._aas_source is not None:
                    return await self._aas_source(product)
                if self._registry is None or self._client is None:
                    return None
                d = await self._registry.find_by_short_name(product)
                base = aas_server_base(d) if d else None
                if not d or not base:
                    return None
                client = AasClient(base, client=self._client, attempts=1)
                shell = await client.get_shell(d["id"])
                refs = [ref.get_identifier() for ref in shell.submodel]
                got = await asyncio.gather(*(client.get_submodel(r) for r in refs), return_exceptions=True)
                return [shell, *(g for g in got if isinstance(g, model.Submodel))]
        except (TimeoutError, HttpError, httpx.HTTPError, AasReadError, KeyError, ValueError) as exc:
            log.debug("live AAS of %s not available: %s", product, exc)
            return None

    # -- HTTP --------------------------------------------------------------------------------------------------

    def _make_app(self) -> FastAPI:
        cfg = self.config
        app = create_app(
            self.store, max_body_bytes=cfg.limits.max_body_bytes, title="twinbid order-taking service"
        )
        app.description = (
            "Vendors submit product instance AASs as manufacturing orders (see docs/vendors.md). "
            "The service's own AAS (TakeOrder operation) is served with the AAS Part 2 API v3.1."
        )

        async def rejection(_: Request, exc: Rejection) -> Response:
            return exc.response()

        app.add_exception_handler(Rejection, rejection)  # type: ignore[arg-type]
        app.add_middleware(_Gate, service=self)
        security = [{"bearerAuth": []}, {"apiKeyHeader": []}]
        errors = {
            str(code): {
                "description": text,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Result"}}},
            }
            for code, text in (
                (400, "Malformed request"),
                (401, "Missing or invalid API key"),
                (404, "No such order (or it belongs to another vendor)"),
                (409, "The AAS was already ordered, or the Idempotency-Key is in use"),
                (413, "Upload too large (or it unpacks too large)"),
                (415, "Unsupported content type"),
                (422, "The AAS or an order parameter is not acceptable; each message names the field"),
                (429, "Rate limit; see Retry-After"),
            )
        }
        order_params = [
            {"name": "productType", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "Product type (default: the shell's assetInformation.assetType)"},
            {"name": "priority", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 5, "default": 3},
             "description": "1 = top priority (earliest completion) .. 5 = lowest (cheapest)"},
            {"name": "due", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "Due date: simulated time units, or an ISO 8601 date-time with offset"},
            {"name": "notificationUrl", "in": "query", "required": False, "schema": {"type": "string", "format": "uri"},
             "description": "Where progress webhooks go (default: the vendor's configured URL)"},
            {"name": "customization", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "JSON object of names to text/number/boolean values"},
            {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 200},
             "description": "Retrying with the same key returns the first request's order instead of a new one"},
        ]  # fmt: skip
        form_fields = {name: {"type": "string"} for name in FIELDS}
        receipt_schema = {"$ref": "#/components/schemas/OrderReceipt"}

        @app.post(
            "/orders",
            tags=["Orders"],
            operation_id="SubmitOrder",
            summary="Submit a product instance's AAS as an order",
            status_code=201,
            responses={
                200: {"description": "Replay of an earlier request with the same Idempotency-Key", "content": {"application/json": {"schema": receipt_schema}}},
                201: {"description": "Order accepted", "content": {"application/json": {"schema": receipt_schema}}},
                202: {"description": "Order received; the plant is still taking it over", "content": {"application/json": {"schema": receipt_schema}}},
                **errors,
            },
            openapi_extra={
                "security": security,
                "parameters": order_params,
                "requestBody": {
                    "required": True,
                    "content": {
                        JSON_TYPES[0]: {"schema": {"type": "object", "required": ["assetAdministrationShells"],
                                                    "description": "AAS V3.1 Environment with one shell (the product instance) and its submodels"}},
                        AASX_TYPES[0]: {"schema": {"type": "string", "format": "binary", "description": "AASX package (XML or JSON part, metamodel V3.1)"}},
                        MULTIPART_TYPE: {"schema": {"type": "object", "required": ["file"],
                                                    "properties": {"file": {"type": "string", "format": "binary"}, **form_fields}}},
                    },
                },
            },
        )  # fmt: skip
        async def submit_order(request: Request) -> Response:
            caller = _caller()
            ctype = request.headers.get("content-type", "")
            mt, _ = media_type(ctype)
            kind = kind_of(ctype)
            limits = cfg.limits
            if kind is None and mt != MULTIPART_TYPE:
                raise unsupported_type(mt)
            limit = (
                limits.max_json_bytes
                if kind == "json"
                else limits.max_aasx_bytes
                if kind == "aasx"
                else limits.max_aasx_bytes + 64 * 1024
            )
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise Rejection(413, Problem("body", f"{declared} bytes; the limit for {mt} is {limit}"))
            body = await request.body()
            if not body:
                raise Rejection(400, Problem("body", "empty; send the product instance's AAS"))
            if len(body) > limit:
                raise Rejection(413, Problem("body", f"{len(body)} bytes; the limit for {mt} is {limit}"))
            raw: dict[str, Any] = {}
            for k, v in request.query_params.multi_items():
                if k in raw:
                    raise Rejection(422, Problem(k, "given more than once"))
                raw[k] = v
            if mt == MULTIPART_TYPE:
                upload = parse_multipart(body, ctype, limits)
                for k, v in upload.fields.items():
                    if k in raw:
                        raise Rejection(
                            422, Problem(k, "given both as a query parameter and as a form field")
                        )
                    raw[k] = v
                source = upload.kind
            else:
                assert kind is not None
                upload = Upload(body, kind)
                source = kind
            record, status = await self._take(
                caller, upload, raw, request.headers.get("idempotency-key"), source
            )
            headers = {"Location": f"/orders/{record.order_id}"}
            return json_response(json_bytes(self.receipt(record)), status, headers=headers)

        @app.get(
            "/orders",
            tags=["Orders"],
            operation_id="GetAllOrders",
            summary="The calling vendor's orders (newest last)",
            responses={200: {"description": "Orders", "content": {"application/json": {"schema": {"type": "object"}}}}, **errors},
            openapi_extra={"security": security, "parameters": [
                {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1}},
                {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"}},
                {"name": "status", "in": "query", "required": False, "schema": {"type": "string", "enum": list(STATUSES)}},
            ]},
        )  # fmt: skip
        async def list_orders(request: Request) -> Response:
            caller = _caller()
            limit = parse_limit(request.query_params.get("limit"), default=100, maximum=1000) or 100
            cursor = parse_cursor(request.query_params.get("cursor"))
            status = request.query_params.get("status")
            if status is not None and status not in STATUSES:
                raise Rejection(400, Problem("status", f"must be one of {', '.join(STATUSES)}"))
            q = select(VendorOrderRecord).where(VendorOrderRecord.vendor == caller.vendor.name)
            if status:
                q = q.where(VendorOrderRecord.status == status)
            if cursor:
                ms, _, oid = cursor.partition(":")
                if not ms.isdigit():
                    raise Rejection(400, Problem("cursor", "malformed cursor"))
                q = q.where(
                    (VendorOrderRecord.received_wall_ms > int(ms))
                    | ((VendorOrderRecord.received_wall_ms == int(ms)) & (VendorOrderRecord.order_id > oid))
                )
            q = q.order_by(VendorOrderRecord.received_wall_ms, VendorOrderRecord.order_id).limit(limit + 1)
            with self.db.session() as s:
                rows = s.exec(q).all()
            more = len(rows) > limit
            rows = rows[:limit]
            meta: dict[str, Any] = {}
            if more and rows:
                meta["cursor"] = make_cursor(f"{rows[-1].received_wall_ms}:{rows[-1].order_id}")
            return json_response(
                json_bytes({"result": [self.receipt(r) for r in rows], "paging_metadata": meta})
            )

        @app.get(
            "/orders/{orderId}",
            tags=["Orders"],
            operation_id="GetOrder",
            summary="Status, events and process documentation of an order",
            responses={200: {"description": "The order", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OrderStatus"}}}}, **errors},
            openapi_extra={"security": security},
        )  # fmt: skip
        async def get_order(orderId: str) -> Response:
            record = self._own_record(orderId, _caller().vendor.name)
            return json_response(json_bytes(await self.order_document(record)))

        @app.get(
            "/orders/{orderId}/aas",
            tags=["Orders"],
            operation_id="GetOrderAas",
            summary="The product's AAS: live from its twin, or as submitted",
            responses={
                200: {
                    "description": "AAS V3.1 environment (JSON), or an AASX package when the Accept header asks for one. "
                    "Twinbid-Aas-Source says whether it is the twin's live AAS (product) or the upload (submitted).",
                    "content": {JSON_TYPES[0]: {"schema": {"type": "object"}}, AASX_TYPES[0]: {"schema": {"type": "string", "format": "binary"}}},
                },
                **errors,
            },
            openapi_extra={"security": security},
        )  # fmt: skip
        async def get_order_aas(orderId: str, request: Request) -> Response:
            record = self._own_record(orderId, _caller().vendor.name)
            objects = await self._product_objects(record.product)
            source = "product"
            if not objects or not any(isinstance(o, model.AssetAdministrationShell) for o in objects):
                objects = list(read_json(record.environment.encode()).objects)
                source = "submitted"
            headers = {"Twinbid-Aas-Source": source}
            accept = request.headers.get("accept", "")
            if "asset-administration-shell-package" in accept:
                data = await asyncio.to_thread(aasx_bytes, objects)
                return Response(
                    data,
                    media_type=AASX_TYPES[0],
                    headers={
                        **headers,
                        "Content-Disposition": f'attachment; filename="{record.product}.aasx"',
                    },
                )
            return Response(environment_json(objects).encode(), media_type=JSON_TYPES[0], headers=headers)

        # -- asynchronous invocation (Part 2: InvokeOperationAsync, GetOperationAsyncStatus/Result) -------------

        tags = ["Submodel Repository API"]

        @app.post(
            "/submodels/{submodelIdentifier}/submodel-elements/{idShortPath}/invoke-async",
            operation_id="InvokeOperationAsync",
            tags=tags,
            status_code=202,
            openapi_extra={"security": security},
        )
        async def invoke_async(submodelIdentifier: str, idShortPath: str, request: Request) -> Response:
            caller = _caller()
            sm_id, path = self._operation_target(submodelIdentifier, idShortPath)
            raw = await read_json_body(request)
            if not isinstance(raw, dict):
                raise ApiError(400, "request body must be an OperationRequestAsync object")
            inputs = self._parse_arguments(raw, sm_id, path)
            upload, params, key = self._operation_upload(inputs)
            record, accepted = await self._prepare(caller, upload, params, key, "operation")
            handle = _Handle(uuid.uuid4().hex, caller.vendor.name, sm_id, path, time.monotonic())
            self._expire_handles()
            self._handles[handle.handle_id] = handle
            if accepted is None:
                handle.state, handle.result = "Completed", self._operation_result(record)
            else:
                self._spawn(self._finish_async(handle, record, accepted), f"invoke-async:{handle.handle_id}")
            location = f"/submodels/{submodelIdentifier}/submodel-elements/{idShortPath}/operation-status/{handle.handle_id}"
            return Response(status_code=202, headers={"Location": location})

        @app.get(
            "/submodels/{submodelIdentifier}/submodel-elements/{idShortPath}/operation-status/{handleId}",
            operation_id="GetOperationAsyncStatus",
            tags=tags,
            openapi_extra={"security": security},
        )
        async def operation_status(submodelIdentifier: str, idShortPath: str, handleId: str) -> Response:
            handle = self._handle(submodelIdentifier, idShortPath, handleId)
            if handle.state == "Running":
                return json_response(
                    json_bytes({"executionState": "Running", "success": False, "messages": []})
                )
            location = f"/submodels/{submodelIdentifier}/submodel-elements/{idShortPath}/operation-results/{handleId}"
            return Response(status_code=302, headers={"Location": location})

        @app.get(
            "/submodels/{submodelIdentifier}/submodel-elements/{idShortPath}/operation-results/{handleId}",
            operation_id="GetOperationAsyncResult",
            tags=tags,
            openapi_extra={"security": security},
        )
        async def operation_results(submodelIdentifier: str, idShortPath: str, handleId: str) -> Response:
            handle = self._handle(submodelIdentifier, idShortPath, handleId)
            if handle.result is None:
                return json_response(
                    json_bytes({"executionState": "Running", "success": False, "messages": []})
                )
            return json_response(json_bytes(handle.result))

        original_openapi = app.openapi

        def openapi() -> dict[str, Any]:
            if app.openapi_schema:
                return app.openapi_schema
            schema = original_openapi()
            components = schema.setdefault("components", {})
            components.setdefault("securitySchemes", {}).update(
                {
                    "bearerAuth": {"type": "http", "scheme": "bearer", "description": "the vendor's API key"},
                    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                }
            )
            components.setdefault("schemas", {}).update(_SCHEMAS)
            return schema

        app.openapi = openapi  # type: ignore[method-assign]
        return app

    def _operation_target(self, sm_segment: str, path: str) -> tuple[str, str]:
        try:
            sm_id = b64url_decode(sm_segment)
        except MalformedIdentifier as exc:
            raise ApiError(400, f"submodelIdentifier: {exc}") from None
        try:
            element = self.store.resolve(sm_id, path)
        except StoreError as exc:
            raise ApiError(exc.status, exc.text) from None
        if not isinstance(element, model.Operation):
            raise ApiError(405, f"{path!r} is a {type(element).__name__}; only Operations can be invoked")
        if sm_id != self.submodel.id or path != OPERATION:
            raise ApiError(501, f"operation {path!r} cannot be invoked asynchronously")
        return sm_id, path

    def _parse_arguments(self, raw: dict[str, Any], sm_id: str, path: str) -> dict[str, Any]:
        try:
            inputs = parse_operation_arguments(raw.get("inputArguments"), "inputArguments")
            inouts = parse_operation_arguments(raw.get("inoutputArguments"), "inoutputArguments")
        except StoreError as exc:
            raise ApiError(exc.status, exc.text) from None
        op = self.store.resolve(sm_id, path)
        assert isinstance(op, model.Operation)
        return InvokeRequest(sm_id, path, op, inputs, inouts).inputs()

    def _operation_upload(self, inputs: Mapping[str, Any]) -> tuple[Upload, dict[str, Any], str | None]:
        """TakeOrder's inputs -> the upload, the order parameters and the idempotency key."""
        limits = self.config.limits
        aas = inputs.get("aas")
        if aas is None:
            raise Rejection(
                422,
                Problem(
                    "aas", "missing: pass the product instance's AAS as a Blob (or a Property with the JSON)"
                ),
            )
        if isinstance(aas, model.Blob):
            data = bytes(aas.value or b"")
            kind = kind_of(aas.content_type or "application/json")
            if kind is None:
                raise Rejection(
                    415,
                    Problem(
                        "aas",
                        f"contentType {aas.content_type!r} is not accepted; use {JSON_TYPES[0]} or {AASX_TYPES[0]}",
                    ),
                )
        elif isinstance(aas, str):
            data, kind = aas.encode("utf-8"), "json"
        else:
            raise Rejection(
                422, Problem("aas", f"must be a Blob or a string Property, not a {type(aas).__name__}")
            )
        if not data:
            raise Rejection(422, Problem("aas", "empty"))
        limit = limits.max_json_bytes if kind == "json" else limits.max_aasx_bytes
        if len(data) > limit:
            raise Rejection(413, Problem("aas", f"{len(data)} bytes; the limit is {limit}"))
        params: dict[str, Any] = {}
        for k, v in inputs.items():
            if k in ("aas", "idempotencyKey"):
                continue
            if isinstance(v, model.SubmodelElementCollection) and k == "customization":
                v = {e.id_short: e.value for e in v.value if isinstance(e, model.Property)}
            elif isinstance(v, model.SubmodelElement):
                raise Rejection(422, Problem(k, f"must be a Property, not a {type(v).__name__}"))
            params[k] = v
        key = inputs.get("idempotencyKey")
        return Upload(data, kind), params, (str(key) if key not in (None, "") else None)

    def _operation_result(self, record: VendorOrderRecord) -> dict[str, Any]:
        outputs = [
            build.prop("orderId", record.order_id),
            build.prop("status", record.status),
            build.prop("product", record.product),
        ]
        return {
            "executionState": "Completed",
            "success": True,
            "messages": [],
            "outputArguments": operation_variables_json(outputs),
            "inoutputArguments": [],
        }

    async def _finish_async(
        self, handle: _Handle, record: VendorOrderRecord, accepted: AcceptedOrder
    ) -> None:
        try:
            record = await self._hand_over(record, accepted)
            handle.result = self._operation_result(record)
            handle.state = "Completed"
        except Rejection as exc:
            handle.result = {
                "executionState": "Failed",
                "success": False,
                "messages": [
                    {
                        "code": str(exc.status),
                        "messageType": "Error",
                        "text": p.text,
                        "timestamp": utc_timestamp(),
                    }
                    for p in exc.problems
                ],
            }
            handle.state = "Failed"

    def _handle(self, sm_segment: str, path: str, handle_id: str) -> _Handle:
        caller = _caller()
        self._expire_handles()
        handle = self._handles.get(handle_id)
        try:
            sm_id = b64url_decode(sm_segment)
        except MalformedIdentifier as exc:
            raise ApiError(400, f"submodelIdentifier: {exc}") from None
        if (
            handle is None
            or handle.vendor != caller.vendor.name
            or handle.submodel_id != sm_id
            or handle.path != path
        ):
            raise ApiError(404, f"no operation handle {handle_id[:100]!r}")
        return handle

    def _expire_handles(self) -> None:
        limit = time.monotonic() - self.config.handle_ttl
        for hid in [h for h, v in self._handles.items() if v.created < limit and v.state != "Running"]:
            del self._handles[hid]

    async def _invoke_take_order(self, call: InvokeRequest) -> list[model.SubmodelElement]:
        """Synchronous ``TakeOrder`` (``POST .../invoke``): the order is taken before the answer."""
        caller = current_caller.get()
        if caller is None:
            raise WriteRejected("authentication required", 401)
        try:
            upload, params, key = self._operation_upload(call.inputs())
            # shielded: a clientTimeoutDuration that runs out must not cut an intake in half
            record, _ = await asyncio.shield(self._take(caller, upload, params, key, "operation"))
        except Rejection as exc:
            raise WriteRejected(exc.text, exc.status) from None
        return [
            build.prop("orderId", record.order_id),
            build.prop("status", record.status),
            build.prop("product", record.product),
        ]


async def _read_only(op: WriteRequest) -> None:
    raise WriteRejected(
        "the order-taking service's AAS is read-only; submit orders with TakeOrder or POST /orders", 403
    )


def _jsonable(data: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(data), default=str))


def _time_json(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _step_json(r: build.StepRecord) -> dict[str, Any]:
    return {
        "index": r.index,
        "capability": r.capability,
        "outcome": r.outcome,
        "resource": r.resource,
        "winner": r.winner,
        "selectionReason": r.reason,
        "scheduledStart": _time_json(r.scheduled_start),
        "scheduledEnd": _time_json(r.scheduled_end),
        "started": _time_json(r.started),
        "finished": _time_json(r.finished),
        "outcomeText": r.outcome_text,
        "bids": [
            {
                "resource": b.resource,
                "start": _time_json(b.start),
                "completion": _time_json(b.completion),
                "price": b.price,
                "score": b.score,
            }
            for b in r.bids
        ],
    }


_SCHEMAS: dict[str, Any] = {
    "OrderReceipt": {
        "type": "object",
        "required": ["orderId", "status", "product", "productType", "priority"],
        "properties": {
            "orderId": {"type": "string"},
            "status": {"type": "string", "enum": list(STATUSES)},
            "product": {"type": "string", "description": "the product twin's short name"},
            "productType": {"type": "string"},
            "priority": {"type": "integer", "minimum": 1, "maximum": 5},
            "due": {"type": ["number", "null"]},
            "notificationUrl": {"type": ["string", "null"]},
            "aasId": {"type": "string"},
            "globalAssetId": {"type": "string"},
            "receivedAt": {"type": "string", "format": "date-time"},
            "links": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
    "OrderStatus": {
        "allOf": [
            {"$ref": "#/components/schemas/OrderReceipt"},
            {
                "type": "object",
                "properties": {
                    "reason": {"type": ["string", "null"]},
                    "customization": {"type": "object"},
                    "updatedAt": {"type": "string", "format": "date-time"},
                    "steps": {"type": "array", "items": {"type": "object"}},
                    "stepsSource": {
                        "type": ["string", "null"],
                        "enum": ["ProcessDocumentation", "events", None],
                    },
                    "events": {"type": "array", "items": {"type": "object"}},
                },
            },
        ]
    },
    "Result": {
        "type": "object",
        "properties": {
            "messages": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "code": {"type": "string"},
                        "messageType": {
                            "type": "string",
                            "enum": ["Undefined", "Info", "Warning", "Error", "Exception"],
                        },
                        "text": {"type": "string"},
                        "timestamp": {"type": "string"},
                        "field": {
                            "type": "string",
                            "description": "the parameter or AAS element the message is about",
                        },
                    },
                },
            }
        },
    },
}
