"""A resource offers exactly the capabilities its scenario declares, with the declared durations.

aircraft-sensor's ``raw-stores`` declares only ``retrieve``; it used to take store steps too,
at a hard-coded 1.0, because every simulated warehouse offered both operations.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml
from sqlmodel import select

from agents.persistence import open_database
from agents.persistence.database import sqlite_url
from agents.persistence.tables import WorkOrderRecord
from scenarios.assembly import make_asset
from scenarios.launcher import RunOptions, offered_capabilities, run
from scenarios.loader import ScenarioError, load_scenario, load_scenario_text

ROOT = Path(__file__).resolve().parents[1]
AIRCRAFT = ROOT / "scenarios" / "aircraft-sensor.yaml"


def test_a_warehouse_offers_only_its_declared_operations(tmp_path: Path) -> None:
    scenario = load_scenario(AIRCRAFT)
    raw, finished = scenario.resource("raw-stores"), scenario.resource("finished-goods")
    assert offered_capabilities(raw) == ("retrieve",)
    assert offered_capabilities(finished) == ("store",)
    assert make_asset(scenario, raw, tmp_path, 1).capabilities() == {"retrieve"}
    assert make_asset(scenario, finished, tmp_path, 1).capabilities() == {"store"}


def small_aircraft_sensor() -> str:
    """aircraft-sensor with one product per order (every product type and priority, 8 products)."""
    data = yaml.safe_load(AIRCRAFT.read_text())
    for order in data["orders"]:
        order["quantity"] = 1
        order.pop("vendor", None)
    data["vendors"] = []
    return yaml.safe_dump(data)


def test_raw_stores_runs_no_store_step(tmp_path: Path) -> None:
    scenario = load_scenario_text(small_aircraft_sensor(), "aircraft-small.yaml")
    out = tmp_path / "run"
    result = asyncio.run(run(scenario, RunOptions(out=out, progress=False)))
    assert result.kpis["products"]["completed"] == 8, result.kpis["products"]
    db = open_database(sqlite_url(out / "run.db"))
    with db.session() as s:
        done = s.exec(select(WorkOrderRecord).where(WorkOrderRecord.state == "done")).all()
    db.dispose()
    stores = [w for w in done if w.capability == "store"]
    assert len(stores) == 8
    assert {w.resource for w in stores} == {"finished-goods"}
    # finished-goods declares store: {uniform: [60, 120]}
    assert all(60 <= w.duration <= 120 for w in stores), [w.duration for w in stores]
    retrieves = [w for w in done if w.capability == "retrieve"]
    assert {w.resource for w in retrieves} == {"raw-stores"}
    assert all(w.duration == 60 for w in retrieves)


def test_a_plan_needing_an_undeclared_operation_is_a_scenario_error() -> None:
    data = yaml.safe_load(AIRCRAFT.read_text())
    data["resources"] = [r for r in data["resources"] if r["name"] != "finished-goods"]
    try:
        load_scenario_text(yaml.safe_dump(data), "no-store.yaml")
    except ScenarioError as exc:
        message = str(exc)
    else:
        raise AssertionError("a plan with a store step and no warehouse declaring store was accepted")
    assert "product_types[0].plan[8].capability" in message and "'store'" in message, message
