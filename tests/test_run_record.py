"""One run per record: what a run leaves behind is whole, its own, and safe to retry.

Real plants through the launcher and the real CLI as a subprocess; SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import needs_mosquitto, postgres_schema
from sqlalchemy import inspect, text
from sqlmodel import SQLModel, select

from agents.persistence import open_database, runs
from agents.persistence.database import sqlite_url
from agents.persistence.runs import RecordError
from agents.persistence.tables import AgentRecord
from protocol.broker import SLOW_ROUND_TRIP, probe_broker
from protocol.mosquitto import MosquittoProcess
from scenarios import launcher
from scenarios.launcher import RunOptions, run
from scenarios.loader import load_scenario
from twinbid.verify_record import verify_folder

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "scenarios" / "demo.yaml"


def _run(out: Path, **kw) -> dict:
    return asyncio.run(run(load_scenario(DEMO), RunOptions(out=out, progress=False, **kw))).kpis


def _counts(path: Path) -> tuple[int, int, int]:
    con = sqlite3.connect(path)
    try:
        return tuple(
            con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("tb_step", "tb_outbox", "tb_work_order")
        )  # type: ignore[return-value]
    finally:
        con.close()


def test_run_db_alone_is_the_whole_record_after_a_run_and_after_a_resume(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    for resume in (False, True):
        kpis = _run(out, resume=resume)
        assert kpis["products"]["completed"] == 10
        alone = tmp_path / f"alone-{resume}"
        alone.mkdir()
        shutil.copy(out / "run.db", alone / "run.db")  # without run.db-wal
        whole = _counts(out / "run.db")
        assert whole[0] == 40 and whole[1] > whole[0]  # every step, and the messages it took
        assert _counts(alone / "run.db") == whole
        # the resumed launch signs with the same keys: every record and chain still verifies
        assert verify_folder(out) == (10, [])


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "twinbid.cli", "run", str(DEMO), "-q", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def _run_ids(db_url: str) -> dict[str, set[str]]:
    """Each table of the record -> the run ids its rows carry."""
    db = open_database(db_url)
    try:
        with db.engine.connect() as conn:
            return {
                t.name: set(conn.execute(text(f'SELECT DISTINCT run_id FROM "{t.name}"')).scalars())
                for t in SQLModel.metadata.sorted_tables
                if "run_id" in t.columns and t.name in inspect(conn).get_table_names()
            }
    finally:
        db.dispose()


def _check_refused(db_url: str, kpis: dict, *, out: Path, db: str | None) -> None:
    """A fresh run into a record that holds ``kpis``' run is refused in one line and changes nothing."""
    before = _run_ids(db_url)
    args = ["--out", str(out)] + (["--db", db] if db else [])
    proc = _cli(*args, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "already holds run " + kpis["run_id"] in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "completed" not in proc.stdout
    assert _run_ids(db_url) == before


def test_a_run_id_in_every_table_and_a_fresh_run_into_a_sqlite_record_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    kpis = _run(out)
    url = sqlite_url(out / "run.db")
    ids = _run_ids(url)
    # every table of the record, written or not, carries the run id; every row written holds this run's
    assert {
        "tb_inbox",
        "tb_outbox",
        "tb_step",
        "tb_work_order",
        "tb_agent",
        "tb_run",
        "tb_vendor_order",
    } <= set(ids)
    assert kpis["run_id"] and all(v in (set(), {kpis["run_id"]}) for v in ids.values()), ids
    assert ids["tb_step"] == {kpis["run_id"]}
    mtime = (out / "kpis.json").stat().st_mtime_ns
    _check_refused(url, kpis, out=out, db=None)
    assert (out / "kpis.json").stat().st_mtime_ns == mtime
    # the same record goes on with --resume, under its own run id
    resumed = _cli("--resume", str(out), timeout=240)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert json.loads((out / "kpis.json").read_text())["run_id"] == kpis["run_id"]


def test_a_fresh_run_into_a_postgresql_database_holding_a_run_is_refused(tmp_path: Path) -> None:
    with postgres_schema() as url:
        kpis = _run(tmp_path / "first", db=url)
        assert kpis["products"]["completed"] == 10
        assert _run_ids(url)["tb_step"] == {kpis["run_id"]}
        # another output folder, the same database: refused, and the folder left as it was (absent)
        _check_refused(url, kpis, out=tmp_path / "second", db=url)
        assert not (tmp_path / "second").exists()


def test_a_database_of_an_earlier_twinbid_holds_a_run_and_its_rows_get_its_id(tmp_path: Path) -> None:
    """A v4 database (no run ids) that holds a run is upgraded: one run row, every row stamped."""
    path = tmp_path / "old.db"
    open_database(sqlite_url(path)).dispose()  # today's schema, taken back to v4 as an older twinbid left it
    con = sqlite3.connect(path)
    for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
        if "run_id" in [c[1] for c in con.execute(f'PRAGMA table_info("{table}")')] and table != "tb_run":
            con.execute(f'ALTER TABLE "{table}" DROP COLUMN "run_id"')
    con.executescript(
        'DROP TABLE tb_run; ALTER TABLE tb_product DROP COLUMN "selection"; UPDATE tb_schema_version SET version = 4;'
        "INSERT INTO tb_agent (name, kind, aas_id, status, started_wall_ms, restarts, published_seq)"
        " VALUES ('p-1', 'product', 'urn:p-1', 'finished', 1, 0, 0);"
    )
    con.commit()
    con.close()
    db = open_database(sqlite_url(path))
    try:
        assert db.run_id
        with db.session() as s:
            assert [a.run_id for a in s.exec(select(AgentRecord))] == [db.run_id]
        with pytest.raises(RecordError, match="already holds run " + db.run_id):
            runs.claim(db, "demo", resume=False)
        assert runs.claim(db, "demo", resume=True) == db.run_id
    finally:
        db.dispose()


HOLD = """
import sys, time
from agents.persistence import open_database
from agents.persistence.runs import RecordLock
lock = RecordLock()
lock.database(open_database(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_two_launchers_never_write_one_record_and_the_lock_dies_with_its_holder(
    tmp_path: Path, kind: str
) -> None:
    with contextlib.ExitStack() as stack:
        url = (
            stack.enter_context(postgres_schema())
            if kind == "postgresql"
            else sqlite_url(tmp_path / "shared.db")
        )
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD, url], stdout=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        stack.callback(holder.kill)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        proc = _cli("--out", str(tmp_path / "b"), "--db", url, timeout=120)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "being written by another twinbid run" in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        holder.send_signal(signal.SIGKILL)  # dies without letting go: the system lets go for it
        holder.wait(timeout=30)
        kpis = _run(tmp_path / "c", db=url)
        assert kpis["products"]["completed"] == 10


def test_two_launchers_on_one_output_folder(tmp_path: Path) -> None:
    """While a run writes a folder, a second launcher (here --resume of it) is refused at once."""
    out = tmp_path / "demo"
    slow = tmp_path / "slow.yaml"  # 1 s per time unit: still running whenever the second one starts
    slow.write_text(DEMO.read_text().replace("kind: virtual", "kind: accelerated\n  time_scale: 1000", 1))
    first = subprocess.Popen(
        [sys.executable, "-m", "twinbid.cli", "run", str(slow), "-q", "--out", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "plant.json").exists():  # the plant is up: the first launcher holds the record
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        second = subprocess.run(
            [sys.executable, "-m", "twinbid.cli", "run", str(slow), "-q", "--resume", str(out)],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
        )  # fmt: skip
        assert first.poll() is None, "the first run ended before the second one was refused"
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"{out} is being written by another twinbid run: launcher (pid {first.pid})" in second.stderr
    finally:
        first.send_signal(signal.SIGINT)  # Ctrl-C: the first run stops with a complete record
        stdout, stderr = first.communicate(timeout=240)
    assert first.returncode in (1, 130), stdout + stderr  # stopped before its products were done
    assert json.loads((out / "kpis.json").read_text())["run_id"]


@pytest.mark.parametrize(
    "args, names",
    [
        (["--broker", "mqtt://127.0.0.1:1"], "MQTT broker at mqtt://127.0.0.1:1"),
        (["--db", "postgresql+psycopg://twinbid:secret@127.0.0.1:1/test"], "database postgresql+psycopg://twinbid:***@127.0.0.1:1/test"),
    ],
)  # fmt: skip
def test_an_unreachable_broker_or_database_is_one_line_exit_2_and_a_retry_runs(
    tmp_path: Path, args: list[str], names: str
) -> None:
    out = tmp_path / "demo"
    proc = _cli("--out", str(out), *args, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and names in lines[0] and "secret" not in lines[0], proc.stderr
    assert not out.exists()  # nothing left behind
    retry = _cli("--out", str(out), timeout=240)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert "10/10 completed" in retry.stdout


@needs_mosquitto
def test_a_broker_that_delays_small_messages_is_named_once_with_the_fix(tmp_path: Path, caplog) -> None:
    """A mosquitto without ``set_tcp_nodelay true`` (its default) holds an answer back for the
    client's delayed acknowledgement; with it the round trip is far under the limit."""
    fast = MosquittoProcess(tmp_path / "fast").start()
    slow = MosquittoProcess(tmp_path / "slow", extra=["set_tcp_nodelay false"]).start()
    try:
        assert asyncio.run(probe_broker(fast.address)) < SLOW_ROUND_TRIP
        assert asyncio.run(probe_broker(slow.address)) > SLOW_ROUND_TRIP
        for broker, warned in ((fast, False), (slow, True)):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="scenarios.launcher"):
                running = asyncio.run(launcher._start_broker(broker.address.url(), tmp_path, None, None))
            assert running.kind == "external"
            said = [r.getMessage() for r in caplog.records if "set_tcp_nodelay true" in r.getMessage()]
            assert len(said) == (1 if warned else 0), said
            if warned:
                assert broker.address.url() in said[0] and "ms" in said[0]
    finally:
        fast.stop()
        slow.stop()


def test_rows_written_through_a_session_carry_the_run_id(tmp_path: Path) -> None:
    """The order-taking service writes its tables through sessions, not the journal."""
    from agents.ordertaking.tables import VendorSecretRecord

    db = open_database(sqlite_url(tmp_path / "run.db"))
    try:
        run_id = runs.claim(db, "demo", resume=False)
        with db.session() as s:
            s.add(VendorSecretRecord(vendor="acme", secret="s", updated_wall_ms=1))
            s.commit()
        assert _run_ids(db.url)["tb_vendor_secret"] == {run_id}
    finally:
        db.dispose()
