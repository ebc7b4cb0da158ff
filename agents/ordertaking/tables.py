"""The order-taking service's own tables: vendor orders, the webhook outbox, webhook signing secrets.

Import this module before ``SQLModel.metadata.create_all`` (``open_database``) so a new run database has
them; :func:`create_tables` also creates them on a database whose schema was set up without them (a
database of an earlier run), so the service and the outbox call it when they start.
"""

from __future__ import annotations

from sqlalchemy import BigInteger
from sqlmodel import Field, SQLModel

from agents.persistence.database import Database
from agents.persistence.tables import RunStamped

__all__ = ["VendorOrderRecord", "VendorSecretRecord", "WebhookOutboxRecord", "create_tables"]


class VendorOrderRecord(RunStamped, table=True):
    """One order a vendor submitted over HTTP: its parameters, where it stands, and the AAS it came with."""

    __tablename__ = "tb_vendor_order"
    order_id: str = Field(primary_key=True)
    vendor: str = Field(index=True)
    product: str = Field(index=True, unique=True)  # the product instance's short name (agent name)
    product_type: str
    priority: int
    due: float | None = None
    notify_url: str | None = None
    customization: str = "{}"  # JSON object
    aas_id: str = Field(index=True)
    global_asset_id: str
    identifiers: str = "[]"  # JSON array: ids of the shell and submodels submitted
    status: str  # received | accepted | running | completed | failed
    reason: str = ""
    idempotency_key: str | None = Field(default=None, index=True)
    source: str = "json"  # json | aasx | operation
    received_wall_ms: int = Field(sa_type=BigInteger)
    updated_wall_ms: int = Field(sa_type=BigInteger)
    environment: str  # the submitted shell and submodels as an AAS JSON environment


class WebhookOutboxRecord(RunStamped, table=True):
    """One progress notification to a vendor, written before it is sent; sent until acknowledged."""

    __tablename__ = "tb_webhook_outbox"
    key: str = Field(primary_key=True)  # idempotency key: "<order>:<kind>:<step>"
    seq: int = Field(index=True)  # enqueue order; events of one order are delivered in this order
    vendor: str = Field(index=True)
    order_id: str = Field(index=True)
    kind: str
    url: str | None = None  # None: the order has no notification endpoint (kept as its event log)
    body: str  # exactly the bytes that are signed and sent (UTF-8 JSON)
    state: str = Field(index=True)  # pending | delivered | failed | no-endpoint
    attempts: int = 0
    next_attempt_ms: int = Field(default=0, sa_type=BigInteger)
    created_wall_ms: int = Field(sa_type=BigInteger)
    delivered_wall_ms: int | None = Field(default=None, sa_type=BigInteger)
    last_status: int | None = None
    last_error: str = ""


class VendorSecretRecord(RunStamped, table=True):
    """The webhook signing secret of a vendor that has none configured (derived from its API key)."""

    __tablename__ = "tb_vendor_secret"
    vendor: str = Field(primary_key=True)
    secret: str
    updated_wall_ms: int = Field(sa_type=BigInteger)


TABLES = (VendorOrderRecord, WebhookOutboxRecord, VendorSecretRecord)


def create_tables(db: Database) -> None:
    """Create the tables of this module where missing (idempotent)."""
    SQLModel.metadata.create_all(db.engine, tables=[t.__table__ for t in TABLES])  # type: ignore[attr-defined]
