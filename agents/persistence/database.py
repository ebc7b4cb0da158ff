"""Opening the run database and bringing its schema to the current version.

SQLite by default (WAL mode: readers never block the single writer, and a
commit is one fsync of the log), PostgreSQL by URL. The schema is created and
upgraded by numbered steps recorded in `tb_schema_version`, so a database left by
an older twinbid is upgraded in place and a newer one is refused.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import BigInteger, event, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session, SQLModel, create_engine, select

from agents.persistence import tables
from agents.persistence.tables import ANALYSIS_INDEXES, SCHEMA_VERSION, SchemaVersion


def _widen_epoch_ms(conn: Connection) -> None:
    """v2: epoch-millisecond columns are 64-bit. PostgreSQL's INTEGER is 32-bit and refused every
    timestamp; SQLite's INTEGER always was 64-bit, so it has nothing to change."""
    if conn.dialect.name != "postgresql":
        return
    present = set(inspect(conn).get_table_names())
    for table in SQLModel.metadata.sorted_tables:
        if table.name not in present:
            continue  # created later, already with the wide type
        for column in table.columns:
            if isinstance(column.type, BigInteger) and not column.primary_key:
                conn.exec_driver_sql(f'ALTER TABLE "{table.name}" ALTER COLUMN "{column.name}" TYPE BIGINT')


def _add_published_seq(conn: Connection) -> None:
    """v3: tb_agent.published_seq, the broker-acknowledged watermark of the agent's outbox
    (a database created at v3 has it from its first step)."""
    columns = {c["name"] for c in inspect(conn).get_columns("tb_agent")}
    if "published_seq" not in columns:
        conn.exec_driver_sql('ALTER TABLE "tb_agent" ADD COLUMN "published_seq" INTEGER NOT NULL DEFAULT 0')


def _analysis_indexes_only_after_runs(conn: Connection) -> None:
    """v4: the outbox's seq index is gone (no query used it) and the conversation indexes are
    built for analysis when a run ends (tables.ANALYSIS_INDEXES), not kept up to date during it."""
    conn.exec_driver_sql('DROP INDEX IF EXISTS "ix_tb_outbox_seq"')


def _add_product_selection(conn: Connection) -> None:
    """v5: tb_product.selection, the selection policy a product ranks offers with (NULL: the
    default one, which every product of an older record used)."""
    columns = {c["name"] for c in inspect(conn).get_columns("tb_product")}
    if "selection" not in columns:
        conn.exec_driver_sql('ALTER TABLE "tb_product" ADD COLUMN "selection" VARCHAR')


def _run_ids(conn: Connection) -> None:
    """v6: tb_run, and a run_id column in every table of the record. A database that already holds
    a run gets a run row (its scenario unknown) whose id every existing row takes."""
    tables.RunRecord.__table__.create(conn, checkfirst=True)  # type: ignore[attr-defined]
    present = set(inspect(conn).get_table_names())
    stamped = [t.name for t in SQLModel.metadata.sorted_tables if "run_id" in t.columns and t.name in present]
    stamped.remove("tb_run")
    for name in stamped:
        if "run_id" not in {c["name"] for c in inspect(conn).get_columns(name)}:
            conn.exec_driver_sql(f'ALTER TABLE "{name}" ADD COLUMN "run_id" VARCHAR NOT NULL DEFAULT \'\'')
    held = conn.exec_driver_sql('SELECT count(*) FROM "tb_agent"').scalar() if "tb_agent" in present else 0
    runs = conn.exec_driver_sql('SELECT count(*) FROM "tb_run"').scalar()
    if held and not runs:
        run_id = new_run_id()
        conn.execute(
            tables.RunRecord.__table__.insert().values(  # type: ignore[attr-defined]
                run_id=run_id, scenario="", started_wall_ms=0, status="ended"
            )
        )
        for name in stamped:
            conn.execute(text(f'UPDATE "{name}" SET "run_id" = :run_id'), {"run_id": run_id})


def new_run_id() -> str:
    """A run's id: random, so two runs never share one, whatever their scenario or host."""
    return uuid.uuid4().hex


