"""Group commit: many agents' writes, one transaction, then their messages.

The write-ahead rule (persist the state change before publishing the message
that announces it) would cost one fsync per message if done naively. Instead,
handlers stage rows here and hand over the messages to publish; a single
writer thread commits everything staged so far in one transaction, and only
then are that batch's messages released, in the order they were staged. While
one batch is being written the next one fills, so durability costs latency of
one commit, not throughput.

Each row is checked when it is staged: a value no column can hold (an integer beyond 64 bits, a
float that is not finite) raises `Unstorable` in the handler that staged it, instead of failing
a commit that carries every agent's rows.

A batch that fails for a passing reason (the database locked beyond its busy timeout, a
connection to PostgreSQL lost) is written again, whole and before anything staged after it,
with growing pauses for up to ``retry_for`` seconds; meanwhile the agents go on staging. An
error that another attempt cannot mend (a constraint, a bug) costs only its own rows: the batch
is written again one row at a time, each under a savepoint, the rows the database refuses are
dropped (logged, counted in ``refused_rows``, ``failed`` set) and the messages of their owners
(the agent a row belongs to) in that batch are withheld; every other agent's rows and messages
go through. One that outlasts the retries drops the whole batch.

With SQLite, the write-ahead log is copied into the database file (a checkpoint) by a thread of
the journal's own, holding the writer lock, after every ``checkpoint_rows`` rows: done by the
commit that crosses SQLite's threshold, a checkpoint held the event loop (and every agent on it)
for 40-60 ms, a third of all the time spent writing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlmodel import SQLModel
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_delay, wait_exponential

try:
    import fcntl
except ImportError:  # not POSIX: SQLite's own busy handler decides
    fcntl = None  # type: ignore[assignment]

from agents.persistence.database import Database

log = logging.getLogger(__name__)

AfterCommit = Callable[[], Any]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: The columns that say whose a row is, in the order they are looked for (tb_work_order has a
#: resource, tb_product and tb_step a product, the rest an agent).
OWNER_COLUMNS = ("agent", "resource", "product")


class Unstorable(ValueError):
    """A row with a value no database column can hold; refused before it is staged."""


def check_storable(table: type[SQLModel], row: dict[str, Any]) -> None:
    """Raise `Unstorable` naming table, column and value unless every value fits its column's
    kind: integers within 64 bits (SQLite and PostgreSQL BIGINT), floats finite (NaN reads back
    as NULL from SQLite)."""
    for column, value in row.items():
        if isinstance(value, float):
            if math.isfinite(value):
                continue
        elif not isinstance(value, int) or INT64_MIN <= value <= INT64_MAX:
            continue
        name = table.__tablename__  # type: ignore[attr-defined]
        raise Unstorable(f"{name}.{column}: {value!r} cannot be stored (64-bit integers, finite floats)")


def owner_of(row: dict[str, Any]) -> str | None:
    """Whose row this is (see OWNER_COLUMNS); None when it names nobody."""
    for column in OWNER_COLUMNS:
        value = row.get(column)
        if isinstance(value, str):
            return value
    return None


_PRIMARY_KEYS: dict[type, tuple[str, ...]] = {}


def primary_key(table: type[SQLModel]) -> tuple[str, ...]:
    """The primary key's column names (SQLAlchemy's column collections are slow to walk per row)."""
    names = _PRIMARY_KEYS.get(table)
    if names is None:
        names = _PRIMARY_KEYS[table] = tuple(c.name for c in table.__table__.primary_key.columns)  # type: ignore[attr-defined]
    return names


def _writer_lock(db: Database) -> int | None:
    """An open lock file beside a SQLite database file (None for other databases); each call opens
    it anew, and flock locks belong to the open file: two descriptors contend like two processes."""
    if fcntl is None or not db.is_sqlite:
        return None
    path = db.engine.url.database
    if not path or path == ":memory:":
        return None
    return os.open(f"{path}.writer-lock", os.O_RDWR | os.O_CREAT, 0o644)


class Journal:
    def __init__(
        self,
        db: Database,
        *,
        threaded: bool | None = None,
        retry_for: float = 60.0,
        checkpoint_rows: int = 4000,
    ) -> None:
        self.db = db
        # A writer thread only pays off when the database is across a network: with SQLite the
        # commit is sub-millisecond, and a thread would wait up to the GIL switch interval (5 ms)
        # behind a busy event loop for every batch.
        self.threaded = (not db.is_sqlite) if threaded is None else threaded
        self._lock_fd = _writer_lock(db)
        self._statements: dict[tuple, str] = {}  # SQL in the driver's own dialect, built once
        self._quote = db.engine.dialect.identifier_preparer.quote
        self._mark = "?" if db.engine.dialect.paramstyle == "qmark" else "%s"
        self._upserts: dict[type[SQLModel], dict[tuple, dict[str, Any]]] = {}
        self._inserts: dict[type[SQLModel], list[dict[str, Any]]] = {}
        self._updates: dict[tuple[type[SQLModel], tuple[str, ...]], dict[tuple, tuple]] = {}
        self._after: list[tuple[str | None, AfterCommit]] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="journal")
        self._waiters: list[asyncio.Future] = []
        self.batches = 0
        self.rows = 0
        self.commit_seconds = 0.0
        self.lock_waits = 0  # batches that waited for another process's transaction
        self.lock_wait_seconds = 0.0  # (counted in commit_seconds too)
        self.retries = 0  # attempts after a passing failure
        self.retry_for = retry_for
        self.failed: BaseException | None = None
        self.refused_rows = 0  # rows the database refused, dropped alone (their owners' messages too)
        # SQLite file: checkpoints off the event loop (None: SQLite's own, in the commit).
        self.checkpoint_rows = checkpoint_rows if self._lock_fd is not None else None
        self._rows_at_checkpoint = 0  # `rows` when the last checkpoint was started
        self._checkpointing: concurrent.futures.Future | None = None
        self._checkpoint_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.checkpoints = 0
        self.checkpoint_seconds = 0.0  # in the checkpoint thread, not on the event loop
        # The journal's own driver connection, kept from its first batch to close(): checking one
        # out of SQLAlchemy's pool and resetting it for every batch cost more than SQLite's commit.
        self._conn: Any = None
        self.lazy_delay = 0.05
        self._lazy: asyncio.TimerHandle | None = None

    # --- staging (synchronous, from the event loop) ---------------------------------------------

    def put(self, table: type[SQLModel], row: dict[str, Any]) -> None:
        """Insert or replace the row with this primary key (the last put in a batch wins).
        Raises `Unstorable` (nothing staged) for a value no column can hold."""
        check_storable(table, row)
        key = tuple(row[c] for c in primary_key(table))
        self._upserts.setdefault(table, {})[key] = row
        if self._updates:  # a row put after a partial update of it wins for the columns it has
            for (t, cols), rows in self._updates.items():
                if t is table and row.keys() >= set(cols):
                    rows.pop(key, None)
        self._kick()

    def update(self, table: type[SQLModel], key: tuple, values: dict[str, Any], *, wake: bool = True) -> None:
        """Set some columns of an existing row, by primary key (in key column order); the rest of
        the row is not rewritten. Applied after the batch's puts and adds.

        ``wake=False`` lets the update ride on the next batch instead of starting one (or, when
        none comes, one started ``lazy_delay`` seconds later): for bookkeeping that nothing waits
        for and whose loss costs only repeated work after a crash (the publish watermark), which
        otherwise took a commit of its own several times a step.
        """
        check_storable(table, values)
        self._updates.setdefault((table, tuple(values)), {})[key] = tuple(values.values())
        if wake:
            self._kick()
        elif self._lazy is None:
            self._lazy = asyncio.get_running_loop().call_later(self.lazy_delay, self._lazy_due)

    def _lazy_due(self) -> None:
        self._lazy = None
        if self._updates:  # not taken by a batch meanwhile
            self._kick()

    def add(self, table: type[SQLModel], row: dict[str, Any]) -> None:
        """Append a row (autoincrement keys, logs). Raises `Unstorable` as `put` does."""
        check_storable(table, row)
        self._inserts.setdefault(table, []).append(row)
        self._kick()

    def after_commit(self, callback: AfterCommit, owner: str | None = None) -> None:
        """Run `callback` once everything staged so far is durable (publishing goes here).

        `owner` names the agent whose rows the callback announces: when the database refuses one
        of that agent's rows in the batch, the callback is withheld (and only then)."""
        self._after.append((owner, callback))
        self._kick()

    async def commit(self) -> None:
        """Wait until everything staged so far is durable."""
        if not self._pending() and self._idle.is_set():
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._kick()
        await fut

    # --- the writer ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="journal")

    async def close(self) -> None:
        await self.commit()
        if self._lazy is not None:
            self._lazy.cancel()
            self._lazy = None
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._executor.shutdown(wait=True)
        if self._checkpoint_executor is not None:
            self._checkpoint_executor.shutdown(wait=True)
            self._checkpoint_executor = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()  # back to the pool
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _pending(self) -> bool:
        return bool(self._upserts or self._inserts or self._updates or self._after or self._waiters)

    def _kick(self) -> None:
        self._idle.clear()
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._pending():
                self._idle.set()
                continue
            t0 = time.perf_counter()
            # Nothing to write (messages whose rows an earlier batch committed, a commit() awaited
            # with nothing staged): no transaction, no lock; they are durable already.
            rows = bool(self._upserts or self._inserts or self._updates)
            # The writer lock first, the batch after: what is staged while another process
            # writes joins this transaction instead of waiting for the next turn.
            locked = False if self.threaded or not rows else await self._take_writer_lock(loop)
            upserts, inserts, updates = self._upserts, self._inserts, self._updates
            after, waiters = self._after, self._waiters
            self._upserts, self._inserts, self._updates, self._after, self._waiters = {}, {}, {}, [], []
            refused: set[str | None] = set()
            try:
                if rows:
                    try:
                        await self._write_batch(loop, (upserts, inserts, updates), locked)
                    except Exception as exc:
                        if self._passing(exc):
                            raise
                        refused = await self._write_rows_alone(loop, (upserts, inserts, updates), exc)
            except Exception as exc:
                self.failed = exc
                log.exception("journal commit failed; %d messages withheld", len(after))
                for w in waiters:
                    if not w.done():
                        w.set_exception(exc)
                continue
            self.commit_seconds += time.perf_counter() - t0
            self.batches += 1
            self._maybe_checkpoint()
            for owner, cb in after:
                if refused and (owner in refused or None in refused):
                    continue  # announces a state the database refused: never published
                try:
                    cb()
                except Exception:
                    log.exception("after-commit callback failed")
            for w in waiters:
                if not w.done():
                    w.set_result(None)
            if self._pending():
                self._wake.set()
            else:
                self._idle.set()

    async def _write_batch(self, loop: asyncio.AbstractEventLoop, batch: tuple, locked: bool) -> None:
        """Write one batch (the writer lock already held when ``locked``); after a passing failure,
        again with growing pauses, letting go of the lock between attempts so that other
        processes can write."""
        try:
            await self._attempt(loop, batch, locked)
            return
        except Exception as exc:
            if not self._passing(exc):
                raise
            first = exc
        # The retrying machinery only once a write has failed: per batch it cost a tenth of the
        # journal's time, and nearly every batch succeeds at once.
        pause = 0.05
        self._warn_retry(first, pause)
        await asyncio.sleep(pause)
        attempts = AsyncRetrying(
            retry=retry_if_exception(self._passing),
            wait=wait_exponential(multiplier=pause, max=2.0),
            stop=stop_after_delay(self.retry_for),
            before_sleep=self._log_retry,
            reraise=True,
        )
        async for attempt in attempts:
            with attempt:
                self.retries += 1
                locked = False if self.threaded else await self._take_writer_lock(loop)
                await self._attempt(loop, batch, locked)

    async def _attempt(self, loop: asyncio.AbstractEventLoop, batch: tuple, locked: bool) -> None:
        try:
            if self.threaded:
                await loop.run_in_executor(self._executor, self._write, *batch)
            else:
                self._write(*batch)
        finally:
            if locked:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    async def _write_rows_alone(
        self, loop: asyncio.AbstractEventLoop, batch: tuple, first: BaseException
    ) -> set[str | None]:
        """The batch again, each row under a savepoint: the rows the database refuses are dropped
        and their owners returned; everyone else's rows are committed."""
        locked = False if self.threaded else await self._take_writer_lock(loop)
        try:
            if self.threaded:
                dropped = await loop.run_in_executor(self._executor, self._write_alone, *batch)
            else:
                dropped = self._write_alone(*batch)
        finally:
            if locked:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        self.failed = first
        self.refused_rows += len(dropped)
        for table, row, exc in dropped:
            log.error("journal refused a row of %s (owner %s), dropped alone: %s; row %.300r",
                      table.__tablename__, owner_of(row), exc, row)  # fmt: skip
        return {owner_of(row) for _, row, _ in dropped}

    def _write_alone(self, upserts: dict, inserts: dict, updates: dict) -> list[tuple]:
        """One transaction, one savepoint per row; returns (table, row, error) of each row refused."""
        dropped: list[tuple] = []
        work: list[tuple[type[SQLModel], dict[str, Any], str, tuple]] = []
        for table, by_key in upserts.items():
            work += [(table, r, self._sql(table, tuple(r), True), tuple(r.values())) for r in by_key.values()]
        for table, rows in inserts.items():
            work += [(table, r, self._sql(table, tuple(r), False), tuple(r.values())) for r in rows]
        for (table, columns), by_key in updates.items():
            keys = primary_key(table)
            for key, values in by_key.items():
                row = dict(zip(keys, key, strict=True)) | dict(zip(columns, values, strict=True))
                work.append((table, row, self._update_sql(table, columns), values + key))
        with self._transaction() as cursor:
            for table, row, sql, params in work:
                cursor.execute("SAVEPOINT tb_row")
                try:
                    cursor.execute(sql, params)
                except Exception as exc:
                    if self._passing(exc):
                        raise
                    cursor.execute("ROLLBACK TO SAVEPOINT tb_row")
                    dropped.append((table, row, exc))
                cursor.execute("RELEASE SAVEPOINT tb_row")
        self.rows += len(work) - len(dropped)
        return dropped

    def _passing(self, exc: BaseException) -> bool:
        """A failure another attempt may not meet: the database busy or locked, the connection
        lost. The driver's own OperationalError (rows go through its cursor) or SQLAlchemy's."""
        if isinstance(exc, sa_exc.DBAPIError):
            return exc.connection_invalidated or isinstance(
                exc, (sa_exc.OperationalError, sa_exc.InterfaceError)
            )
        dbapi = getattr(self.db.engine.dialect, "dbapi", None)
        passing = tuple(
            t for t in (getattr(dbapi, "OperationalError", None), getattr(dbapi, "InterfaceError", None)) if t
        )
        return bool(passing) and isinstance(exc, passing)

    @staticmethod
    def _log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        Journal._warn_retry(exc, state.next_action.sleep if state.next_action else 0.0)

    @staticmethod
    def _warn_retry(exc: BaseException | None, pause: float) -> None:
        log.warning("journal commit failed (%s); the batch is written again in %.2f s", exc, pause)

    async def _take_writer_lock(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Take the database's writer lock; wait for it off the event loop if another process has it.

        SQLite lets one process write at a time, and a writer that finds the database locked
        sleeps in steps of 1 to 100 ms before it tries again (its busy handler): with two agent
        processes committing a few hundred times a second, those sleeps were most of a commit's
        latency. The journals of all processes take this file lock around their transaction
        instead, so a waiting one writes the moment the other is done, and its event loop goes
        on handling messages while it waits.
        """
        if self._lock_fd is None:
            return False
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock_waits += 1
            t0 = time.perf_counter()
            await loop.run_in_executor(self._executor, fcntl.flock, self._lock_fd, fcntl.LOCK_EX)
            self.lock_wait_seconds += time.perf_counter() - t0
        return True

    def _maybe_checkpoint(self) -> None:
        if self.checkpoint_rows is None or self._checkpointing is not None:
            return
        if self.rows - self._rows_at_checkpoint < self.checkpoint_rows:
            return
        self._rows_at_checkpoint = self.rows
        if self._checkpoint_executor is None:
            self._checkpoint_executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="checkpoint"
            )
        self._checkpointing = self._checkpoint_executor.submit(self._checkpoint)
        self._checkpointing.add_done_callback(self._checkpoint_done)

    def _checkpoint(self) -> None:
        """Copy the log into the database file, in this thread (SQLite lets go of the GIL meanwhile).

        It holds the writer lock (a descriptor of its own, so that it contends with this journal's
        commits too), so no transaction appends to the log while it is copied and the next one
        starts the log afresh; the journals go on staging and commit what gathered as soon as it
        is done.
        """
        fd = _writer_lock(self.db)
        assert fd is not None  # checkpoints are only started for a SQLite file
        t0 = time.perf_counter()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with self.db.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            os.close(fd)  # lets go of the lock
        self.checkpoint_seconds += time.perf_counter() - t0
        self.checkpoints += 1

    def _checkpoint_done(self, fut: concurrent.futures.Future) -> None:
        self._checkpointing = None
        exc = fut.exception()
        if exc is not None:  # SQLite's own checkpoint in the commit remains: nothing is lost
            log.warning("WAL checkpoint failed: %s", exc)

    def _sql(self, table: type[SQLModel], columns: tuple[str, ...], upsert: bool) -> str:
        """INSERT (... ON CONFLICT DO UPDATE) for these columns.

        Rows go to the driver's executemany as tuples: SQLAlchemy's per-row parameter processing
        cost more than SQLite's own work. The ON CONFLICT form is the same for SQLite and PostgreSQL.
        """
        key = (table, columns, upsert)
        sql = self._statements.get(key)
        if sql is None:
            q, mark = self._quote, self._mark
            name = table.__table__.name  # type: ignore[attr-defined]
            sql = f"INSERT INTO {q(name)} ({', '.join(map(q, columns))}) VALUES ({', '.join([mark] * len(columns))})"
            if upsert:
                keys = primary_key(table)
                update = [f"{q(c)} = excluded.{q(c)}" for c in columns if c not in keys]
                conflict = f" ON CONFLICT ({', '.join(map(q, keys))}) DO "
                sql += conflict + ("UPDATE SET " + ", ".join(update) if update else "NOTHING")
            self._statements[key] = sql
        return sql

    def _update_sql(self, table: type[SQLModel], columns: tuple[str, ...]) -> str:
        """UPDATE of these columns by primary key."""
        key = (table, columns, "update")
        sql = self._statements.get(key)
        if sql is None:
            q, mark = self._quote, self._mark
            name = table.__table__.name  # type: ignore[attr-defined]
            sets = ", ".join(f"{q(c)} = {mark}" for c in columns)
            where = " AND ".join(f"{q(c)} = {mark}" for c in primary_key(table))
            sql = self._statements[key] = f"UPDATE {q(name)} SET {sets} WHERE {where}"
        return sql

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        """A cursor of the journal's own connection, committed when the block ends; after a
        failure the connection is rolled back, and replaced when the failure may have been the
        connection's."""
        if self._conn is None:
            self._conn = self.db.engine.raw_connection()
        conn = self._conn
        cursor = conn.cursor()
        try:
            yield cursor
            conn.commit()
        except BaseException as exc:
            try:
                conn.rollback()
                lost = self._passing(exc) and not self.db.is_sqlite
            except Exception:
                lost = True
            if lost:  # a new connection for the next attempt
                self._conn = None
                with contextlib.suppress(Exception):
                    conn.invalidate()
            raise
        finally:
            with contextlib.suppress(Exception):
                cursor.close()

    def _write(self, upserts: dict, inserts: dict, updates: dict) -> None:
        """One transaction on the journal's own connection, through the driver's cursor
        (SQLAlchemy's machinery is per call)."""
        written = 0
        with self._transaction() as cursor:
            for table, by_key in upserts.items():
                written += self._execute(cursor, table, list(by_key.values()), upsert=True)
            for table, rows in inserts.items():
                written += self._execute(cursor, table, rows, upsert=False)
            for (table, columns), by_key in updates.items():
                params = [values + key for key, values in by_key.items()]
                cursor.executemany(self._update_sql(table, columns), params)
                written += len(params)
        self.rows += written  # a batch written again counts once

    def _execute(
        self, cursor: Any, table: type[SQLModel], rows: list[dict[str, Any]], *, upsert: bool
    ) -> int:
        groups: dict[tuple[str, ...], list[tuple]] = {}
        if self.db.run_id and "run_id" in table.__table__.columns:  # type: ignore[attr-defined]
            stamp = {"run_id": self.db.run_id}  # every row carries its run (tables.RunStamped)
            rows = [row | stamp for row in rows]
        for row in rows:  # rows of one table nearly always have the same columns: one group
            groups.setdefault(tuple(row), []).append(tuple(row.values()))
        for columns, values in groups.items():
            cursor.executemany(self._sql(table, columns, upsert), values)
        return len(rows)
