"""Persistence of the registry: SQLite (WAL) by default, PostgreSQL by URL (``postgresql+psycopg://...``).

Descriptors are kept as the JSON text the client sent (what comes back is byte-for-byte what was
registered, and listing needs no re-encoding); the indexed columns serve the lookups. Leases: a
descriptor registered with a TTL gets ``expires_at = now + ttl``; rows past their expiry are invisible
to every read (filtered in SQL) and deleted by :meth:`RegistryStore.purge_expired`.

The methods are synchronous and short (single-row statements on indexed columns); the service calls
them from its event loop, which is cheaper than a thread hop for sub-millisecond queries.

Read cache: lookups by id and shell listings (e.g. by capability) are answered from memory for up to
``cache_ttl`` seconds (default 1 s). Every write made through this store drops the affected entries at
once, so a single registry process — the normal deployment — always reads its own writes. If several
registry processes share one database, a write by another process becomes visible to this one within
``cache_ttl`` (a lookup by id of a new registration at once: misses are not cached). Leases are honoured by the cache: an
entry is never served past the lease expiry it was read with. ``cache_ttl=0`` turns the cache off.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import and_, bindparam, delete, event, insert, or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import StaticPool
from sqlmodel import SQLModel, create_engine

from .descriptors import capabilities_of, semantic_id_of, short_name_of
from .models import REGISTRY_TABLES, ShellCapabilityRow, ShellDescriptorRow, SubmodelDescriptorRow

DEFAULT_DB_URL = "sqlite:///twinbid-registry.sqlite"

_SHELLS = ShellDescriptorRow.__table__  # type: ignore[attr-defined]
_CAPS = ShellCapabilityRow.__table__  # type: ignore[attr-defined]
_SUBMODELS = SubmodelDescriptorRow.__table__  # type: ignore[attr-defined]


class AlreadyExists(Exception):
    pass


def make_engine(db_url: str | None) -> Engine:
    """An engine for ``db_url``; SQLite gets WAL, ``synchronous=NORMAL`` and a busy timeout."""
    url = db_url or DEFAULT_DB_URL
    if url.startswith("sqlite"):
        memory = url in ("sqlite://", "sqlite:///:memory:") or ":memory:" in url
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            poolclass=StaticPool if memory else None,
        )

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _: Any) -> None:
            cur = dbapi_conn.cursor()
            if not memory:
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


def _visible(table: Any, now: Any) -> Any:
    return or_(table.c.expires_at.is_(None), table.c.expires_at > now)


# Built once: the hot lookup skips SQLAlchemy's statement construction and coercion on every call.
_GET_SHELL = select(_SHELLS.c.body, _SHELLS.c.expires_at).where(
    _SHELLS.c.id == bindparam("id"), _visible(_SHELLS, bindparam("now"))
)


class RegistryStore:
    """Shell descriptors (with nested submodel descriptors) and standalone submodel descriptors."""

    def __init__(
        self,
        db_url: str | None = None,
        *,
        clock: Callable[[], float] = time.time,
        engine: Engine | None = None,
        cache_ttl: float = 1.0,
    ) -> None:
        self.engine = engine or make_engine(db_url)
        self.clock = clock
        self.cache_ttl = cache_ttl
        # id -> (body, lease expiry or None, cached at); listing key -> (bodies, last id, earliest expiry, cached at)
        self._by_id: dict[str, tuple[str, float | None, float]] = {}
        self._lists: dict[tuple[Any, ...], tuple[list[str], str | None, float | None, float]] = {}
        SQLModel.metadata.create_all(self.engine, tables=REGISTRY_TABLES)

    def _forget(self, aas_id: str | None = None) -> None:
        """Drop cached reads after a write through this store."""
        if aas_id is None:
            self._by_id.clear()
        else:
            self._by_id.pop(aas_id, None)
        self._lists.clear()

    def close(self) -> None:
        self.engine.dispose()

    def drop_tables(self) -> None:
        """Remove the registry's tables (tests)."""
        SQLModel.metadata.drop_all(self.engine, tables=REGISTRY_TABLES)

    # -- shell descriptors --------------------------------------------------------------------------------------------

    def _shell_row(self, desc: dict[str, Any], ttl: float | None, now: float) -> dict[str, Any]:
        return {
            "id": desc["id"],
            "id_short": desc.get("idShort"),
            "short_name": short_name_of(desc),
            "global_asset_id": desc.get("globalAssetId"),
            "asset_kind": desc.get("assetKind"),
            "asset_type": desc.get("assetType"),
            "body": json.dumps(desc, ensure_ascii=False, separators=(",", ":")),
            "ttl": ttl,
            "expires_at": now + ttl if ttl else None,
            "updated_at": now,
        }

    def put_shell(
        self, desc: dict[str, Any], ttl: float | None = None, *, create_only: bool = False
    ) -> tuple[bool, float | None]:
        """Create or replace; returns (created, expires_at). ``create_only`` raises :class:`AlreadyExists`."""
        now = self.clock()
        row = self._shell_row(desc, ttl, now)
        caps = capabilities_of(desc)
        with self.engine.begin() as conn:
            existing = conn.execute(select(_SHELLS.c.expires_at).where(_SHELLS.c.id == row["id"])).first()
            alive = existing is not None and (existing.expires_at is None or existing.expires_at > now)
            if alive and create_only:
                raise AlreadyExists(row["id"])
            if existing is None:
                try:
                    conn.execute(insert(_SHELLS).values(**row))
                except IntegrityError:  # lost a race with another writer
                    if create_only:
                        raise AlreadyExists(row["id"]) from None
                    conn.execute(update(_SHELLS).where(_SHELLS.c.id == row["id"]).values(**row))
            else:
                conn.execute(update(_SHELLS).where(_SHELLS.c.id == row["id"]).values(**row))
            conn.execute(delete(_CAPS).where(_CAPS.c.shell_id == row["id"]))
            if caps:
                conn.execute(insert(_CAPS), [{"shell_id": row["id"], "semantic_id": c} for c in caps])
        self._forget(row["id"])
        return not alive, row["expires_at"]

    def put_shells(self, descs: list[dict[str, Any]], ttl: float | None = None) -> tuple[int, float | None]:
        """Create or replace many descriptors in one transaction (all or none); returns (how many
        were created, expires_at).

        Why: a node starting thousands of agents registers (and renews) them in batches; one
        transaction and one cache flush per batch instead of one per descriptor.
        """
        if not descs:
            return 0, None
        now = self.clock()
        rows = {d["id"]: self._shell_row(d, ttl, now) for d in descs}  # the last one of an id wins
        caps = [
            {"shell_id": i, "semantic_id": c}
            for i, d in {d["id"]: d for d in descs}.items()
            for c in dict.fromkeys(capabilities_of(d))
        ]
        ids = list(rows)
        with self.engine.begin() as conn:
            existing: dict[str, float | None] = {}
            for chunk in _chunks(ids, 500):
                for r in conn.execute(
                    select(_SHELLS.c.id, _SHELLS.c.expires_at).where(_SHELLS.c.id.in_(chunk))
                ):
                    existing[r.id] = r.expires_at
            new = [rows[i] for i in ids if i not in existing]
            old = [rows[i] for i in ids if i in existing]
            if new:
                conn.execute(insert(_SHELLS), new)
            if old:
                stmt = (
                    update(_SHELLS)
                    .where(_SHELLS.c.id == bindparam("_id"))
                    .values({k: bindparam(k) for k in old[0] if k != "id"})
                )
                conn.execute(stmt, [{**r, "_id": r["id"]} for r in old])
            for chunk in _chunks(ids, 500):
                conn.execute(delete(_CAPS).where(_CAPS.c.shell_id.in_(chunk)))
            if caps:
                conn.execute(insert(_CAPS), caps)
        for i in ids:
            self._by_id.pop(i, None)
        self._lists.clear()
        created = sum(1 for i in ids if i not in existing or (existing[i] is not None and existing[i] <= now))
        return created, now + ttl if ttl else None

    def lookup(self, ids: list[str], capabilities: list[str]) -> tuple[dict[str, str], dict[str, list[str]]]:
        """Live descriptors (JSON text) by id, and those offering each capability (ordered by id),
        in two queries: the answers to many agents' lookups at once (absent ids are left out)."""
        now = self.clock()
        by_id: dict[str, str] = {}
        by_cap: dict[str, list[str]] = {c: [] for c in capabilities}
        with self.engine.connect() as conn:
            for chunk in _chunks(list(dict.fromkeys(ids)), 500):
                rows = conn.execute(
                    select(_SHELLS.c.id, _SHELLS.c.body).where(
                        _SHELLS.c.id.in_(chunk), _visible(_SHELLS, now)
                    )
                )
                by_id.update((r.id, r.body) for r in rows)
            for chunk in _chunks(list(by_cap), 500):
                rows = conn.execute(
                    select(_CAPS.c.semantic_id, _SHELLS.c.body)
                    .join(_SHELLS, _SHELLS.c.id == _CAPS.c.shell_id)
                    .where(_CAPS.c.semantic_id.in_(chunk), _visible(_SHELLS, now))
                    .order_by(_CAPS.c.semantic_id, _SHELLS.c.id)
                )
                for r in rows:
                    by_cap[r.semantic_id].append(r.body)
        return by_id, by_cap

    def update_shell_body(self, desc: dict[str, Any]) -> bool:
        """Replace the body of a live descriptor keeping its lease (for nested submodel-descriptor writes)."""
        now = self.clock()
        with self.engine.begin() as conn:
            current = conn.execute(
                select(_SHELLS.c.ttl, _SHELLS.c.expires_at).where(
                    _SHELLS.c.id == desc["id"], _visible(_SHELLS, now)
                )
            ).first()
            if current is None:
                return False
            row = self._shell_row(desc, None, now)
            row["ttl"], row["expires_at"] = current.ttl, current.expires_at
            conn.execute(update(_SHELLS).where(_SHELLS.c.id == desc["id"]).values(**row))
        self._forget(desc["id"])
        return True

    def get_shell_json(self, aas_id: str) -> str | None:
        now = self.clock()
        hit = self._by_id.get(aas_id)
        if hit is not None:
            body, expires, cached_at = hit
            if now - cached_at < self.cache_ttl and (expires is None or expires > now):
                return body
            del self._by_id[aas_id]
        with self.engine.connect() as conn:
            row = conn.execute(_GET_SHELL, {"id": aas_id, "now": now}).first()
        if row is None:
            return None
        if self.cache_ttl > 0:
            if len(self._by_id) > 100_000:
                self._by_id.clear()
            self._by_id[aas_id] = (row.body, row.expires_at, now)
        return row.body

    def get_shell(self, aas_id: str) -> dict[str, Any] | None:
        body = self.get_shell_json(aas_id)
        return json.loads(body) if body is not None else None

    def lease_of(self, aas_id: str) -> tuple[float | None, float | None] | None:
        """(ttl, expires_at) of a live shell descriptor, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(_SHELLS.c.ttl, _SHELLS.c.expires_at).where(
                    _SHELLS.c.id == aas_id, _visible(_SHELLS, self.clock())
                )
            ).first()
        return (row.ttl, row.expires_at) if row else None

    def renew_shell(self, aas_id: str, ttl: float | None = None) -> float | None:
        """Extend a live lease by ``ttl`` (default: the registered one). Returns the new expiry; KeyError if gone."""
        now = self.clock()
        with self.engine.begin() as conn:
            row = conn.execute(
                select(_SHELLS.c.ttl).where(_SHELLS.c.id == aas_id, _visible(_SHELLS, now))
            ).first()
            if row is None:
                raise KeyError(aas_id)
            length = ttl if ttl is not None else row.ttl
            expires = now + length if length else None
            conn.execute(update(_SHELLS).where(_SHELLS.c.id == aas_id).values(ttl=length, expires_at=expires))
        self._forget(aas_id)
        return expires

    def delete_shell(self, aas_id: str) -> bool:
        now = self.clock()
        with self.engine.begin() as conn:
            gone = conn.execute(
                delete(_SHELLS).where(_SHELLS.c.id == aas_id, _visible(_SHELLS, now))
            ).rowcount
            conn.execute(delete(_CAPS).where(_CAPS.c.shell_id == aas_id))
        self._forget(aas_id)
        return gone > 0

    def list_shells(
        self,
        *,
        limit: int | None = None,
        cursor: str | None = None,
        capability: str | None = None,
        short_name: str | None = None,
        id_short: str | None = None,
        asset_kind: str | None = None,
        asset_type: str | None = None,
    ) -> tuple[list[str], str | None]:
        """Bodies (JSON text) ordered by id, and the id to continue after (None at the end)."""
        now = self.clock()
        key = (limit, cursor, capability, short_name, id_short, asset_kind, asset_type)
        hit = self._lists.get(key)
        if hit is not None:
            bodies, last, earliest, cached_at = hit
            if now - cached_at < self.cache_ttl and (earliest is None or earliest > now):
                return bodies, last
            del self._lists[key]
        query = select(_SHELLS.c.id, _SHELLS.c.body, _SHELLS.c.expires_at).where(_visible(_SHELLS, now))
        if capability is not None:
            query = query.join(
                _CAPS, and_(_CAPS.c.shell_id == _SHELLS.c.id, _CAPS.c.semantic_id == capability)
            )
        if short_name is not None:
            query = query.where(_SHELLS.c.short_name == short_name)
        if id_short is not None:
            query = query.where(_SHELLS.c.id_short == id_short)
        if asset_kind is not None:
            query = query.where(_SHELLS.c.asset_kind == asset_kind)
        if asset_type is not None:
            query = query.where(_SHELLS.c.asset_type == asset_type)
        rows, last = self._page_rows(query, _SHELLS, limit, cursor)
        bodies = [r.body for r in rows]
        if self.cache_ttl > 0:
            if len(self._lists) > 10_000:
                self._lists.clear()
            expiries = [r.expires_at for r in rows if r.expires_at is not None]
            self._lists[key] = (bodies, last, min(expiries) if expiries else None, now)
        return bodies, last

    def _page_rows(
        self, query: Any, table: Any, limit: int | None, cursor: str | None
    ) -> tuple[list[Any], str | None]:
        if cursor is not None:
            query = query.where(table.c.id > cursor)
        query = query.order_by(table.c.id)
        if limit is not None:
            query = query.limit(limit + 1)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        if limit is not None and len(rows) > limit:
            rows = rows[:limit]
            return rows, rows[-1].id
        return rows, None

    def _page(
        self, query: Any, table: Any, limit: int | None, cursor: str | None
    ) -> tuple[list[str], str | None]:
        rows, last = self._page_rows(query, table, limit, cursor)
        return [r.body for r in rows], last

    # -- submodel descriptors (Submodel Registry) ---------------------------------------------------------------------

    def put_submodel(
        self, desc: dict[str, Any], ttl: float | None = None, *, create_only: bool = False
    ) -> tuple[bool, float | None]:
        now = self.clock()
        row = {
            "id": desc["id"],
            "id_short": desc.get("idShort"),
            "semantic_id": semantic_id_of(desc),
            "short_name": short_name_of(desc),
            "body": json.dumps(desc, ensure_ascii=False, separators=(",", ":")),
            "ttl": ttl,
            "expires_at": now + ttl if ttl else None,
            "updated_at": now,
        }
        with self.engine.begin() as conn:
            existing = conn.execute(
                select(_SUBMODELS.c.expires_at).where(_SUBMODELS.c.id == row["id"])
            ).first()
            alive = existing is not None and (existing.expires_at is None or existing.expires_at > now)
            if alive and create_only:
                raise AlreadyExists(row["id"])
            if existing is None:
                conn.execute(insert(_SUBMODELS).values(**row))
            else:
                conn.execute(update(_SUBMODELS).where(_SUBMODELS.c.id == row["id"]).values(**row))
        return not alive, row["expires_at"]

    def get_submodel_json(self, submodel_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(
                select(_SUBMODELS.c.body).where(
                    _SUBMODELS.c.id == submodel_id, _visible(_SUBMODELS, self.clock())
                )
            ).scalar()

    def delete_submodel(self, submodel_id: str) -> bool:
        now = self.clock()
        with self.engine.begin() as conn:
            return (
                conn.execute(
                    delete(_SUBMODELS).where(_SUBMODELS.c.id == submodel_id, _visible(_SUBMODELS, now))
                ).rowcount
                > 0
            )

    def list_submodels(
        self, *, limit: int | None = None, cursor: str | None = None, semantic_id: str | None = None
    ) -> tuple[list[str], str | None]:
        query = select(_SUBMODELS.c.id, _SUBMODELS.c.body).where(_visible(_SUBMODELS, self.clock()))
        if semantic_id is not None:
            query = query.where(_SUBMODELS.c.semantic_id == semantic_id)
        return self._page(query, _SUBMODELS, limit, cursor)

    # -- leases -------------------------------------------------------------------------------------------------------

    def purge_expired(self) -> int:
        """Delete every descriptor whose lease has run out; returns how many went."""
        now = self.clock()
        expired = and_(_SHELLS.c.expires_at.is_not(None), _SHELLS.c.expires_at <= now)
        self._forget()
        with self.engine.begin() as conn:
            ids = [r.id for r in conn.execute(select(_SHELLS.c.id).where(expired))]
            count = 0
            if ids:
                for chunk in _chunks(ids, 500):
                    conn.execute(delete(_CAPS).where(_CAPS.c.shell_id.in_(chunk)))
                    count += conn.execute(delete(_SHELLS).where(_SHELLS.c.id.in_(chunk), expired)).rowcount
            count += conn.execute(
                delete(_SUBMODELS).where(_SUBMODELS.c.expires_at.is_not(None), _SUBMODELS.c.expires_at <= now)
            ).rowcount
        return count

    def count_rows(self) -> dict[str, int]:
        """Rows per table including expired-but-not-yet-purged ones (tests, diagnostics)."""
        from sqlalchemy import func

        with self.engine.connect() as conn:
            return {
                t.name: conn.execute(select(func.count()).select_from(t)).scalar_one()
                for t in REGISTRY_TABLES
            }


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
