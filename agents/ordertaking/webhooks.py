"""Progress notifications to vendors: a persisted outbox, signed deliveries, retries with back-off.

``outbox.enqueue(vendor, url, event)`` writes the notification to ``tb_webhook_outbox`` *before* anything is
sent — under its idempotency key (``"<order>:<kind>:<step>"`` unless the event names one), so an event
enqueued twice (a product twin that restarted and reported again) is stored and sent once. A delivery task
POSTs each pending row and retries failures with exponential back-off (tenacity) until the receiver answers
2xx, the attempts run out, or it answers 410 Gone. Rows still pending when the process stops are sent after
the next ``start()``. The events of one order are delivered one at a time, in the order they were enqueued.

Every delivery carries ``Twinbid-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>``
(see :func:`verify_signature`, and docs/vendors.md for a receiver), ``Twinbid-Event-Id`` (the idempotency
key: receivers deduplicate on it — delivery is at least once) and ``Twinbid-Delivery-Attempt``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import func
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import select
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from agents.persistence.database import Database

from .tables import VendorSecretRecord, WebhookOutboxRecord, create_tables

__all__ = [
    "SIGNATURE_HEADER",
    "DeliveryError",
    "WebhookOutbox",
    "event_key",
    "sign",
    "verify_signature",
]

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Twinbid-Signature"
EVENT_ID_HEADER = "Twinbid-Event-Id"
EVENT_TYPE_HEADER = "Twinbid-Event-Type"
ATTEMPT_HEADER = "Twinbid-Delivery-Attempt"
USER_AGENT = "twinbid-webhooks/1"

PENDING, DELIVERED, FAILED, NO_ENDPOINT = "pending", "delivered", "failed", "no-endpoint"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def sign(secret: str | bytes, body: bytes, timestamp: int | None = None) -> str:
    """The ``Twinbid-Signature`` header value for ``body``: ``t=<unix s>,v1=<hex HMAC-SHA256>``."""
    t = int(time.time()) if timestamp is None else timestamp
    key = secret.encode() if isinstance(secret, str) else secret
    mac = hmac.new(key, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify_signature(
    secret: str | bytes,
    body: bytes,
    header: str | None,
    *,
    tolerance: float = 300.0,
    now: float | None = None,
) -> bool:
    """Receiver side: True if ``header`` signs ``body`` with ``secret`` and is at most ``tolerance`` s old."""
    if not header:
        return False
    fields: dict[str, list[str]] = {}
    for item in header.split(","):
        k, _, v = item.strip().partition("=")
        fields.setdefault(k, []).append(v)
    try:
        t = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - t) > tolerance:
        return False
    key = secret.encode() if isinstance(secret, str) else secret
    expected = hmac.new(key, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, v) for v in fields.get("v1", []))


def event_key(event: Mapping[str, Any]) -> str:
    """The idempotency key of an event: its ``id`` if given, else ``<order>:<kind>:<step>`` (a rescheduled
    step's ``step-scheduled`` also names resource and start, so a second booking is a second event; a
    ``step-reawarded`` names its new resource)."""
    if event.get("id"):
        return str(event["id"])
    kind = str(event["kind"])
    key = f"{event['order']}:{kind}:{event.get('step') if event.get('step') is not None else '-'}"
    data = event.get("data") or {}
    if kind == "step-scheduled" and ("resource" in data or "start" in data):
        key += f":{data.get('resource')}@{data.get('start')}"
    elif kind == "step-rebid" and "round" in data:
        key += f":{data['round']}"
    elif kind == "step-reawarded" and "resource" in data:  # a second withdrawal is a second event
        key += f":{data['resource']}"
    return key[:512]


class DeliveryError(Exception):
    """One failed delivery attempt (retried unless ``permanent``)."""

    def __init__(
        self, text: str, status: int | None = None, retry_after: float | None = None, permanent: bool = False
    ):
        super().__init__(text)
        self.status = status
        self.retry_after = retry_after
        self.permanent = permanent


SecretSource = Callable[[str], str | bytes | None]


class WebhookOutbox:
    """Persisted, signed, retried webhook deliveries (see the module docstring).

    ``secrets(vendor)`` gives a vendor's configured signing secret (or None); secrets learnt at run time
    (derived from a vendor's API key) are kept with :meth:`remember_secret` in ``tb_vendor_secret``.
    """

    def __init__(
        self,
        db: Database,
        secrets: SecretSource | Mapping[str, str] | None = None,
        *,
        max_attempts: int = 10,
        backoff: float = 1.0,
        max_backoff: float = 300.0,
        timeout: float = 10.0,
        concurrency: int = 8,
        poll_interval: float = 1.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.db = db
        if isinstance(secrets, Mapping):
            table = dict(secrets)
            self._configured: SecretSource = table.get
        else:
            self._configured = secrets or (lambda _vendor: None)
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.poll_interval = poll_interval
        self._sem = asyncio.Semaphore(concurrency)
        self._own_client = client is None
        self._client = client
        self._seq: int | None = None
        self._learnt: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._idle = asyncio.Event()
        self.delivered = 0
        self.failed_attempts = 0
        create_tables(db)

    # -- enqueue ----------------------------------------------------------------------------------------------

    def enqueue(self, vendor: str, url: str | None, event: Mapping[str, Any]) -> None:
        """Persist one notification (idempotent by key) and wake the delivery task.

        ``event``: ``order`` and ``kind`` (required), ``product``, ``step``, ``sim``, ``data`` (a JSON object),
        ``id`` (the idempotency key; default ``<order>:<kind>:<step>``). ``url`` None keeps the event as the
        order's log without sending it.
        """
        if "order" not in event or "kind" not in event:
            raise ValueError("an event needs 'order' and 'kind'")
        key = event_key(event)
        now = _now_ms()
        seq = self._next_seq()
        body = {
            "id": key,
            "type": str(event["kind"]),
            "order": str(event["order"]),
            "product": event.get("product"),
            "vendor": vendor,
            "step": event.get("step"),
            "sim": event.get("sim"),
            "time": _iso(now),
            "seq": seq,
            "data": dict(event.get("data") or {}),
        }
        row = {
            "key": key,
            "seq": seq,
            "vendor": vendor,
            "order_id": str(event["order"]),
            "kind": str(event["kind"]),
            "url": url,
            "body": json.dumps(body, ensure_ascii=False, separators=(",", ":"), default=str),
            "state": PENDING if url else NO_ENDPOINT,
            "attempts": 0,
            "next_attempt_ms": now,
            "created_wall_ms": now,
            "delivered_wall_ms": None,
            "last_status": None,
            "last_error": "",
        }
        ins = postgresql.insert if self.db.engine.dialect.name == "postgresql" else sqlite.insert
        stmt = ins(WebhookOutboxRecord.__table__).values(**row).on_conflict_do_nothing(index_elements=["key"])  # type: ignore[attr-defined]
        with self.db.engine.begin() as conn:
            inserted = conn.execute(stmt).rowcount
        if inserted and url:
            self._idle.clear()
            self._wake.set()

    def _next_seq(self) -> int:
        if self._seq is None:
            with self.db.session() as s:
                self._seq = int(s.exec(select(func.max(WebhookOutboxRecord.seq))).one() or 0)
        self._seq += 1
        return self._seq

    # -- secrets ----------------------------------------------------------------------------------------------

    def remember_secret(self, vendor: str, secret: str) -> None:
        """Keep a vendor's signing secret (learnt at run time) for deliveries, also after a restart."""
        if self._learnt.get(vendor) == secret:
            return
        self._learnt[vendor] = secret
        with self.db.session() as s:
            row = s.get(VendorSecretRecord, vendor) or VendorSecretRecord(
                vendor=vendor, secret=secret, updated_wall_ms=0
            )
            row.secret, row.updated_wall_ms = secret, _now_ms()
            s.add(row)
            s.commit()

    def secret_for(self, vendor: str) -> str | bytes | None:
        configured = self._configured(vendor)
        if configured:
            return configured
        if vendor not in self._learnt:
            with self.db.session() as s:
                row = s.get(VendorSecretRecord, vendor)
            if row is None:
                return None
            self._learnt[vendor] = row.secret
        return self._learnt[vendor]

    # -- queries ----------------------------------------------------------------------------------------------

    def events(self, order_id: str) -> list[dict[str, Any]]:
        """The notifications of one order, in order, each with its delivery state."""
        with self.db.session() as s:
            rows = s.exec(
                select(WebhookOutboxRecord)
                .where(WebhookOutboxRecord.order_id == order_id)
                .order_by(WebhookOutboxRecord.seq)
            ).all()
        out = []
        for r in rows:
            body = json.loads(r.body)
            body["delivery"] = {"state": r.state, "attempts": r.attempts}
            if r.delivered_wall_ms:
                body["delivery"]["deliveredAt"] = _iso(r.delivered_wall_ms)
            if r.state in (PENDING, FAILED) and r.last_error:
                body["delivery"]["lastError"] = r.last_error
            out.append(body)
        return out

    def pending(self) -> int:
        with self.db.session() as s:
            return int(
                s.exec(
                    select(func.count())
                    .select_from(WebhookOutboxRecord)
                    .where(WebhookOutboxRecord.state == PENDING)
                ).one()
            )

    # -- delivery ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start delivering (rows left pending by an earlier process go out first)."""
        if self._task is not None:
            return
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)
        self._wake.set()
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name="webhook-outbox")

    async def stop(self) -> None:
        """Stop delivering; what is still pending stays in the table for the next start."""
        self._stopping = True
        self._wake.set()
        tasks = [t for t in (self._task, *self._workers.values()) if t is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        self._stopping = False
        self._task = None
        self._workers.clear()
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def flush(self, wait: float = 30.0) -> bool:
        """Wait until nothing is pending (delivered or given up); False if ``wait`` seconds passed first."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not self._workers and self.pending() == 0:
                return True
            self._wake.set()
            await asyncio.sleep(0.02)
        return False

    def _orders_with_pending(self) -> list[str]:
        with self.db.session() as s:
            rows = s.exec(
                select(WebhookOutboxRecord.order_id, func.min(WebhookOutboxRecord.seq))
                .where(WebhookOutboxRecord.state == PENDING)
                .group_by(WebhookOutboxRecord.order_id)
                .order_by(func.min(WebhookOutboxRecord.seq))
                .limit(10_000)
            ).all()
        return [r[0] for r in rows]

    async def _supervise(self) -> None:
        while not self._stopping:
            # asyncio.timeout, not wait_for: wait_for of Python 3.11 can swallow a cancellation that
            # arrives just as the event is set, and stop() would then wait for this task forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            try:
                orders = self._orders_with_pending()
            except Exception:
                log.exception("webhook outbox: reading pending deliveries failed")
                continue
            for order_id in orders:
                if order_id not in self._workers:
                    task = asyncio.get_running_loop().create_task(
                        self._deliver_order(order_id), name=f"webhooks:{order_id}"
                    )
                    self._workers[order_id] = task
                    task.add_done_callback(lambda t, o=order_id: self._worker_done(o, t))

    def _worker_done(self, order_id: str, task: asyncio.Task[None]) -> None:
        if self._workers.get(order_id) is task:
            del self._workers[order_id]
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook delivery for order %s crashed", order_id, exc_info=task.exception())
        self._wake.set()  # new rows may have arrived for this order meanwhile

    def _next_row(self, order_id: str) -> WebhookOutboxRecord | None:
        with self.db.session() as s:
            return s.exec(
                select(WebhookOutboxRecord)
                .where(WebhookOutboxRecord.order_id == order_id, WebhookOutboxRecord.state == PENDING)
                .order_by(WebhookOutboxRecord.seq)
                .limit(1)
            ).first()

    def _update(self, key: str, **changes: Any) -> None:
        with self.db.session() as s:
            row = s.get(WebhookOutboxRecord, key)
            if row is None:
                return
            for k, v in changes.items():
                setattr(row, k, v)
            s.add(row)
            s.commit()

    async def _deliver_order(self, order_id: str) -> None:
        while True:
            row = self._next_row(order_id)
            if row is None:
                return
            await self._deliver(row)

    def _backoff(self, attempts_done: int, error: BaseException | None) -> float:
        delay = min(self.max_backoff, self.backoff * 2 ** max(attempts_done - 1, 0))
        delay *= 1 + random.random() * 0.1
        if isinstance(error, DeliveryError) and error.retry_after is not None:
            delay = max(delay, min(error.retry_after, self.max_backoff))
        return delay

    async def _deliver(self, row: WebhookOutboxRecord) -> None:
        wait_s = (row.next_attempt_ms - _now_ms()) / 1000
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        done_before = row.attempts
        remaining = max(1, self.max_attempts - done_before)
        body = row.body.encode("utf-8")

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            return self._backoff(done_before + state.attempt_number, error)

        def before_sleep(state: RetryCallState) -> None:
            delay = state.next_action.sleep if state.next_action else 0.0
            self._update(row.key, next_attempt_ms=_now_ms() + int(delay * 1000))

        retrying = AsyncRetrying(
            stop=stop_after_attempt(remaining),
            wait=wait,
            retry=retry_if_exception(lambda e: isinstance(e, DeliveryError) and not e.permanent),
            before_sleep=before_sleep,
            reraise=True,
        )
        attempt_no = done_before
        try:
            async for attempt in retrying:
                with attempt:
                    attempt_no += 1
                    status = await self._post(row, body, attempt_no)
        except DeliveryError as exc:
            self._update(
                row.key, state=FAILED, attempts=attempt_no, last_status=exc.status, last_error=str(exc)[:500]
            )
            log.warning("webhook %s to %s given up after %d attempts: %s", row.key, row.url, attempt_no, exc)
            return
        self.delivered += 1
        self._update(
            row.key,
            state=DELIVERED,
            attempts=attempt_no,
            last_status=status,
            delivered_wall_ms=_now_ms(),
            last_error="",
        )

    async def _post(self, row: WebhookOutboxRecord, body: bytes, attempt: int) -> int:
        secret = self.secret_for(row.vendor)
        try:
            if not secret:
                raise DeliveryError(f"no webhook signing secret known for vendor {row.vendor!r}")
            headers = {
                "Content-Type": "application/json",
                "User-Agent": USER_AGENT,
                EVENT_ID_HEADER: row.key,
                EVENT_TYPE_HEADER: row.kind,
                ATTEMPT_HEADER: str(attempt),
                SIGNATURE_HEADER: sign(secret, body),
            }
            assert self._client is not None and row.url is not None
            async with self._sem:
                try:
                    response = await self._client.post(
                        row.url, content=body, headers=headers, timeout=self.timeout
                    )
                except httpx.HTTPError as exc:
                    raise DeliveryError(f"{type(exc).__name__}: {exc}".strip()) from None
            if 200 <= response.status_code < 300:
                return response.status_code
            retry_after = _retry_after(response.headers.get("retry-after"))
            raise DeliveryError(
                f"HTTP {response.status_code}",
                response.status_code,
                retry_after,
                permanent=response.status_code == 410,
            )
        except DeliveryError as exc:
            self.failed_attempts += 1
            self._update(row.key, attempts=attempt, last_status=exc.status, last_error=str(exc)[:500])
            raise


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
