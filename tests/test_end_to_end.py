"""Whole plants, end to end: real broker, real registry and AAS servers over HTTP, real database.

The demo scenario runs through `twinbid run` (the launcher), and what it leaves
behind is checked against the run database and the products' final AAS.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from basyx.aas import model
from conftest import postgres_schema
from sqlalchemy import inspect
from sqlmodel import select

from agents.aas import build
from agents.aas.io import read_aasx
from agents.aas.verify import verify_objects
from agents.persistence import open_database
from agents.persistence.database import sqlite_url
from agents.persistence.tables import (
    ANALYSIS_INDEXES,
    DocumentationRecord,
    InboxRecord,
    OutboxRecord,
    ProductRecord,
    StepRecord,
    WorkOrderRecord,
)
from scenarios.launcher import RunOptions, run
from scenarios.loader import load_scenario, load_scenario_text
from twinbid.verify_record import verify_folder

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "scenarios" / "demo.yaml"


def run_plant(scenario, out: Path, **kw) -> dict:
    result = asyncio.run(run(scenario, RunOptions(out=out, progress=False, **kw)))
    return result.kpis


def schedule(out: Path) -> list[tuple]:
    db = open_database(sqlite_url(out / "run.db"))
    with db.session() as s:
        rows = s.exec(select(WorkOrderRecord).where(WorkOrderRecord.state == "done")).all()
    db.dispose()
    return sorted((r.product, r.step, r.resource, round(r.started, 6), round(r.finished, 6)) for r in rows)


def check_record(
    out: Path, kpis: dict, total: int, *, recorder_complete: bool = True, db_url: str | None = None
) -> None:
    """The output folder agrees with the database, and every step is documented exactly once, in order."""
    assert kpis["products"] == {"total": total, "completed": total, "failed": 0}
    db = open_database(db_url or sqlite_url(out / "run.db"))
    with db.session() as s:
        products = s.exec(select(ProductRecord)).all()
        steps = s.exec(select(StepRecord)).all()
        docs = s.exec(select(DocumentationRecord)).all()
        done = s.exec(select(WorkOrderRecord).where(WorkOrderRecord.state == "done")).all()
        receipts = s.exec(select(InboxRecord.message_id, InboxRecord.payload)).all()
        sent = set(s.exec(select(OutboxRecord.message_id)).all())
    # the run is over: its messages and machines are indexed by conversation for analysis
    found = {
        i["name"]
        for t in ("tb_inbox", "tb_outbox", "tb_conversation")
        for i in inspect(db.engine).get_indexes(t)
    }
    assert found >= {name for name, _, _ in ANALYSIS_INDEXES}
    db.dispose()
    # every message an agent received is its sender's outbox row; the inbox keeps the receipt only
    assert receipts and all(payload == "" for _, payload in receipts)
    assert {message_id for message_id, _ in receipts} <= sent
    assert len(products) == total and all(p.status == "completed" for p in products)
    assert kpis["steps"]["completed"] == len(steps) == kpis["steps"]["total"] == len(done)
    assert sum(kpis["messages"]["by_type"].values()) == kpis["messages"]["total"]
    # one documentation row per step, and one execution per step
    assert len({(d.product, d.step) for d in docs}) == len(docs) == len(steps)
    assert len({(o.product, o.step) for o in done}) == len(done)
    executions = defaultdict(list)
    for o in sorted(done, key=lambda o: o.started):
        executions[o.product].append(o.step)
    for product, order in executions.items():
        assert order == sorted(order), f"{product} executed its steps out of plan order: {order}"
    lines = (out / "messages.jsonl").read_text().splitlines()
    if recorder_complete:  # (a broker restart may cost the recorder what was in flight)
        assert len(lines) >= kpis["messages"]["total"]  # the recorder also sees the progress events
    assert (out / "gantt.png").stat().st_size > 10_000
    assert json.loads((out / "kpis.json").read_text())["products"]["completed"] == total
    # The final AAS of every product: complete documentation, a nameplate, valid V3.1.
    packages = sorted((out / "aas").glob("*.aasx"))
    assert len(packages) == total
    checked, problems = verify_folder(out)  # every signature and chain link (twinbid verify)
    assert (checked, problems) == (total, [])
    for pkg in packages:
        objects = list(read_aasx(pkg).objects)
        assert verify_objects(objects) == [], pkg.name
        submodels = {o.id_short: o for o in objects if isinstance(o, model.Submodel)}
        assert "Nameplate" in submodels
        records = build.read_step_records(submodels["ProcessDocumentation"])
        plan = build.read_process_plan(submodels["ProcessPlan"])
        assert [r.index for r in records] == [s.index for s in plan]
        assert all(r.outcome == "completed" and r.resource and r.winner and r.bids for r in records)
        ends = [r.finished for r in records]
        assert all(r.started <= r.finished for r in records) and ends == sorted(ends)


def test_demo_on_the_embedded_broker_through_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "twinbid.cli", "run", str(DEMO), "--out", str(out), "-q"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "10/10 completed" in proc.stdout
    check_record(out, json.loads((out / "kpis.json").read_text()), 10)


def test_demo_on_mosquitto_twice_gives_the_same_schedule(tmp_path: Path, mosquitto) -> None:
    scenario = load_scenario(DEMO)
    first = run_plant(scenario, tmp_path / "a", broker=mosquitto.url)
    check_record(tmp_path / "a", first, 10)
    second = run_plant(scenario, tmp_path / "b", broker=mosquitto.url)
    assert schedule(tmp_path / "a") == schedule(tmp_path / "b")
    assert first["makespan"] == second["makespan"]


def test_deferral_of_top_priority_calls_is_a_scenario_option(tmp_path: Path) -> None:
    """`bidding.defer_until_start`: on, top-priority products reject offers that start later and
    call again; off, they take the best offer at once (fewer messages, every step still once).
    Unset, it is off where priorities are mixed, as in the demo (scenarios.assembly.defers)."""
    scenario = load_scenario(DEMO)
    assert scenario.bidding.defer_until_start is None

    def deferring(value: bool):
        return scenario.model_copy(
            update={"bidding": scenario.bidding.model_copy(update={"defer_until_start": value})}
        )

    on_kpis = run_plant(deferring(True), tmp_path / "on")
    off_kpis = run_plant(scenario, tmp_path / "off")
    check_record(tmp_path / "off", off_kpis, 10)

    def deferred(out: Path) -> int:
        with sqlite3.connect(out / "run.db") as conn:
            query = (
                "SELECT COUNT(*) FROM tb_outbox WHERE type = 'rejectProposal' AND payload LIKE '%deferred%'"
            )
            return conn.execute(query).fetchone()[0]

    assert deferred(tmp_path / "on") > 0 and deferred(tmp_path / "off") == 0
    assert off_kpis["messages"]["total"] < on_kpis["messages"]["total"]


def test_demo_in_two_processes(tmp_path: Path, mosquitto) -> None:
    kpis = run_plant(load_scenario(DEMO), tmp_path / "mp", broker=mosquitto.url, processes=2)
    check_record(tmp_path / "mp", kpis, 10)


@pytest.mark.postgres
def test_demo_in_two_processes_on_postgresql(tmp_path: Path, mosquitto) -> None:
    """The run database on PostgreSQL (skipped when no server answers): two agent processes write
    through their journals, the report reads it back."""
    with postgres_schema() as url:
        kpis = run_plant(load_scenario(DEMO), tmp_path / "pg", broker=mosquitto.url, processes=2, db=url)
        check_record(tmp_path / "pg", kpis, 10, db_url=url)
        assert not (tmp_path / "pg" / "run.db").exists()


LINE = """
name: priorities
namespace: prio
clock: {kind: virtual}
transport: {default_time: 0}
resources:
  - {kind: warehouse, name: stores, location: s, capacity: 100, stock: {blank: 40},
     capabilities: {retrieve: {duration: 1, cost_rate: 1}, store: {duration: 1, cost_rate: 1}}}
  - {kind: workstation, name: ws-a, location: a, capabilities: [{name: turning, duration: 4, cost_rate: 5}]}
  - {kind: workstation, name: ws-b, location: b, capabilities: [{name: turning, duration: 4, cost_rate: 1}]}
  - {kind: workstation, name: ws-c, location: c, capabilities: [{name: polishing, duration: 2, cost_rate: 2}]}
