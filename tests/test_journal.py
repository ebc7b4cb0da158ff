"""The journal (group commit) on SQLite always and on PostgreSQL when a server answers.

The journal writes with the driver's own SQL (an INSERT ... ON CONFLICT per table and column set),
so what SQLAlchemy used to check is checked here: upserts keep the last row per key, updates touch
only the columns given, booleans and NULLs round-trip, autoincrement rows append, and messages
staged after a write go out only once it is durable.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import postgres_schema
from sqlmodel import select

from agents.persistence import Journal, open_database
from agents.persistence.journal import Unstorable
from agents.persistence.tables import AgentRecord, ConversationRecord, NoteRecord, OutboxRecord


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        database = open_database(f"sqlite:///{tmp_path / 'run.db'}")
        yield database
        database.dispose()
        return
    with postgres_schema() as url:
        database = open_database(url)
        yield database
        database.dispose()


def _outbox(message_id: str, seq: int, payload: str = "{}", published: bool = False) -> dict:
    return {
        "agent": "p-1",
        "message_id": message_id,
        "seq": seq,
        "conversation_id": "c-1",
        "type": "callForProposal",
        "topic": "i40/ns/cfp/milling/p-1",
        "created_wall_ms": 1_767_225_600_000,
        "created_sim": 0.5,
        "payload": payload,
        "published": published,
    }


def _rows(db, table, *order):
    with db.session() as s:
        return s.exec(select(table).order_by(*order)).all()


async def test_upserts_keep_the_last_row_per_key_and_messages_wait_for_the_commit(db) -> None:
    journal = Journal(db)
    journal.start()
    released: list[str] = []
    journal.put(OutboxRecord, _outbox("m-1", 1, '{"a": 1}'))
    journal.put(OutboxRecord, _outbox("m-2", 2))
    journal.put(OutboxRecord, _outbox("m-1", 1, '{"a": 2}'))  # same key in the same batch: last wins
    journal.after_commit(lambda: released.append("m-1"))
    assert released == []  # nothing goes out before the write is durable
    await journal.commit()
    assert released == ["m-1"]
    journal.put(OutboxRecord, {**_outbox("m-2", 2), "published": True})  # a later batch updates
    await journal.commit()
    journal.update(OutboxRecord, ("p-1", "m-1"), {"published": True})  # only the flag changes
    journal.update(OutboxRecord, ("p-1", "m-404"), {"published": True})  # no such row: nothing
    journal.put(OutboxRecord, _outbox("m-3", 3))
    journal.update(OutboxRecord, ("p-1", "m-3"), {"published": True})  # put, then update: both
    journal.update(OutboxRecord, ("p-1", "m-4"), {"published": True})
    journal.put(OutboxRecord, _outbox("m-4", 4))  # update, then the whole row: the row wins
    agent = {
        "name": "p-1",
        "kind": "product",
        "aas_id": "urn:p-1",
        "status": "running",
        "started_wall_ms": 0,
        "restarts": 0,
    }
    journal.put(AgentRecord, agent)
    await journal.commit()
    journal.update(AgentRecord, ("p-1",), {"published_seq": 3})
    journal.put(AgentRecord, {**agent, "restarts": 1})  # a row without that column: both stay
    await journal.commit()
    (row,) = _rows(db, AgentRecord, AgentRecord.name)
    assert (row.restarts, row.published_seq) == (1, 3)
    rows = _rows(db, OutboxRecord, OutboxRecord.seq)
    assert [(r.message_id, r.payload, r.published) for r in rows] == [
        ("m-1", '{"a": 2}', True),
        ("m-2", "{}", True),
        ("m-3", "{}", True),
        ("m-4", "{}", False),
    ]
    assert rows[0].created_sim == 0.5 and rows[0].created_wall_ms == 1_767_225_600_000
    await journal.close()


async def test_an_update_without_wake_rides_on_the_next_batch_or_is_written_soon_after(db) -> None:
    journal = Journal(db)
    journal.start()
    agent = {"name": "p-1", "kind": "product", "aas_id": "urn:p-1", "status": "running"}
    journal.put(AgentRecord, {**agent, "started_wall_ms": 0, "restarts": 0})
    await journal.commit()
    batches = journal.batches
    journal.lazy_delay = 0.5
    journal.update(AgentRecord, ("p-1",), {"published_seq": 7}, wake=False)
    await asyncio.sleep(0.1)
    assert journal.batches == batches  # no transaction of its own yet
    assert _rows(db, AgentRecord, AgentRecord.name)[0].published_seq == 0
    journal.put(OutboxRecord, _outbox("m-1", 1))  # the next batch takes it along
    await asyncio.sleep(0.1)
    assert journal.batches == batches + 1
    assert _rows(db, AgentRecord, AgentRecord.name)[0].published_seq == 7
    journal.lazy_delay = 0.05
    journal.update(AgentRecord, ("p-1",), {"published_seq": 9}, wake=False)  # nothing follows it
    for _ in range(100):
        await asyncio.sleep(0.02)
        if journal.batches == batches + 2:
            break
    assert _rows(db, AgentRecord, AgentRecord.name)[0].published_seq == 9
    await journal.close()


async def test_inserts_append_with_their_own_keys_and_nulls_round_trip(db) -> None:
    journal = Journal(db)
    journal.start()
    for i in range(3):
        note = {"agent": "r-1", "kind": "late", "detail": f"n{i}", "message_id": None, "sim": i, "wall_ms": i}
        journal.add(NoteRecord, note)
    journal.put(
        ConversationRecord,
        {
            "agent": "r-1",
            "key": "cfp-1",
            "role": "provider",
            "conversation_id": "c-1",
            "state": "proposed",
            "terminal": False,
            "snapshot": "{}",
            "updated_sim": 1.0,
        },
    )
    await journal.commit()
    notes = _rows(db, NoteRecord, NoteRecord.id)
    assert [n.detail for n in notes] == ["n0", "n1", "n2"]
    assert len({n.id for n in notes}) == 3 and all(n.message_id is None for n in notes)
    (conv,) = _rows(db, ConversationRecord, ConversationRecord.key)
    assert conv.terminal is False and conv.state == "proposed"
    assert journal.rows == 4 and journal.failed is None
    await journal.close()


async def test_a_refused_write_withholds_its_messages_and_the_journal_goes_on(db) -> None:
    journal = Journal(db)
    journal.start()
    released: list[int] = []
    bad = _outbox("m-9", 9)
    del bad["payload"]  # NOT NULL column missing: the database refuses the batch
    journal.put(OutboxRecord, bad)
    journal.after_commit(lambda: released.append(9), "p-1")
    await asyncio.wait_for(journal.commit(), 10)
    assert released == [] and journal.failed is not None  # never announced: it is not durable
    assert journal.retries == 0  # another attempt would be refused as well
    journal.put(OutboxRecord, _outbox("m-10", 10))
    journal.after_commit(lambda: released.append(10))
    await asyncio.wait_for(journal.commit(), 10)
    assert released == [10]
    assert [r.message_id for r in _rows(db, OutboxRecord, OutboxRecord.seq)] == ["m-10"]
    await journal.close()


async def test_one_agents_refused_row_costs_no_other_agent_anything(db) -> None:
    """Issue 21: one unsaveable row dropped a whole group commit (every agent's rows and messages
    of the batch). Now the batch is written again row by row under savepoints: only the refused
    row is dropped, only its owner's messages of the batch are withheld."""
    journal = Journal(db)
    journal.start()
    released: list[str] = []
    bad = _outbox("m-1", 1)
    del bad["payload"]  # NOT NULL column missing: the database refuses this row
    journal.put(OutboxRecord, bad)
    journal.after_commit(lambda: released.append("p-1"), "p-1")
    good = _outbox("m-2", 2) | {"agent": "p-2"}
    journal.put(OutboxRecord, good)
    journal.after_commit(lambda: released.append("p-2"), "p-2")
    journal.add(NoteRecord, {"agent": "p-2", "kind": "k", "detail": "d", "sim": 0.0, "wall_ms": 1})
    journal.update(AgentRecord, ("p-2",), {"published_seq": 2})  # no such row: updates nothing
    journal.after_commit(lambda: released.append("ack"))  # owned by nobody: not withheld
    await asyncio.wait_for(journal.commit(), 10)
    assert sorted(released) == ["ack", "p-2"]
    assert [(r.agent, r.message_id) for r in _rows(db, OutboxRecord, OutboxRecord.seq)] == [("p-2", "m-2")]
    assert [n.agent for n in _rows(db, NoteRecord, NoteRecord.id)] == ["p-2"]
    assert journal.refused_rows == 1 and journal.failed is not None
    journal.put(OutboxRecord, _outbox("m-3", 3))  # and p-1's next batch goes through
    journal.after_commit(lambda: released.append("p-1 again"), "p-1")
    await asyncio.wait_for(journal.commit(), 10)
    assert released[-1] == "p-1 again" and journal.refused_rows == 1
    await journal.close()


