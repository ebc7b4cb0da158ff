"""Simulated shop floor: durations, setups, breakdowns, warehouses, execution log and crash recovery."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shopfloor import (
    Breakdowns,
    Distances,
    Estimate,
    ExecutionLog,
    Fixed,
    Job,
    Normal,
    Triangular,
    Uniform,
    Warehouse,
    Workstation,
    make_clock,
    parse_duration,
)

ROOT = Path(__file__).resolve().parents[1]


async def _virtual():
    clock = make_clock("virtual", stall_timeout=5)
    await clock.start()
    return clock


def _job(jid: str, cap: str = "milling", **params) -> Job:
    return Job(jid, cap, params, product=jid.split("/")[0])


# -- durations -------------------------------------------------------------------------------


def test_parse_duration_forms():
    assert parse_duration(5) == Fixed(5.0)
    assert parse_duration(2.5).mean == 2.5
    assert parse_duration({"fixed": 3}) == Fixed(3.0)
    assert parse_duration({"uniform": [1, 3]}) == Uniform(1, 3)
    assert parse_duration({"triangular": [1, 2, 6]}) == Triangular(1, 2, 6)
    assert parse_duration({"normal": [10, 2]}) == Normal(10, 2)
    for model in (Fixed(3.0), Uniform(1, 3), Triangular(1, 2, 6), Normal(10, 2)):
        assert parse_duration(model.to_config()) == model
    for bad in (
        -1,
        "5",
        {"uniform": [3, 1]},
        {"triangular": [1, 7, 6]},
        {"normal": [-1, 1]},
        {"gamma": [1, 2]},
        {"uniform": [1]},
        {"uniform": [1, 2], "fixed": 1},
        True,
    ):
        with pytest.raises(ValueError):
            parse_duration(bad)


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    model=st.sampled_from([{"uniform": [1, 9]}, {"triangular": [1, 2, 9]}, {"normal": [3, 4]}, 4]),
    jobs=st.lists(st.text("abcxyz/0123", min_size=1, max_size=6), min_size=1, max_size=8, unique=True),
)
def test_durations_deterministic_and_order_independent(seed, model, jobs):
    def samples(order):
        ws = Workstation("m1", {"milling": model}, seed=seed)
        return {j: ws.estimate(_job(j), previous_capability="milling").duration for j in order}

    forward = samples(jobs)
    backward = samples(list(reversed(jobs)))
    assert forward == backward
    assert all(d > 0 for d in forward.values())  # the normal is truncated at > 0
    # Another asset name or seed gives another stream (for the random models).
    if not isinstance(model, int) and len(jobs) > 2:
        other = Workstation("m2", {"milling": model}, seed=seed)
        assert [other.estimate(_job(j), previous_capability="milling").duration for j in jobs] != list(
            forward.values()
        )


def test_duration_samples_stay_in_range():
    u, t = Uniform(2, 4), Triangular(1, 2, 3)
    for i in range(200):
        assert 2 <= u.sample_for(1, "a", i) <= 4
        assert 1 <= t.sample_for(1, "a", i) <= 3
        assert Normal(1, 5).sample_for(1, "a", i) > 0


async def test_estimate_is_what_execute_takes():
    clock = await _virtual()
    ws = Workstation("m1", {"milling": {"uniform": [5, 15]}}, setup={"triangular": [1, 2, 3]}, seed=3)
    job = _job("p1/1")
    est = ws.estimate(job, previous_capability=None)
    rec = await ws.execute(job, clock, previous_capability=None)
    assert (rec.setup, rec.duration) == (est.setup, est.duration)
    assert rec.end - rec.start == pytest.approx(est.total)
    assert clock.now() == pytest.approx(est.total)
    assert rec.outcome == "done" and rec.asset == "m1" and rec.product == "p1"
    await clock.stop()


def test_setup_applied_only_on_capability_change():
    ws = Workstation(
        "m1",
        {"milling": 10, "drilling": {"duration": 4, "setup": 7}},
        setup=3,
    )
    job = _job("p1/1")
    assert ws.estimate(job, previous_capability="milling") == Estimate(0.0, 10.0)
    assert ws.estimate(job, previous_capability="drilling") == Estimate(3.0, 10.0)
    assert ws.estimate(job, previous_capability=None) == Estimate(3.0, 10.0)
    drill = _job("p1/2", "drilling")
    assert ws.estimate(drill, previous_capability="milling") == Estimate(7.0, 4.0)
    assert ws.estimate(drill, previous_capability="drilling") == Estimate(0.0, 4.0)
    assert ws.estimate(_job("p1/3", "welding"), previous_capability=None) is None
    assert ws.capabilities() == frozenset({"milling", "drilling"})


def test_workstation_from_config_and_describe():
    ws = Workstation.from_config(
        "m7",
        {
            "location": "cell-a",
            "cost_rate": 2.5,
            "setup": 1,
            "capabilities": {"milling": {"normal": [10, 1]}},
            "mtbf": 100,
            "mttr": 5,
        },
        seed=1,
    )
    d = ws.describe()
    assert d["cost_rate"] == 2.5 and d["location"] == "cell-a" and d["capabilities"] == ["milling"]
    assert d["durations"] == {"milling": {"normal": [10, 1]}} and d["mtbf"] == 100
    with pytest.raises(ValueError):
        Workstation.from_config("m8", {"capabilities": {"x": 1}, "mtbf": 5})
    with pytest.raises(ValueError):
        Workstation.from_config("m8", {"capabilities": {"x": 1}, "colour": "red"})


# -- breakdowns ------------------------------------------------------------------------------


async def test_breakdown_extends_job_deterministically():
    async def run(seed):
        clock = await _virtual()
        ws = Workstation("m1", {"milling": 50}, setup=0, mtbf=20, mttr=5, seed=seed)
        recs = []
        for i in range(4):
            recs.append(await ws.execute(_job(f"p{i}/1"), clock, previous_capability="milling"))
        await clock.stop()
        return [(r.start, r.end, r.breakdown_delay, r.breakdowns) for r in recs]

    a, b = await run(11), await run(11)
    assert a == b
    assert any(delay > 0 for _, _, delay, _ in a)  # MTBF 20 < job length 50: failures hit the jobs
    for start, end, delay, hits in a:
        assert end == pytest.approx(start + 50 + delay)
        assert hits or delay == 0
    assert await run(12) != a


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 1000),
    start=st.floats(0, 500, allow_nan=False),
    work=st.floats(0, 200, allow_nan=False),
)
def test_breakdowns_give_exactly_the_work_in_up_time(seed, start, work):
    bd = Breakdowns(30, 8, seed=seed, asset="m")
    end, delay, hits = bd.finish(start, work)
    down = sum(max(0.0, min(b.until, end) - max(b.at, start)) for b in bd.events_until(end))
    assert end - start == pytest.approx(work + down, abs=1e-6)
    assert delay == pytest.approx(down, abs=1e-6)
    # same answer from a fresh stream asked in another order
    bd2 = Breakdowns(30, 8, seed=seed, asset="m")
    bd2.finish(start + 1000, 5)
    assert bd2.finish(start, work) == (end, delay, hits)


def test_available_from_during_repair():
    ws = Workstation("m1", {"milling": 5}, mtbf=10, mttr=50, seed=2)
    assert ws.breakdowns is not None
    first = ws.breakdowns.events_until(1000)[0]
    assert ws.available_from(first.at + first.repair / 2) == pytest.approx(first.until)
    assert ws.available_from(first.at / 2) == first.at / 2


# -- warehouse -------------------------------------------------------------------------------


async def test_warehouse_capacity_and_reservations():
    clock = await _virtual()
    wh = Warehouse("wh", capacity=3, inventory={"blank": 2}, store_duration=2, retrieve_duration=1)
    s1, s2 = _job("a/store", "store", item="gear"), _job("b/store", "store", item="gear")
    assert wh.estimate(s1, previous_capability=None) == Estimate(0.0, 2.0)
    assert wh.reserve(s1) is True
    assert wh.reserve(s1) is True  # idempotent
    assert wh.estimate(s1, previous_capability=None) is not None  # its own reservation counts for it
    assert wh.estimate(s2, previous_capability=None) is None  # full: 2 items + 1 reserved slot
    assert wh.reserve(s2) is False
    rec = await wh.execute(s1, clock, previous_capability=None)
    assert rec.outcome == "done" and wh.inventory == {"blank": 2, "gear": 1}
    assert wh.reservations() == {}
    rec2 = await wh.execute(s2, clock, previous_capability=None)  # executing into a full warehouse fails
    assert rec2.outcome == "failed" and "full" in (rec2.reason or "")
    assert wh.occupied == 3
    wh.release(s1)
    await clock.stop()


async def test_warehouse_retrieve_missing_and_inventory_updates():
    clock = await _virtual()
    wh = Warehouse("wh", capacity=10, inventory={"blank": 1}, retrieve_duration={"uniform": [1, 2]})
    r1, r2 = _job("p1/0", "retrieve", item="blank"), _job("p2/0", "retrieve", item="blank")
    assert wh.estimate(_job("p3/0", "retrieve", item="steel"), previous_capability=None) is None
    assert wh.estimate(_job("p3/0", "retrieve", item="blank", quantity=2), previous_capability=None) is None
    assert wh.reserve(r1)
    assert wh.estimate(r2, previous_capability=None) is None  # the only blank is held for p1
    assert wh.available("blank") == 0 and wh.available("blank", exclude_job="p1/0") == 1
    rec = await wh.execute(r1, clock, previous_capability=None)
    assert rec.outcome == "done" and 1 <= rec.duration <= 2
    assert wh.inventory == {}
    failed = await wh.execute(r2, clock, previous_capability=None)
    assert failed.outcome == "failed" and "missing" in failed.reason
    assert wh.job_status("p2/0").state == "finished"
    # A failed attempt may be retried once the item is there.
    await wh.execute(_job("p2/in", "store", item="blank"), clock, previous_capability=None)
    again = await wh.execute(r2, clock, previous_capability=None)
    assert again.outcome == "done" and again.attempt == 2
    # Finished goods: the item defaults to the product.
    await wh.execute(Job("p9/store", "store", {}, product="p9"), clock, previous_capability=None)
    assert wh.inventory == {"p9": 1}
    await clock.stop()


def test_warehouse_config_names_capabilities():
    wh = Warehouse.from_config(
        "wh2",
        {
            "capacity": 5,
            "store": {"capability": "put-away", "duration": 3},
            "retrieve": {"capability": "pick"},
        },
    )
    assert wh.capabilities() == frozenset({"put-away", "pick"})
    assert wh.estimate(_job("x/1", "put-away", item="i"), previous_capability=None) == Estimate(0.0, 3.0)
    with pytest.raises(ValueError):
        Warehouse("w", capacity=1, inventory={"a": 2})


# -- execution log and crash recovery (in-process) -------------------------------------------


async def _crash_mid_job(asset, job, clock, at: float) -> None:
    """Run ``job`` and 'kill the process' at simulated time ``at`` (the task dies mid-step)."""
    task = asyncio.get_running_loop().create_task(asset.execute(job, clock, previous_capability="milling"))
    clock.call_at(at, task.cancel)
    with pytest.raises(asyncio.CancelledError):
        await task
    asset.close()


async def test_execution_log_survives_reconstruction(tmp_path):
    path = tmp_path / "m1.jsonl"
    clock = await _virtual()
    ws = Workstation("m1", {"milling": {"uniform": [20, 40]}}, setup=0, seed=5, log_path=path)
    done = await ws.execute(_job("p1/1"), clock, previous_capability="milling")
    b = _job("p2/1")
    planned = ws.estimate(b, previous_capability="milling")
    start_b = clock.now()
    await _crash_mid_job(ws, b, clock, at=start_b + 5)
    await clock.stop()
    lines_before = path.read_text().splitlines()

    # "Restart": a new process, a new virtual clock from 0 (same calendar origin), the same log.
    clock = await _virtual()
    ws2 = Workstation("m1", {"milling": {"uniform": [20, 40]}}, setup=0, seed=5, log_path=path)
    st_a, st_b = ws2.job_status("p1/1"), ws2.job_status("p2/1")
    assert st_a.state == "finished" and st_a.record == done
    assert st_b.state == "started" and st_b.record.outcome == "running"
    assert st_b.record.end == pytest.approx(start_b + planned.total)
    assert ws2.job_status("p3/1").state == "not_started"

    # A finished job is not executed again: same record, no log entry, no time spent.
    again = await ws2.execute(_job("p1/1"), clock, previous_capability="milling")
    assert again == done and clock.now() == 0.0
    assert path.read_text().splitlines() == lines_before

    # The started job resumes: it completes the remaining time, to its planned end.
    resumed = await ws2.execute(b, clock, previous_capability="milling")
    assert resumed.resumed and resumed.outcome == "done"
    assert resumed.end == pytest.approx(start_b + planned.total)
    assert resumed.start == pytest.approx(start_b)
    assert clock.now() == pytest.approx(resumed.end)
    events = [json.loads(x)["event"] for x in path.read_text().splitlines()]
    assert events == ["started", "finished", "started", "finished"]
    ws2.close()
    # Third incarnation: everything finished, nothing re-executed.
    ws3 = Workstation("m1", {"milling": {"uniform": [20, 40]}}, setup=0, seed=5, log_path=path)
    assert [r.job_id for r in ws3.records()] == ["p1/1", "p2/1"]
    assert ws3.last_capability == "milling"
    ws3.close()
    await clock.stop()


async def test_warehouse_inventory_survives_reconstruction(tmp_path):
    path = tmp_path / "wh.jsonl"
    clock = await _virtual()
    wh = Warehouse(
        "wh", capacity=4, inventory={"blank": 3}, store_duration=10, retrieve_duration=10, log_path=path
    )
    await wh.execute(_job("p1/0", "retrieve", item="blank"), clock, previous_capability=None)
    await _crash_mid_job(wh, _job("p2/0", "retrieve", item="blank"), clock, at=clock.now() + 2)
    wh = Warehouse(
        "wh", capacity=4, inventory={"blank": 3}, store_duration=10, retrieve_duration=10, log_path=path
    )
    assert wh.inventory == {"blank": 1}  # the crashed retrieve had taken its item out
    await _crash_mid_job(wh, _job("p3/9", "store", item="gear", quantity=2), clock, at=clock.now() + 2)
    # A new config inventory is ignored: the log is the physical truth.
    wh = Warehouse(
        "wh", capacity=4, inventory={"blank": 99}, store_duration=10, retrieve_duration=10, log_path=path
    )
    assert wh.inventory == {"blank": 1} and wh.occupied == 3  # the store in progress holds 2 slots
    assert wh.estimate(_job("p4/9", "store", item="x", quantity=2), previous_capability=None) is None
    await wh.execute(_job("p3/9", "store", item="gear", quantity=2), clock, previous_capability=None)
    await wh.execute(_job("p2/0", "retrieve", item="blank"), clock, previous_capability=None)
    assert wh.inventory == {"blank": 1, "gear": 2}
    wh.close()
    wh = Warehouse("wh", capacity=4, log_path=path)
    assert wh.inventory == {"blank": 1, "gear": 2}
    wh.close()
    await clock.stop()


def test_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "log.jsonl"
    with ExecutionLog(path) as lg:
        lg.append({"event": "a", "n": 1})
        lg.append({"event": "b", "n": 2})
    with open(path, "ab") as fh:
        fh.write(b'{"event":"c","n":')  # a write cut short by SIGKILL
    with ExecutionLog(path) as lg:
        assert [e["event"] for e in lg] == ["a", "b"]
        lg.append({"event": "d"})
    assert [json.loads(x)["event"] for x in path.read_text().splitlines()] == ["a", "b", "d"]


async def test_duplicate_concurrent_execute_runs_once(tmp_path):
    clock = await _virtual()
    ws = Workstation("m1", {"milling": 10}, log_path=tmp_path / "m.jsonl")
    job = _job("p1/1")
    a, b = await asyncio.gather(
        ws.execute(job, clock, previous_capability=None), ws.execute(job, clock, previous_capability=None)
    )
    assert a == b
    assert [e["event"] for e in ws.log] == ["started", "finished"]
    # two different jobs on one machine run one after the other
    r1, r2 = await asyncio.gather(
        ws.execute(_job("p2/1"), clock, previous_capability="milling"),
        ws.execute(_job("p3/1"), clock, previous_capability="milling"),
    )
    assert r2.start >= r1.end or r1.start >= r2.end
    ws.close()
    await clock.stop()


# -- transport -------------------------------------------------------------------------------


def test_distances():
    d = Distances([("a", "b", 5), ("b", "c", 2.5)], default=9)
    assert d.travel_time("a", "a") == 0.0
    assert d.travel_time("a", "b") == d.travel_time("b", "a") == 5.0
    assert d.travel_time("a", "c") == 9.0
    asym = Distances({("a", "b"): 5, ("b", "a"): 7}, symmetric=False)
    assert (asym.travel_time("a", "b"), asym.travel_time("b", "a")) == (5.0, 7.0)
    one_way = Distances({"a": {"b": 3}}, symmetric=False)
    assert one_way.travel_time("b", "a") == 0.0
    assert Distances([{"from": "x", "to": "y", "time": 4}]).travel_time("y", "x") == 4.0
    assert Distances(d.to_list(), default=9).travel_time("c", "b") == 2.5
    assert d.locations() == {"a", "b", "c"}
    with pytest.raises(ValueError):
        Distances([("a", "b", -1)])


# -- a real process killed with SIGKILL mid-execution ----------------------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from shopfloor import Job, Workstation, make_clock

    async def main():
        log_path, origin = sys.argv[1], int(sys.argv[2])
        clock = make_clock("accelerated", time_scale=10, wall_origin_ms=origin)  # 100 units / s
        await clock.start()
        ws = Workstation("press", {"pressing": 60}, setup=0, log_path=log_path)
        print(json.dumps({"status": ws.job_status("p1/1").state, "now": clock.now()}), flush=True)
        rec = await ws.execute(Job("p1/1", "pressing", {}, "p1"), clock, previous_capability="pressing")
        print(json.dumps({"record": rec.to_dict(), "wall_ms": time.time_ns() // 1_000_000}), flush=True)

    asyncio.run(main())
    """
)