product_types:
  - name: shaft
    plan:
      - {capability: retrieve, parameters: {item: blank}}
      - {capability: turning}
      - {capability: polishing}
      - {capability: store}
orders:
  - {type: shaft, quantity: 10, priority: 1, release: 0}
  - {type: shaft, quantity: 10, priority: 5, release: 0}
"""


def test_twenty_products_two_priorities(tmp_path: Path, mosquitto) -> None:
    scenario = load_scenario_text(LINE, "priorities.yaml")
    kpis = run_plant(scenario, tmp_path / "p", broker=mosquitto.url)
    check_record(tmp_path / "p", kpis, 20)
    flow = kpis["flow_time"]["by_priority"]
    assert flow["1"] < flow["5"], flow
    db = open_database(sqlite_url(tmp_path / "p" / "run.db"))
    with db.session() as s:
        prio = {p.product: p.priority for p in s.exec(select(ProductRecord)).all()}
        turning = s.exec(select(StepRecord).where(StepRecord.capability == "turning")).all()
    db.dispose()
    # Whenever ws-a and ws-b offered the same completion, a priority-5 product took the cheaper ws-b.
    low = [st.resource for st in turning if prio[st.product] == 5]
    assert low.count("ws-b") > low.count("ws-a"), low


@pytest.mark.parametrize("name", ["demo.yaml", "aircraft-sensor.yaml", "ft06.yaml"])
def test_example_scenarios_validate(name: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "twinbid.cli", "validate", str(ROOT / "scenarios" / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "valid" in proc.stdout, proc.stderr


def test_a_bad_scenario_gets_a_precise_message_and_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO.read_text().replace("capacity: 40", "capacity: lots"))
    proc = subprocess.run(
        [sys.executable, "-m", "twinbid.cli", "run", str(bad), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "bad.yaml" in proc.stderr and "resources[0]" in proc.stderr and "capacity" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_cleanly_and_leaves_a_record(tmp_path: Path, sig: str) -> None:
    """A real SIGINT (Ctrl-C) or SIGTERM (a service manager, `timeout`) to a running `twinbid run`:
    it stops within seconds, writes its KPIs, and leaves no broker of its own running."""
    import signal
    import time

    out = tmp_path / "interrupted"
    broker = ["--broker", "mosquitto"] if sig == "SIGTERM" and shutil.which("mosquitto") else []
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "twinbid.cli",
            "run",
            str(ROOT / "scenarios" / "aircraft-sensor.yaml"),
            "--out",
            str(out),
            "-q",
            *broker,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (out / "run.db").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # let the plant work for a moment
    proc.send_signal(getattr(signal, sig))
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode in (1, 130), stderr
    assert "Traceback" not in stderr, stderr
    kpis = json.loads((out / "kpis.json").read_text())
    assert kpis["products"]["total"] == 100 and kpis["products"]["completed"] < 100
    left = [p for p in Path("/proc").glob("[0-9]*") if str(out) in _cmdline(p)]
    assert not left, f"processes of the run still alive: {[_cmdline(p) for p in left]}"


def _cmdline(proc_dir: Path) -> str:
    try:
        return (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


VENDOR_LINE = """
name: vendor-line
namespace: vendorline
clock: {kind: virtual}
transport: {default_time: 0}
vendors:
  - {name: acme, api_key_env: TWINBID_TEST_ACME_KEY, notify: "NOTIFY"}
