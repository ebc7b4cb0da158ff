"""One run per record: a database (and an output folder) holds the record of one run.

A run claims its database before anything is written: a fresh run into a database that holds
another run is refused (it would mix two runs' rows and report the old one), a resumed run takes
up the run already recorded. While it runs, the launcher holds a lock on the record that the
operating system or the database server lets go of when the launcher dies, however it dies: an
``flock`` on a file beside a SQLite database or in the output folder, a PostgreSQL session-level
advisory lock held by the launcher's own connection. So two launchers never write one record.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlmodel import select

from agents.persistence.database import Database, new_run_id
from agents.persistence.tables import AgentRecord, RunRecord

try:
    import fcntl
except ImportError:  # not POSIX: no folder lock (PostgreSQL's advisory lock still holds)
    fcntl = None  # type: ignore[assignment]

#: the first key of the advisory lock; the second is the hash of the schema the run writes to, so
#: runs into different schemas of one PostgreSQL database do not exclude each other
_ADVISORY_CLASS = 2193


class RecordError(RuntimeError):
    """A record cannot take this run (it holds another, or another launcher is writing it)."""


def describe(db: Database) -> str:
    """The database as the user named it, without its password."""
    return db.engine.url.render_as_string(hide_password=True)


def claim(db: Database, scenario: str, *, resume: bool) -> str:
    """Make ``db`` the record of this run and return the run's id (also set as ``db.run_id``).

    Fresh: refused when the database holds a run already (any row of an agent, or a run row).
    Resumed: refused when it holds none; the recorded run goes on under its own id.
    """
    with db.session() as s:
        runs = s.exec(select(RunRecord)).all()
        held = runs or s.exec(select(AgentRecord.name).limit(1)).first() is not None
        if resume:
            if not held:
                raise RecordError(f"{describe(db)} holds no run to resume")
            run = runs[0]
            run.status, run.resumes = "running", run.resumes + 1
        elif held:
            other = runs[0] if runs else None
            what = f"run {other.run_id}{_about(other)}" if other else "a run"
            raise RecordError(
                f"{describe(db)} already holds {what}; choose another --out (or --db), or --resume"
            )
        else:
            run = RunRecord(run_id=new_run_id(), scenario=scenario, started_wall_ms=int(time.time() * 1000))
        s.add(run)
        s.commit()
    db.run_id = run.run_id
    return run.run_id


def _about(run: RunRecord) -> str:
    parts = [f"of scenario {run.scenario!r}"] if run.scenario else []
    if run.started_wall_ms:
        started = datetime.datetime.fromtimestamp(run.started_wall_ms / 1000, datetime.UTC)
        parts.append(f"started {started:%Y-%m-%d %H:%M:%S} UTC")
    return f" ({', '.join(parts)})" if parts else ""


def unclaim(db: Database, run_id: str) -> None:
    """A fresh run that never started an agent gives its claim back: a retry is not refused."""
    with db.session() as s:
        run = s.get(RunRecord, run_id)
        if run is not None and s.exec(select(AgentRecord.name).limit(1)).first() is None:
            s.delete(run)
            s.commit()


def end(db: Database, status: str = "ended") -> None:
    """The run stopped (finished, timed out or interrupted): resumable, not running."""
    with db.session() as s:
        run = s.get(RunRecord, db.run_id)
        if run is not None:
            run.status = status
            s.add(run)
            s.commit()


class RecordLock:
    """Held by the launcher while its run writes the record; let go by :meth:`release` or by the
    holder's death (the kernel drops its ``flock`` locks, the server its connection's locks)."""

    def __init__(self) -> None:
        self._files: list[int] = []
        self._connection: Any = None

    def folder(self, path: Path, what: str) -> None:
        """Lock the file ``path`` (created if need be); ``what`` names the record in the refusal."""
        if fcntl is None:
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RecordError(
                f"{what} is being written by another twinbid run: launcher (pid {holder}); "
                "stop that run first (SIGTERM to its launcher)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._files.append(fd)

    def database(self, db: Database) -> None:
        """Lock the database: a file beside a SQLite file, an advisory lock on PostgreSQL."""
        if db.is_sqlite:
            path = db.engine.url.database
            if path and path != ":memory:":
                self.folder(Path(f"{path}.run-lock"), describe(db))
            return
        if db.engine.dialect.name != "postgresql":
            return
        conn = db.engine.connect()
        key = text("SELECT pg_try_advisory_lock(:k, hashtext(current_schema()))")
        try:
            got = conn.execute(key, {"k": _ADVISORY_CLASS}).scalar()
            conn.commit()
        except BaseException:
            conn.close()
            raise
        if not got:
            conn.close()
            raise RecordError(f"{describe(db)} is being written by another twinbid run")
        self._connection = conn

    def release(self) -> None:
        if self._connection is not None:
            conn, self._connection = self._connection, None
            with contextlib.suppress(Exception):
                conn.execute(text("SELECT pg_advisory_unlock_all()"))
                conn.commit()
            with contextlib.suppress(Exception):
                conn.close()
        for fd in self._files:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._files.clear()
