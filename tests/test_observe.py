"""Observing negotiations: the recorder under a burst, `log`, `trace`, `stats`, `report`, the analysis API.

One real run of the demo plant is made per session (`demo_run`) and every command is checked
against its run database, queried here with plain SQL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from protocol.mosquitto import MosquittoProcess
from protocol.recorder import Recorder
from protocol.transport import BrokerAddress
from scenarios.launcher import RunOptions, run
from scenarios.loader import load_scenario
from twinbid import analysis
from twinbid.observe import app, follow_rows, mermaid

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "scenarios" / "demo.yaml"
runner = CliRunner()


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("observe") / "demo"
    result = asyncio.run(run(load_scenario(DEMO), RunOptions(out=out, progress=False)))
    assert result.ok, result.kpis
    return out


def sql(out: Path, query: str, *params: object) -> list[tuple]:
    with sqlite3.connect(out / "run.db") as conn:
        return conn.execute(query, params).fetchall()


def _count(out: Path, message_type: str) -> int:
    """Messages of a type in the run's outbox (what the recording must hold once each)."""
    return sql(out, "SELECT COUNT(*) FROM tb_outbox WHERE type = ?", message_type)[0][0]


def invoke(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


# --------------------------------------------------------------------------- report


def test_report_is_self_contained_and_names_every_product_and_resource(demo_run: Path) -> None:
    invoke("report", demo_run)
    page = (demo_run / "report.html").read_text(encoding="utf-8")
    products = [p for (p,) in sql(demo_run, "SELECT product FROM tb_product")]
    resources = [r for (r,) in sql(demo_run, "SELECT name FROM tb_agent WHERE kind != 'product'")]
    assert len(products) == 10 and len(resources) == 4
    for name in products + resources:
        assert f">{name}<" in page, name
    # readable offline: every figure embedded, nothing fetched from anywhere
    assert page.count("data:image/png;base64,") == 5
    assert "<script" not in page and "<link" not in page and 'src="http' not in page
    for fig in ("gantt", "utilisation", "queues", "negotiations", "distributions"):
        assert (demo_run / "figures" / f"{fig}.png").stat().st_size > 10_000
    assert (demo_run / "gantt.png").stat().st_size > 10_000  # the launcher's own chart


# --------------------------------------------------------------------------- trace


def _busy_conversation(out: Path) -> str:
    """A conversation with several proposals and rejections (a milling step)."""
    rows = sql(
        out,
        "SELECT conversation_id, COUNT(*) FROM tb_outbox WHERE type = 'proposal' "
        "GROUP BY conversation_id ORDER BY COUNT(*) DESC, conversation_id LIMIT 1",
    )
    assert rows and rows[0][1] >= 2
    return rows[0][0]


def test_trace_lists_each_message_once_in_order(demo_run: Path) -> None:
    cid = _busy_conversation(demo_run)
    expected = {
        m for (m,) in sql(demo_run, "SELECT message_id FROM tb_outbox WHERE conversation_id = ?", cid)
    }
    trace = json.loads(invoke("trace", demo_run, cid[:8], "--json"))
    ids = [m["message_id"] for m in trace]
    assert len(ids) == len(set(ids)) == len(expected) and set(ids) == expected
    assert trace[0]["type"] == "callForProposal"
    position = {m: i for i, m in enumerate(ids)}
    times = [m["time_ms"] for m in trace]
    assert times == sorted(times)
    for m in trace:  # every reply after what it answers
        if m["in_reply_to"] in position:
            assert position[m["in_reply_to"]] < position[m["message_id"]]
    types = [m["type"] for m in trace]
    assert types.index("acceptProposal") < types.index("informConfirm") < types.index("inform")
    # product/step works as well as an id, and the table names the winner
    product, step = sql(demo_run, "SELECT product, step FROM tb_step WHERE conversation_id = ?", cid)[0]
    assert json.loads(invoke("trace", demo_run, f"{product}/{step}", "--json")) == trace


def test_trace_deduplicates_redeliveries(demo_run: Path, tmp_path: Path) -> None:
    """The broker may deliver a message twice (QoS 1); the recording then holds it twice."""
    copy = tmp_path / "copy"
    shutil.copytree(demo_run, copy, ignore=shutil.ignore_patterns("figures", "aas", "assets", "broker"))
    lines = (copy / "messages.jsonl").read_text().splitlines(keepends=True)
    (copy / "messages.jsonl").write_text("".join(lines + lines[: len(lines) // 2]))
    cid = _busy_conversation(copy)
    trace = analysis.load(copy).trace(cid)
    assert trace["message_id"].is_unique
    assert len(trace) == sql(copy, "SELECT COUNT(*) FROM tb_outbox WHERE conversation_id = ?", cid)[0][0]
    assert (trace["deliveries"] >= 1).all() and (trace["deliveries"] >= 2).any()


def test_trace_mermaid(demo_run: Path) -> None:
    cid = _busy_conversation(demo_run)
    text = invoke("trace", demo_run, cid, "--mermaid")
    lines = text.splitlines()
    assert lines[0] == "sequenceDiagram"
    run_ = analysis.load(demo_run)
    trace = run_.trace(cid)
    receivers = run_.receivers()
    cfps = trace[trace["type"] == "callForProposal"]["message_id"]
    arrows = [ln for ln in lines if "->>" in ln or "--x" in ln or "-)" in ln]
    direct = int((trace["type"] != "callForProposal").sum())
    # one arrow per direct message, and one per delivery of each broadcast (a round may call again)
    assert len(arrows) == direct + sum(len(receivers[c]) for c in cfps)
    assert mermaid(trace, receivers) == text
    for name in set(trace["sender"]):
        assert f" as {name}" in text


# --------------------------------------------------------------------------- stats


def test_stats_counts_equal_the_database(demo_run: Path, tmp_path: Path) -> None:
    figures = json.loads(invoke("stats", demo_run, "--json", "--csv", tmp_path / "csv"))
    by_type = dict(sql(demo_run, "SELECT type, COUNT(*) FROM tb_outbox GROUP BY type"))
    assert figures["messages"]["by_type"] == by_type
    assert figures["messages"]["total"] == sum(by_type.values())
    calls = by_type["callForProposal"]
    ppc = figures["proposals_per_call"]
    assert ppc["calls"] == calls and sum(ppc["histogram"].values()) == calls
    assert sum(int(k) * v for k, v in ppc["histogram"].items()) == by_type["proposal"]
    kpis = json.loads((demo_run / "kpis.json").read_text())
    lat = figures["negotiation_latency_ms"]
    assert lat["count"] == kpis["negotiation_latency_ms"]["count"] == 40
    assert lat["p50"] == pytest.approx(kpis["negotiation_latency_ms"]["p50"])
    assert lat["p99"] == pytest.approx(kpis["negotiation_latency_ms"]["p99"])
    notes = dict(sql(demo_run, "SELECT kind, COUNT(*) FROM tb_note GROUP BY kind"))
    assert figures["notes"]["by_kind"] == notes and figures["notes"]["total"] == sum(notes.values())
    proposals = dict(
        sql(demo_run, "SELECT agent, COUNT(*) FROM tb_outbox WHERE type = 'proposal' GROUP BY agent")
    )
    wins = dict(sql(demo_run, "SELECT resource, COUNT(*) FROM tb_step GROUP BY resource"))
    cfps_in = dict(
        sql(demo_run, "SELECT agent, COUNT(*) FROM tb_inbox WHERE type = 'callForProposal' GROUP BY agent")
    )
    for name, r in figures["resources"].items():
        assert r["proposals"] == proposals.get(name, 0)
        assert r["wins"] == wins.get(name, 0)
        assert r["calls"] == cfps_in.get(name, 0)
        assert r["utilisation"] == pytest.approx(kpis["utilisation"].get(name, 0.0), abs=1e-4)
    rejected = sql(demo_run, "SELECT COUNT(*) FROM tb_outbox WHERE type = 'rejectProposal'")[0][0]
    assert sum(figures["rejections"].values()) == rejected
    names = {p.name for p in (tmp_path / "csv").iterdir()}
    assert {"messages.csv", "conversations.csv", "bids.csv", "steps.csv", "resources.csv"} <= names
    # the human-readable form runs too
    assert "proposals per call" in invoke("stats", demo_run)


# --------------------------------------------------------------------------- log


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_log_filters(demo_run: Path, tmp_path: Path) -> None:
    everything = _jsonl(invoke("log", demo_run, "--jsonl"))
    assert len(everything) == sql(demo_run, "SELECT COUNT(*) FROM tb_outbox")[0][0]
    assert all(
        "message" in row and row["message"]["frame"]["messageId"] == row["message_id"] for row in everything
    )

    cfps = _jsonl(invoke("log", demo_run, "--jsonl", "--type", "cfp"))
    assert {r["type"] for r in cfps} == {"callForProposal"}
    assert len(cfps) == _count(demo_run, "callForProposal") >= 40  # a product may call again

    mine = _jsonl(invoke("log", demo_run, "--jsonl", "--resource", "mill-fast"))
    assert mine and all(
        "mill-fast" in (r["sender"], r["receiver"]) or r["type"] == "callForProposal" for r in mine
    )
    received = sql(demo_run, "SELECT COUNT(*) FROM tb_inbox WHERE agent = 'mill-fast'")[0][0]
    sent = sql(demo_run, "SELECT COUNT(*) FROM tb_outbox WHERE agent = 'mill-fast'")[0][0]
    assert len(mine) == received + sent

    window = _jsonl(invoke("log", demo_run, "--jsonl", "--since", "10", "--until", "20"))
    expected = sql(demo_run, "SELECT COUNT(*) FROM tb_outbox WHERE created_sim BETWEEN 10 AND 20")[0][0]
    assert len(window) == expected and all(10 <= r["sim"] <= 20 for r in window)

    one = _jsonl(invoke("log", demo_run, "--jsonl", "--product", "bracket-1", "--type", "proposal,accept"))
    assert one and {r["type"] for r in one} == {"proposal", "acceptProposal"}
    assert {r["product"] for r in one} == {"bracket-1"}

    cid = _busy_conversation(demo_run)
    conv = _jsonl(invoke("log", demo_run, "--jsonl", "--conversation", cid[:10]))
    assert {r["conversation_id"] for r in conv} == {cid}

    with_events = _jsonl(invoke("log", demo_run, "--jsonl", "--events", "--type", "step-completed"))
    assert len(with_events) == 40 and {r["event"] for r in with_events} == {"step-completed"}

    csv = tmp_path / "log.csv"
    invoke("log", demo_run, "--resource", "stores", "--csv", csv)
    assert len(csv.read_text().splitlines()) == 1 + len(
        _jsonl(invoke("log", demo_run, "--jsonl", "--resource", "stores"))
    )
    total = sql(demo_run, "SELECT COUNT(*) FROM tb_outbox")[0][0]
    assert f"5 of {total} messages" in invoke("log", demo_run, "--limit", "5")


def test_log_follow_tails_a_growing_recording(demo_run: Path, tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(demo_run / "run.db", live / "run.db")
    for suffix in ("-wal", "-shm"):
        if (demo_run / f"run.db{suffix}").exists():
            shutil.copy(demo_run / f"run.db{suffix}", live / f"run.db{suffix}")
    lines = (demo_run / "messages.jsonl").read_text().splitlines(keepends=True)
    half = len(lines) // 2
    (live / "messages.jsonl").write_text("".join(lines[:half]) + lines[half][:40])  # a torn last line

    def writer() -> None:
        time.sleep(0.5)
        with (live / "messages.jsonl").open("a") as f:
            f.write(lines[half][40:])
            for line in lines[half + 1 :]:
                f.write(line)
                f.flush()

    threading.Thread(target=writer, daemon=True).start()
    rows = [r for batch in follow_rows(live, idle_timeout=1.5) for r in batch]
    assert len(rows) == len(lines)
    frames = [r for r in rows if r["type"] != "event"]
    assert all(r["sim"] is not None for r in frames)  # simulated times looked up in the live database
    assert {r["product"] for r in frames} >= {"bracket-1", "housing-5"}
    # the command prints each message once (a broadcast to two capabilities is recorded twice)
    out = _jsonl(invoke("log", live, "--follow", "--jsonl", "--idle-timeout", "0.5"))
    assert len(out) == len({r["message_id"] for r in frames})


# --------------------------------------------------------------------------- analysis API


def test_analysis_tables(demo_run: Path, tmp_path: Path) -> None:
    r = analysis.load(demo_run)
    proposals = sql(demo_run, "SELECT COUNT(*) FROM tb_outbox WHERE type = 'proposal'")[0][0]
    assert len(r.bids) == proposals
    assert r.bids[["price", "completion", "earliest_start", "duration", "valid_until"]].notna().all().all()
    assert (r.bids["resource"] == r.bids["sender"]).all()
    winners = r.bids[r.bids["won"]]
    steps = dict(((p, s), res) for p, s, res in sql(demo_run, "SELECT product, step, resource FROM tb_step"))
    assert len(winners) == len(steps)
    assert all(steps[(b.product, b.step)] == b.resource for b in winners.itertuples())
    assert set(r.bids["outcome"]) <= {"accepted", "rejected"}
    assert len(r.conversations) == 40 and (r.conversations["status"] == "done").all()
    assert r.messages["message_id"].is_unique and list(r.messages["order"]) == list(range(len(r.messages)))
    assert len(r.steps) == 40 and len(r.products) == 10
    assert len(r.events) == sql(demo_run, "SELECT COUNT(*) FROM tb_event")[0][0] >= 100
    assert set(r.resources["resource"]) == {"stores", "mill-fast", "mill-slow", "assembly"}
    assert (r.utilisation_over_time(20).to_numpy() <= 1 + 1e-9).all()
    q = r.queue_lengths()
    assert (q.to_numpy() >= 0).all() and q.iloc[-1].sum() == 0  # every booked step eventually started
    paths = r.to_csv(tmp_path)
    assert all(p.stat().st_size > 0 for p in paths)


def test_analysis_of_a_recording_alone(demo_run: Path, tmp_path: Path) -> None:
    """`twinbid observe` leaves only messages.jsonl; the tables come from the recording."""
    shutil.copy(demo_run / "messages.jsonl", tmp_path / "messages.jsonl")
    r = analysis.load(tmp_path)
    assert not r.has_database
    assert len(r.messages) == sql(demo_run, "SELECT COUNT(*) FROM tb_outbox")[0][0]
    assert len(r.conversations) == 40 and len(r.bids) == _count(demo_run, "proposal")
    assert set(r.conversations["product"]) == {p for (p,) in sql(demo_run, "SELECT product FROM tb_product")}
    # the schedule comes from the calls, awards and results themselves
    assert len(r.work_orders) == len(r.steps) == 40 and (r.steps["status"] == "done").all()
    kpis = json.loads((demo_run / "kpis.json").read_text())
    assert r.makespan == pytest.approx(kpis["makespan"])
    for row in r.resources.itertuples():
        assert row.utilisation == pytest.approx(kpis["utilisation"][row.resource], abs=1e-4)
    figures = json.loads(invoke("stats", tmp_path, "--json"))
    assert figures["messages"]["by_type"] == dict(
        sql(demo_run, "SELECT type, COUNT(*) FROM tb_outbox GROUP BY type")
    )


# --------------------------------------------------------------------------- the recorder


@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_recorder_loses_nothing_in_a_10000_message_burst(
    mosquitto, make_transport, tmp_path: Path, version: str
) -> None:
    n = 10_000
    out = tmp_path / "messages.jsonl"
    address = dataclasses.replace(mosquitto.address, protocol=version)
    recorder = Recorder(address, "burst", out, client_id="burst-observer", clean=False, db=tmp_path / "o.db")
    await asyncio.to_thread(recorder.start)
    pub = await make_transport("burst-pub", mosquitto.address)
    await asyncio.gather(
        *(
            pub.publish(
                f"i40/burst/to/r{i % 7}/burst-pub",
                json.dumps(
                    {"frame": {"type": "inform", "messageId": f"m{i}", "conversationId": f"c{i % 50}"}}
                ).encode(),
            )
            for i in range(n)
        )
    )
    await pub.flush(20)
    await asyncio.to_thread(recorder.stop, 0.5, 60)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    ids = Counter(r["message"]["frame"]["messageId"] for r in records)
    assert set(ids) == {f"m{i}" for i in range(n)}  # nothing lost
    assert len(records) == recorder.written == recorder.count >= n
    assert all(r["type"] == "inform" and r["received_ms"] > 0 for r in records)
    with sqlite3.connect(tmp_path / "o.db") as conn:
        assert conn.execute("SELECT COUNT(DISTINCT message_id) FROM tb_recorded").fetchone()[0] == n


async def test_recorder_process_records_and_does_not_outlive_its_launcher(
    mosquitto, make_transport, tmp_path: Path
) -> None:
    """The run's recorder runs in a child process: it records, reports its count when stopped,
    and stops by itself when the process that started it is gone (its stdin closes)."""
    from protocol.recorder_process import RecorderProcess

    out = tmp_path / "messages.jsonl"
    recorder = await asyncio.to_thread(
        RecorderProcess(mosquitto.address, "child", out, client_id="child-observer").start
    )
    pub = await make_transport("child-pub", mosquitto.address)
    for i in range(500):
        await pub.publish("i40/child/events/child-pub", json.dumps({"event": "tick", "i": i}).encode())
    await pub.flush(10)
    await asyncio.to_thread(recorder.stop, 0.5, 30)
    got = [json.loads(line)["message"]["i"] for line in out.read_text().splitlines()]
    assert sorted(got) == list(range(500)) and recorder.count == 500
    # The launcher dies: the child's stdin closes, the child writes what it has and exits.
    orphan = await asyncio.to_thread(
        RecorderProcess(mosquitto.address, "child", tmp_path / "orphan.jsonl", client_id="orphan").start
    )
    child = orphan.process
    assert child is not None and child.stdin is not None
    await pub.publish("i40/child/events/child-pub", b'{"event": "last"}')
    await pub.flush(10)
    child.stdin.close()
    assert await asyncio.to_thread(child.wait, 30) == 0
    assert json.loads((tmp_path / "orphan.jsonl").read_text())["message"] == {"event": "last"}


async def test_recorder_process_ends_quietly_when_its_launcher_stopped_listening(
    mosquitto, make_transport, tmp_path: Path
) -> None:
    """A launcher interrupted by Ctrl-C stops reading the recorder's answers before the recorder
    has said it stopped: the recorder still writes its whole log and exits 0, with no traceback."""
    from protocol.recorder_process import RecorderProcess

    out = tmp_path / "messages.jsonl"
    gone = await asyncio.to_thread(
        RecorderProcess(mosquitto.address, "child", out, client_id="unheard").start
    )
    child = gone.process
    assert child is not None and child.stdin is not None and child.stdout is not None
    pub = await make_transport("unheard-pub", mosquitto.address)
    await pub.publish("i40/child/events/unheard-pub", b'{"event": "last"}')
    await pub.flush(10)
    child.stdout.close()  # nobody reads its "STOPPED n" any more
    child.stdin.close()
    assert await asyncio.to_thread(child.wait, 30) == 0
    assert json.loads(out.read_text())["message"] == {"event": "last"}


@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_recorder_session_survives_its_absence(
    mosquitto, make_transport, tmp_path: Path, version: str
) -> None:
    if not isinstance(mosquitto, MosquittoProcess):
        pytest.skip("needs mosquitto's persistent sessions (fell back to the embedded broker)")
    out = tmp_path / "messages.jsonl"
    address = dataclasses.replace(mosquitto.address, protocol=version)
    first = Recorder(address, "away", out, client_id="away-observer", clean=False)
    await asyncio.to_thread(first.start)
    await asyncio.to_thread(first.stop, 0.1)
    pub = await make_transport("away-pub", mosquitto.address)
    for i in range(300):
        await pub.publish("i40/away/events/away-pub", json.dumps({"event": "tick", "i": i}).encode())
    await pub.flush(10)
    again = Recorder(address, "away", out, client_id="away-observer", clean=False)
    await asyncio.to_thread(again.start)
    await asyncio.to_thread(again.stop, 0.5)
    got = sorted(json.loads(line)["message"]["i"] for line in out.read_text().splitlines())
    assert got == list(range(300))


def test_the_runs_recorder_speaks_mqtt_3_on_the_runs_own_broker_and_5_elsewhere(tmp_path: Path) -> None:
    """MQTT 3.1.1 spares the recorder paho's decoding of MQTT 5 properties on every message; an
    external broker keeps MQTT 5, whose session expiry ends the recorder's queue once it has gone."""
    from protocol.broker import RunningBroker
    from protocol.credentials import Credentials
    from scenarios.launcher import recorder_address

    own = BrokerAddress("127.0.0.1", 18830)
    for kind in ("mosquitto", "embedded"):
        assert recorder_address(RunningBroker(kind, own), None).protocol == "3.1.1"
    assert recorder_address(RunningBroker("external", own), None).protocol == "auto"
    pinned = dataclasses.replace(own, protocol="5")
    assert recorder_address(RunningBroker("mosquitto", pinned), None).protocol == "5"  # asked for: kept
    credentials = Credentials("plant", tmp_path / "broker")
    observer = recorder_address(RunningBroker("mosquitto", own), credentials)
    assert observer.protocol == "3.1.1" and observer.username == credentials.observer


def test_observe_command_records_a_live_plant(mosquitto, tmp_path: Path) -> None:
    """`twinbid observe` as a process of its own, against a broker others publish to."""
    from protocol.transport import MqttTransport

    out = tmp_path / "observed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "twinbid.observe", "observe", "--broker", mosquitto.address.url(),
         "--ns", "live", "--out", str(out), "--duration", "4", "--sqlite", "--quiet"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while not (out / "messages.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # subscribed once the file exists and the SUBACK is back

        async def publish() -> None:
            async def ignore(_t: str, _p: bytes) -> None:
                return None

            t = MqttTransport("live-pub", mosquitto.address, ignore)
            await t.connect()
            for i in range(200):
                body = {"frame": {"type": "proposal", "messageId": f"x{i}", "conversationId": "c"}}
                await t.publish("i40/live/to/a/live-pub", json.dumps(body).encode())
            await t.flush(10)
            await t.close()

        asyncio.run(publish())
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    lines = (out / "messages.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["message"]["frame"]["messageId"] for x in lines) == sorted(
        f"x{i}" for i in range(200)
    )
    assert "recorded 200 messages" in stderr
    with sqlite3.connect(out / "observe.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM tb_recorded").fetchone()[0] == 200


def test_observe_joins_a_run_with_broker_accounts_by_its_output_folder(tmp_path: Path) -> None:
    """`twinbid run` starts its broker with per-agent accounts; `twinbid observe --plant OUT` finds
    the broker, the namespace and the observer's account in OUT and records the live plant."""
    import signal

    plant_out, observed = tmp_path / "plant", tmp_path / "observed"
    broker = ["--broker", "mosquitto"] if shutil.which("mosquitto") else []
    plant = subprocess.Popen(
        [sys.executable, "-m", "twinbid.cli", "run", str(ROOT / "scenarios" / "aircraft-sensor.yaml"),
         "--out", str(plant_out), "-q", *broker],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (plant_out / "plant.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)
        assert (plant_out / "broker" / "credentials.json").exists()  # accounts are on
        observer = subprocess.run(
            [sys.executable, "-m", "twinbid.observe", "observe", "--plant", str(plant_out),
             "--out", str(observed), "--duration", "3", "--quiet"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert observer.returncode == 0, observer.stderr
    finally:
        plant.send_signal(signal.SIGINT)
        try:
            plant.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            plant.kill()
    lines = (observed / "messages.jsonl").read_text().splitlines()
    assert lines and all(json.loads(x)["topic"].startswith("i40/aircraft-sensors/") for x in lines)