resources:
  - {kind: workstation, name: ws-a, location: a, capabilities: [{name: turning, duration: 3, cost_rate: 1}]}
  - {kind: workstation, name: ws-b, location: b, capabilities: [{name: polishing, duration: 2, cost_rate: 1}]}
product_types:
  - {name: pin, plan: [{capability: turning}, {capability: polishing}]}
orders:
  - {type: pin, quantity: 3, priority: 1, release: 0, vendor: acme}
  - {type: pin, quantity: 1, priority: 5, release: 0}
"""


def test_vendors_hear_every_step_even_when_their_endpoint_fails_at_first(tmp_path: Path, monkeypatch) -> None:
    """Scenario orders placed for a vendor: every progress event reaches its endpoint, signed, once per key."""
    import http.server
    import threading

    from agents.ordertaking.auth import derive_webhook_secret
    from agents.ordertaking.webhooks import verify_signature
    from protocol.mosquitto import free_port

    received: list[tuple[dict, dict]] = []
    failures = {"left": 3}

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if failures["left"] > 0:  # the vendor's endpoint is down at first
                failures["left"] -= 1
                self.send_response(503)
                self.end_headers()
                return
            received.append((dict(self.headers), json.loads(body) | {"_raw": body.decode()}))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TWINBID_TEST_ACME_KEY", "tbk_acme_secret-key")
    try:
        scenario = load_scenario_text(
            VENDOR_LINE.replace("NOTIFY", f"http://127.0.0.1:{port}/hook"), "v.yaml"
        )
        kpis = run_plant(scenario, tmp_path / "v")
    finally:
        server.shutdown()
    assert kpis["products"]["completed"] == 4
    secret = derive_webhook_secret("tbk_acme_secret-key")
    keys = [h["Twinbid-Event-Id"] for h, _ in received]
    assert len(keys) == len(set(keys)), "an event was delivered twice"
    for headers, body in received:
        assert verify_signature(secret, body["_raw"].encode(), headers["Twinbid-Signature"])
    kinds = {(b["product"], b["type"]) for _, b in received}
    for product in ("pin-1", "pin-2", "pin-3"):
        for kind in ("manufacturing-accepted", "step-scheduled", "step-completed", "manufacturing-completed"):
            assert (product, kind) in kinds, (product, kind)
    assert not [b for _, b in received if b["product"] == "pin-4"]  # not a vendor's order


def test_scenario_faults_kill_and_restart_agents_and_the_broker(tmp_path: Path, mosquitto) -> None:
    """The scenario's `faults:` crash a resource and a product in-process and restart the broker."""
    import re

    from agents.persistence.tables import AgentRecord

    text = re.sub(
        r"faults: \[\].*\n",
        "faults:\n  - {at: 12, kill: mill-fast, restart_after: 3}\n  - {at: 25, kill: bracket-3, restart_after: 2}\n"
        "  - {at: 30, restart_broker: true}\n",
        DEMO.read_text(),
    ).replace("broker: null ", "broker: mosquitto ")
    result = asyncio.run(
        run(load_scenario_text(text, "faults.yaml"), RunOptions(out=tmp_path / "f", progress=False))
    )
    check_record(tmp_path / "f", result.kpis, 10, recorder_complete=False)
    said = "\n".join(result.notices)
    for event in (
        "mill-fast crashed",
        "mill-fast restarted",
        "bracket-3 crashed",
        "bracket-3 restarted",
        "broker restarted",
    ):
        assert event in said, said
    db = open_database(sqlite_url(tmp_path / "f" / "run.db"))
    with db.session() as s:
        restarts = {a.name: a.restarts for a in s.exec(select(AgentRecord)).all()}
    db.dispose()
    assert restarts["mill-fast"] == 1 and restarts["bracket-3"] == 1
    finished = [
        json.loads(line)["job_id"]
        for log in (tmp_path / "f" / "assets").glob("*.jsonl")
        for line in log.read_text().splitlines()
        if json.loads(line).get("event") == "finished"
    ]
    assert len(finished) == len(set(finished)) == 40


