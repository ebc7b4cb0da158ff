"""Registry tables (sqlmodel). Descriptors are stored verbatim as JSON text; the columns the registry
queries by are pulled out and indexed: id, idShort, owner short name, capability semanticIds, expiry.

Table names are prefixed ``registry_`` so the registry can share a database with the agents' tables;
``RegistryStore`` creates only these tables.
"""

from __future__ import annotations

from sqlalchemy import Column, Text
from sqlmodel import Field, SQLModel


class ShellDescriptorRow(SQLModel, table=True):
    """One AAS descriptor. Nested submodel descriptors live inside ``body``."""

    __tablename__ = "registry_shell_descriptors"

    id: str = Field(primary_key=True)
    id_short: str | None = Field(default=None, index=True)
    short_name: str | None = Field(default=None, index=True)
    global_asset_id: str | None = Field(default=None, index=True)
    asset_kind: str | None = Field(default=None)
    asset_type: str | None = Field(default=None)
    body: str = Field(sa_column=Column(Text, nullable=False))
    ttl: float | None = Field(default=None)  # lease length in seconds (None: no lease)
    expires_at: float | None = Field(default=None, index=True)  # epoch seconds; None = never
    updated_at: float = Field(default=0.0)


class ShellCapabilityRow(SQLModel, table=True):
    """Capability semanticIds offered by a shell (from the ``twinbid:capabilities`` extension)."""

    __tablename__ = "registry_shell_capabilities"

    shell_id: str = Field(primary_key=True)
    semantic_id: str = Field(primary_key=True, index=True)


class SubmodelDescriptorRow(SQLModel, table=True):
    """A descriptor of the Submodel Registry (standalone, not nested in a shell descriptor)."""

    __tablename__ = "registry_submodel_descriptors"

    id: str = Field(primary_key=True)
    id_short: str | None = Field(default=None, index=True)
    semantic_id: str | None = Field(default=None, index=True)
    short_name: str | None = Field(default=None, index=True)
    body: str = Field(sa_column=Column(Text, nullable=False))
    ttl: float | None = Field(default=None)
    expires_at: float | None = Field(default=None, index=True)
    updated_at: float = Field(default=0.0)


REGISTRY_TABLES = [
    ShellDescriptorRow.__table__,  # type: ignore[attr-defined]
    ShellCapabilityRow.__table__,  # type: ignore[attr-defined]
    SubmodelDescriptorRow.__table__,  # type: ignore[attr-defined]
]
