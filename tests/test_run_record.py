"""One run per record: what a run leaves behind is whole, its own, and safe to retry.

Real plants through the launcher and the real CLI as a subprocess; SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from pathlib import Path

from scenarios.launcher import RunOptions, run
from scenarios.loader import load_scenario

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
        assert whole[0] == 40 and whole[1] > 300
        assert _counts(alone / "run.db") == whole