ORDERS_LINE = """
name: open-line
namespace: openline
clock: {kind: accelerated, time_scale: 50}
transport: {default_time: 0}
vendors:
  - {name: acme, api_key_env: TWINBID_TEST_ACME_KEY}
resources:
  - {kind: workstation, name: ws-a, location: a, capabilities: [{name: turning, duration: 4, cost_rate: 1}]}
  - {kind: workstation, name: ws-b, location: b, capabilities: [{name: polishing, duration: 4, cost_rate: 1}]}
product_types:
  - {name: gear, plan: [{capability: turning}, {capability: polishing}]}
orders:
  - {type: gear, quantity: 2, priority: 3, release: 0}
stop: {wall_timeout: 120}
"""


def test_a_vendor_orders_into_the_running_plant(tmp_path: Path, mosquitto, monkeypatch) -> None:
    """`twinbid run` of a scenario with vendors exposes the order-taking service; an order posted while
    the plant runs becomes a product twin, is manufactured, and the run waits for it."""
    import httpx
    from basyx.aas import model as aas_model

    from agents.aas.io import environment_json

    monkeypatch.setenv("TWINBID_TEST_ACME_KEY", "tbk_acme_0123456789abcdef")
    sm = build.submodel(
        "https://acme.example/sm/7/Tech", "Tech", "https://acme.example/sem/Tech", [build.prop("Teeth", 24)]
    )
    shell = build.shell(
        "https://acme.example/aas/7", "Gear7", global_asset_id="https://acme.example/asset/7", asset_type="gear",
        submodels=[sm],
    )  # fmt: skip
    urls: list[str] = []
    posted: list[dict] = []

    async def main() -> object:
        scenario = load_scenario_text(ORDERS_LINE, "open-line.yaml")
        ready = asyncio.Event()

        def announced(url: str) -> None:
            urls.append(url)
            ready.set()

        options = RunOptions(
            out=tmp_path / "o", progress=False, broker=mosquitto.url, on_orders_url=announced
        )
        plant = asyncio.create_task(run(scenario, options))
        await asyncio.wait_for(ready.wait(), 60)
        async with httpx.AsyncClient(base_url=urls[0], timeout=30) as client:
            r = await client.post(
                "/orders",
                content=environment_json([shell, sm]).encode(),
                headers={
                    "Content-Type": "application/json",
                    "Authorization": "Bearer tbk_acme_0123456789abcdef",
                },
                params={"priority": "1"},
            )
            assert r.status_code in (201, 202), r.text
            posted.append(r.json())
        return await plant

    result = asyncio.run(main())
    assert result.kpis["products"] == {"total": 3, "completed": 3, "failed": 0}, result.kpis["products"]
    vendor_product = posted[0]["product"]
    packages = {p.stem: p for p in (tmp_path / "o" / "aas").glob("*.aasx")}
    objects = list(read_aasx(packages[vendor_product]).objects)
    (twin,) = [o for o in objects if isinstance(o, aas_model.AssetAdministrationShell)]
    assert twin.id == "https://acme.example/aas/7"  # the vendor's shell, extended
    assert {o.id_short for o in objects if isinstance(o, aas_model.Submodel)} >= {
        "Tech", "Order", "ProcessPlan", "ProcessDocumentation", "Nameplate"
    }  # fmt: skip