@pytest.mark.parametrize(
    ("column", "value"), [("seq", 10**30), ("seq", -(2**63) - 1), ("created_sim", float("nan")),
                          ("created_sim", float("inf"))],
)  # fmt: skip
async def test_what_no_column_can_hold_is_refused_before_it_is_staged(db, column: str, value: object) -> None:
    journal = Journal(db)
    journal.start()
    with pytest.raises(Unstorable, match=f"tb_outbox.{column}: .* cannot be stored"):
        journal.put(OutboxRecord, _outbox("m-1", 1) | {column: value})
    with pytest.raises(Unstorable):
        journal.update(OutboxRecord, ("p-1", "m-1"), {column: value})
    journal.put(OutboxRecord, _outbox("m-2", 2))
    await asyncio.wait_for(journal.commit(), 10)
    assert [r.message_id for r in _rows(db, OutboxRecord, OutboxRecord.seq)] == ["m-2"]
    assert journal.failed is None
    await journal.close()


async def test_a_batch_that_finds_the_database_locked_is_written_again(tmp_path: Path) -> None:
    """Another process holds SQLite's write lock longer than the busy timeout (here 50 ms): the
    batch fails with "database is locked", is written again once the lock is free, and its
    messages go out then. It used to be dropped, rows and messages."""
    import subprocess
    import sys

    from sqlalchemy import event

    path = tmp_path / "run.db"
    db = open_database(f"sqlite:///{path}")
    event.listen(db.engine, "connect", lambda conn, _r: conn.execute("PRAGMA busy_timeout=50"))
    db.engine.dispose()  # connections from now on wait 50 ms for a lock, then fail
    holder = subprocess.Popen(  # noqa: ASYNC220 - started before the loop has anything to do
        [
            sys.executable,
            "-c",
            "import sqlite3, time\n"
            f"db = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
            "db.execute('BEGIN EXCLUSIVE')\n"
            "print('locked', flush=True)\n"
            "time.sleep(1.0)\n"
            "db.execute('COMMIT')\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        journal = Journal(db)
        journal.start()
        released: list[int] = []
        journal.put(OutboxRecord, _outbox("m-1", 1))
        journal.after_commit(lambda: released.append(1))
        await asyncio.sleep(0.3)
        assert released == [] and journal.retries >= 1  # refused, waiting for the next attempt
        journal.put(OutboxRecord, _outbox("m-2", 2))  # staged meanwhile: written after it
        journal.after_commit(lambda: released.append(2))
        await asyncio.wait_for(journal.commit(), 20)
        assert released == [1, 2] and journal.failed is None
        assert [r.message_id for r in _rows(db, OutboxRecord, OutboxRecord.seq)] == ["m-1", "m-2"]
        await journal.close()
    finally:
        holder.wait(10)
        db.dispose()


async def test_epoch_milliseconds_fit_and_an_old_schema_is_upgraded(db) -> None:
    """Epoch ms exceed 32 bits: v1 declared them INTEGER, which PostgreSQL refused (schema v2).
    v3 added the agents' published watermark; an old run's agents get 0 (their outbox rows keep
    their own flags). v4 dropped the outbox's seq index; the conversation indexes are built for
    analysis when a run ends, and dropped while one runs."""
    from sqlalchemy import inspect as sa_inspect

    from agents.persistence.database import (
        build_analysis_indexes,
        drop_analysis_indexes,
        schema_version,
        upgrade,
    )
    from agents.persistence.tables import ANALYSIS_INDEXES, SCHEMA_VERSION, AgentRecord

    assert schema_version(db) == SCHEMA_VERSION == 6
    with db.engine.begin() as conn:
        conn.exec_driver_sql('CREATE INDEX "ix_tb_outbox_seq" ON "tb_outbox" ("seq")')  # as v3 had it
        conn.exec_driver_sql("UPDATE tb_schema_version SET version = 1")
        if db.engine.dialect.name == "postgresql":  # the v1 column type, as an old run left it
            conn.exec_driver_sql('ALTER TABLE "tb_outbox" ALTER COLUMN "created_wall_ms" TYPE INTEGER')
        conn.exec_driver_sql('ALTER TABLE "tb_agent" DROP COLUMN "published_seq"')  # as v2 left it
        conn.exec_driver_sql('ALTER TABLE "tb_product" DROP COLUMN "selection"')  # as v4 left it
        conn.exec_driver_sql(
            "INSERT INTO tb_agent (name, kind, aas_id, status, started_wall_ms, restarts)"
            " VALUES ('p-1', 'product', 'urn:p-1', 'running', 0, 0)"
        )
    assert upgrade(db) == 6 and schema_version(db) == 6
    assert _rows(db, AgentRecord, AgentRecord.name)[0].published_seq == 0
    assert "selection" in {c["name"] for c in sa_inspect(db.engine).get_columns("tb_product")}

    def indexes() -> set[str]:
        found = set()
        for table in ("tb_inbox", "tb_outbox", "tb_conversation"):
            found |= {i["name"] for i in sa_inspect(db.engine).get_indexes(table)}
        return found

    assert indexes() == set()  # the seq index gone, the others not built (no run has ended)
    build_analysis_indexes(db)
    build_analysis_indexes(db)  # again: nothing changes
    assert indexes() == {name for name, _, _ in ANALYSIS_INDEXES}
    drop_analysis_indexes(db)
    assert indexes() == set()
    column = next(c for c in sa_inspect(db.engine).get_columns("tb_outbox") if c["name"] == "created_wall_ms")
    if db.engine.dialect.name == "postgresql":
        assert column["type"].python_type is int and "BIG" in str(column["type"]).upper()
    journal = Journal(db)
    journal.start()
    journal.put(OutboxRecord, _outbox("m-1", 1))
    await journal.commit()
    assert _rows(db, OutboxRecord, OutboxRecord.seq)[0].created_wall_ms == 1_767_225_600_000
    await journal.close()


async def test_sqlite_journals_of_two_processes_take_turns_without_blocking_the_loop(tmp_path: Path) -> None:
    """Another process inside its write transaction holds the writer lock: our commit waits for it
    off the event loop (which goes on running) and writes the moment the lock is released."""
    import subprocess
    import sys
    import time

    db = open_database(f"sqlite:///{tmp_path / 'run.db'}")
    holder = subprocess.Popen(  # noqa: ASYNC220 - started before the loop has anything to do
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(tmp_path / 'run.db')!r} + '.writer-lock', os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(0.6)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    journal = Journal(db)
    journal.start()
    journal.put(OutboxRecord, _outbox("m-1", 1))
    t0 = time.monotonic()
    commit = asyncio.ensure_future(journal.commit())
    ticks = 0
    while not commit.done():
        await asyncio.sleep(0.01)
        ticks += 1
    waited = time.monotonic() - t0
    await commit
    assert journal.lock_waits == 1 and 0.3 < waited < 5
    assert ticks > 10  # the loop kept running while the journal waited
    assert [r.message_id for r in _rows(db, OutboxRecord, OutboxRecord.seq)] == ["m-1"]
    assert holder.wait(10) == 0
    await journal.close()
    db.dispose()


@pytest.mark.parametrize("checkpoint_rows", [50, None])
async def test_sqlite_log_is_copied_into_the_database_file_by_the_checkpoint_thread(
    tmp_path: Path, checkpoint_rows: int | None
) -> None:
    """Every ``checkpoint_rows`` rows the journal's own thread copies the write-ahead log into the
    database file (SQLite's checkpoint, done by the commit that crossed its threshold, held the
    event loop 40-60 ms); what it copied is in the file itself, without the log. Without it
    (None), a log this small stays a log: the file alone holds none of the rows."""
    import shutil
    import sqlite3

    path = tmp_path / "run.db"
    db = open_database(f"sqlite:///{path}")
    journal = Journal(db, checkpoint_rows=checkpoint_rows)
    journal.start()
    for batch in range(3):
        for n in range(40):
            seq = batch * 40 + n + 1
            journal.put(OutboxRecord, _outbox(f"m-{seq}", seq))
        await journal.commit()
    await journal.close()  # waits for a checkpoint under way
    copy = tmp_path / "file-only.db"
    shutil.copyfile(path, copy)  # the database file without its -wal
    with sqlite3.connect(copy) as conn:
        created = conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'tb_outbox'").fetchone()[0]
        in_file = conn.execute("SELECT count(*) FROM tb_outbox").fetchone()[0] if created else 0
    if checkpoint_rows is None:
        assert journal.checkpoints == 0 and in_file == 0
    else:
        assert journal.checkpoints >= 1 and journal.checkpoint_seconds > 0
        assert in_file >= 80  # copied once 50 rows had gathered: after the second batch at the latest
    assert len(_rows(db, OutboxRecord, OutboxRecord.seq)) == 120  # and nothing is lost either way
    db.dispose()


@pytest.mark.postgres
async def test_a_connection_the_server_dropped_is_replaced_and_the_batch_written_again() -> None:
    """The journal keeps one connection from batch to batch: when PostgreSQL ends it (a restart, an
    administrator, a failover), the next batch fails on it, is written again on a new connection,
    and its messages go out then; nothing is lost and nothing written twice."""
    import psycopg
    from conftest import PG_URL

    with postgres_schema() as url:
        db = open_database(url)
        journal = Journal(db)
        journal.start()
        released: list[int] = []
        journal.put(OutboxRecord, _outbox("m-1", 1))
        await journal.commit()
        cursor = journal._conn.cursor()  # the connection it keeps
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
        journal._conn.rollback()
        with psycopg.connect(PG_URL.replace("postgresql+psycopg", "postgresql"), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        journal.put(OutboxRecord, _outbox("m-2", 2))
        journal.after_commit(lambda: released.append(2))
        await asyncio.wait_for(journal.commit(), 20)
        assert released == [2] and journal.failed is None
        assert journal.retries >= 1  # the first attempt met the dropped connection
        assert [r.message_id for r in _rows(db, OutboxRecord, OutboxRecord.seq)] == ["m-1", "m-2"]
        assert journal.rows == 2
        await journal.close()
        db.dispose()