def _spawn_child(script: Path, log_path: Path, origin: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, str(script), str(log_path), str(origin)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_sigkill_mid_execution_then_restart_resumes_without_executing_twice(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    log_path = tmp_path / "press.jsonl"
    origin = time.time_ns() // 1_000_000  # the run's time base, shared by every incarnation
    t0 = time.monotonic()

    first = _spawn_child(script, log_path, origin)
    deadline = time.monotonic() + 10
    while not (log_path.exists() and '"started"' in log_path.read_text()):
        assert first.poll() is None, first.stderr.read()
        assert time.monotonic() < deadline, "child never started the job"
        time.sleep(0.01)
    time.sleep(0.15)  # well inside the 0.6 s job
    first.send_signal(signal.SIGKILL)
    first.wait(5)
    assert first.returncode == -signal.SIGKILL
    entries = [json.loads(x) for x in log_path.read_text().splitlines()]
    assert [e["event"] for e in entries] == ["started"]
    started = entries[0]

    second = _spawn_child(script, log_path, origin)
    out, err = second.communicate(timeout=10)
    assert second.returncode == 0, err
    status, result = (json.loads(x) for x in out.splitlines())
    assert status["status"] == "started"
    rec = result["record"]
    assert rec["resumed"] is True and rec["outcome"] == "done"
    assert rec["start"] == started["start"] and rec["end"] == started["end"] == pytest.approx(
        started["start"] + 60
    )
    # it waited out the remaining time: done no earlier than the planned end on the wall clock
    assert result["wall_ms"] >= origin + rec["end"] * 10 - 15

    third = _spawn_child(script, log_path, origin)
    out, err = third.communicate(timeout=10)
    assert third.returncode == 0, err
    status, result = (json.loads(x) for x in out.splitlines())
    assert status["status"] == "finished"
    assert result["record"] == rec

    entries = [json.loads(x) for x in log_path.read_text().splitlines()]
    assert [e["event"] for e in entries] == ["started", "finished"]  # executed exactly once
    assert time.monotonic() - t0 < 8