#: version -> upgrade step from the version before. Version 1 is the initial schema.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    1: lambda conn: SQLModel.metadata.create_all(conn),
    2: _widen_epoch_ms,
    3: _add_published_seq,
    4: _analysis_indexes_only_after_runs,
    5: _add_product_selection,
    6: _run_ids,
}


class SchemaError(RuntimeError):
    """The database was written by a newer twinbid."""


@dataclass
class Database:
    url: str
    engine: Engine
    #: the run this database records (tb_run), stamped on every row written through the journal or
    #: a session; "" before a run claimed it (``agents.persistence.runs``)
    run_id: str = ""

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def session(self) -> Session:
        session = Session(self.engine, expire_on_commit=False)
        if self.run_id:
            event.listen(session, "before_flush", self._stamp)
        return session

    def _stamp(self, session: Session, _context: object, _instances: object) -> None:
        for row in session.new:
            if getattr(row, "run_id", None) == "":
                row.run_id = self.run_id

    def dispose(self) -> None:
        self.engine.dispose()


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def open_database(url: str, *, create: bool = True) -> Database:
    """Open (and create or upgrade) the run database at `url`."""
    _ = tables  # the table classes must be imported before create_all
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
    db = Database(url, engine)
    if create:
        upgrade(db)
        db.run_id = recorded_run(db) or ""
    return db


def recorded_run(db: Database) -> str | None:
    """The id of the run this database records, if one claimed it."""
    with db.engine.connect() as conn:
        return conn.execute(select(tables.RunRecord.run_id)).scalars().first()


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    # Measured with the journal's write mix (bench: 60 rows a step, messages of 1-3 KB): 16 KiB
    # pages hold several messages each, a 40 MiB WAL checkpoints a fifth as often, and a 64 MiB
    # page cache keeps the indexes' hot pages; together a row costs two thirds of the defaults'.
    cur.execute("PRAGMA page_size=16384")  # only takes effect on a new database file
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")  # a commit survives a killed process; fsync at checkpoints
    cur.execute("PRAGMA wal_autocheckpoint=2500")
    cur.execute("PRAGMA cache_size=-65536")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def schema_version(db: Database) -> int:
    with db.session() as s:
        try:
            row = s.exec(select(SchemaVersion)).first()
        except Exception:
            return 0
        return row.version if row else 0


def upgrade(db: Database) -> int:
    """Apply the missing schema steps; return the version now in force."""
    SchemaVersion.__table__.create(db.engine, checkfirst=True)
    current = schema_version(db)
    if current > SCHEMA_VERSION:
        raise SchemaError(f"database schema v{current} is newer than this twinbid (v{SCHEMA_VERSION})")
    with db.engine.begin() as conn:
        for version in range(current + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[version](conn)
    if current != SCHEMA_VERSION:
        with db.session() as s:
            row = s.get(SchemaVersion, 1) or SchemaVersion(id=1, version=SCHEMA_VERSION)
            row.version = SCHEMA_VERSION
            s.add(row)
            s.commit()
    return SCHEMA_VERSION


def drop_analysis_indexes(db: Database) -> None:
    """A run starts (or resumes): the plant writes without them."""
    with db.engine.begin() as conn:
        for name, _table, _columns in ANALYSIS_INDEXES:
            conn.exec_driver_sql(f'DROP INDEX IF EXISTS "{name}"')


def build_analysis_indexes(db: Database) -> None:
    """A run is over: index what researchers look up (messages and machines by conversation)."""
    with db.engine.begin() as conn:
        for name, table, columns in ANALYSIS_INDEXES:
            cols = ", ".join(f'"{c}"' for c in columns)
            conn.exec_driver_sql(f'CREATE INDEX IF NOT EXISTS "{name}" ON "{table}" ({cols})')


def checkpoint(db: Database) -> None:
    """A run is over: copy SQLite's write-ahead log into the database file and empty the log, so
    that the database file alone is the whole record (copied, mailed or archived without its
    ``-wal`` beside it). Raises if another connection keeps the log from being emptied."""
    if not db.is_sqlite:
        return
    with db.engine.connect() as conn:
        busy, _log_pages, _copied = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
    if busy:
        raise RuntimeError(f"{db.url}: the write-ahead log could not be emptied: another process has it open")
