"""One schedule however the plant is split: a virtual clock over 1, 2 or 3 processes.

The time barrier (shopfloor/barrier.py) is checked as a sans-I/O machine first (it grants a timer
only to a plant that is quiet with its deliveries balanced and unchanged since the reports, and
the plant's earliest timer), then whole plants run through the launcher on a real mosquitto with
real worker processes, and their records are compared step by step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_end_to_end import run_plant, schedule

from scenarios.launcher import split_virtual_refusals
from scenarios.loader import load_scenario, load_scenario_text
from shopfloor.barrier import TimeBarrier

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "scenarios"


# --- the barrier alone -------------------------------------------------------------------------


def _started(shares: int = 2) -> TimeBarrier:
    barrier = TimeBarrier(frozenset(range(shares)))
    for s in range(shares - 1):
        assert barrier.receive(("filters", s, [f"i40/x/to/a{s}/+"])) == []
    assert barrier.receive(("filters", shares - 1, ["f"])) == [(None, ("table", barrier.filters))]
    return barrier


def _head(when: float, name: str, share: int) -> tuple:
    return (when, ((4, ((2, name),)),), 0, share, 1)


def test_no_probe_while_a_delivery_is_in_flight_or_a_share_is_busy() -> None:
    barrier = _started()
    assert barrier.receive(("report", 0, (1, True, 1, 0, _head(5.0, "a", 0)))) == []
    # share 1 quiet but has not received share 0's delivery yet: unbalanced, no probe
    assert barrier.receive(("report", 1, (1, True, 0, 0, None))) == []
    # share 1 busy with it
    assert barrier.receive(("report", 1, (2, False, 0, 0, None))) == []
    out = barrier.receive(("report", 1, (3, True, 0, 1, None)))
    assert out == [(None, ("probe", 1))]


def test_a_share_that_changed_since_its_report_voids_the_probe() -> None:
    barrier = _started()
    barrier.receive(("report", 0, (1, True, 0, 0, _head(5.0, "a", 0))))
    assert barrier.receive(("report", 1, (1, True, 0, 0, _head(3.0, "b", 1)))) == [(None, ("probe", 1))]
    assert barrier.receive(("answer", 0, 1, (1, True, 0, 0, _head(5.0, "a", 0)))) == []
    # share 1 handled something between its report and the probe (its generation moved on)
    assert barrier.receive(("answer", 1, 1, (2, True, 0, 0, _head(3.0, "b", 1)))) == [(None, ("probe", 2))]
    assert barrier.step == 0


def test_the_plants_earliest_timer_fires_after_every_share_is_at_its_time() -> None:
    barrier = _started(3)
    heads = {0: _head(5.0, "a", 0), 1: _head(3.0, "c", 1), 2: _head(3.0, "b", 2)}
    for s, h in heads.items():
        barrier.receive(("report", s, (1, True, 0, 0, h)))
    for s, h in heads.items():
        out = barrier.receive(("answer", s, 1, (1, True, 0, 0, h)))
    # (3.0, "b") sorts before (3.0, "c"): share 2 fires, everybody reads t=3 first
    assert out == [(None, ("advance", 1, 3.0, 2))]
    assert barrier.receive(("at", 0, 1)) == [] and barrier.receive(("at", 2, 1)) == []
    assert barrier.receive(("at", 1, 1)) == [(2, ("fire", 1))]
    # until share 2 reports after its timer nothing else moves
    assert barrier.receive(("report", 0, (1, True, 0, 0, heads[0]))) == []


def test_a_quiet_plant_without_timers_is_idle() -> None:
    barrier = _started()
    for s in (0, 1):
        barrier.receive(("report", s, (1, True, 2, 2, None)))
    for s in (0, 1):
        out = barrier.receive(("answer", s, 1, (1, True, 2, 2, None)))
    assert out == [] and barrier.idle


# --- whole plants ------------------------------------------------------------------------------


def _record(scenario_path: Path, out: Path, processes: int, broker: str) -> tuple[list[tuple], dict]:
    kpis = run_plant(load_scenario(scenario_path), out, broker=broker, processes=processes)
    return schedule(out), kpis


def _same_schedule(scenario_path: Path, tmp_path: Path, broker: str, splits: tuple[int, ...]) -> None:
    one, kpis_one = _record(scenario_path, tmp_path / "p1", 1, broker)
    assert one and kpis_one["products"]["completed"] == kpis_one["products"]["total"]
    for n in splits:
        split, kpis = _record(scenario_path, tmp_path / f"p{n}", n, broker)
        assert kpis["products"] == kpis_one["products"]
        assert kpis["makespan"] == kpis_one["makespan"], f"--processes {n}"
        # every step: product, step, resource, start and finish time
        assert split == one, f"--processes {n} changed the schedule"
        # still the virtual clock (timers_fired may differ by timers that decide nothing: the
        # order of same-instant deliveries inside one timer's cascade is the broker's)
        clock = {k: v for k, v in kpis["clock"].items() if k != "timers_fired"}
        assert clock == {"kind": "virtual", "time_scale": None, "processes": n}


def test_demo_gives_one_schedule_with_1_2_and_3_processes(tmp_path: Path) -> None:
    _same_schedule(SCENARIOS / "demo.yaml", tmp_path, "mosquitto", (2, 3))


def test_ft06_gives_one_schedule_with_1_2_and_3_processes(tmp_path: Path) -> None:
    _same_schedule(SCENARIOS / "ft06.yaml", tmp_path, "mosquitto", (2, 3))


@pytest.mark.slow
def test_aircraft_sensor_gives_one_schedule_with_1_2_and_3_processes(tmp_path: Path) -> None:
    _same_schedule(SCENARIOS / "aircraft-sensor.yaml", tmp_path, "mosquitto", (2, 3))


def test_what_a_split_virtual_clock_cannot_place_is_refused(tmp_path: Path) -> None:
    """In one line, exit code 2, nothing run: faults (kills, broker restarts) with a split virtual clock."""
    text = (SCENARIOS / "demo.yaml").read_text()
    faulty = text.replace("\nfaults: []", "\nfaults:\n  - {at: 20, kill: mill-fast, restart_after: 5}", 1)
    (tmp_path / "faulty.yaml").write_text(faulty)
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "twinbid.cli", "run", str(tmp_path / "faulty.yaml"), "--out", str(out),
           "--processes", "2", "--quiet"]  # fmt: skip
    done = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, timeout=120
    )
    said = " ".join((done.stdout + done.stderr).decode().split())
    assert done.returncode == 2, said
    assert "Traceback" not in said
    assert "split over 2 processes" in said and "kills mill-fast" in said and "--processes 1" in said
    assert not (out / "kpis.json").exists()
    # the same scenario in one process runs its faults
    assert split_virtual_refusals(load_scenario_text(faulty), 1, chaos=False) == []
    assert "chaos" in split_virtual_refusals(load_scenario_text(text), 2, chaos=True)[0]


def _split_run(out: Path) -> subprocess.Popen:
    """aircraft-sensor in two processes through the CLI, in a session of its own; returns once it runs."""
    cmd = [sys.executable, "-m", "twinbid.cli", "run", str(SCENARIOS / "aircraft-sensor.yaml"),
           "--out", str(out), "--processes", "2", "--broker", "mosquitto", "--quiet"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    log, deadline = out / "messages.jsonl", time.monotonic() + 240

    def running() -> bool:  # the products negotiate: every process has started its agents
        return log.exists() and log.stat().st_size > 10_000

    while not running() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    if not running():
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"the run did not start: {proc.communicate()[1].decode()[-2000:]}")
    return proc


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, stdout.decode() + stderr.decode()


def test_a_lost_agent_process_ends_a_split_run_loudly(tmp_path: Path) -> None:
    """SIGKILL of the worker processes: the barrier cannot know what they had in flight, so the
    run ends, says why and leaves its record, instead of going on with a different schedule."""
    out = tmp_path / "out"
    proc = _split_run(out)
    workers = [
        p for p in psutil.Process(proc.pid).children(recursive=False) if "forkserver" in " ".join(p.cmdline())
    ]
    assert workers, "no fork server"
    for server in workers:
        for worker in server.children():
            worker.send_signal(signal.SIGKILL)
    code, text = _finish(proc)
    assert code != 0
    assert "went away; the split virtual clock cannot go on" in " ".join(text.split()), text[-3000:]
    assert (out / "kpis.json").exists(), text[-3000:]


def test_ctrl_c_of_a_split_run_prints_no_worker_traceback(tmp_path: Path) -> None:
    """SIGINT to the whole process group, as a terminal's Ctrl-C does."""
    out = tmp_path / "out"
    proc = _split_run(out)
    os.killpg(proc.pid, signal.SIGINT)
    code, text = _finish(proc)
    assert code != 0 and "Traceback" not in text, text[-3000:]
    assert json.loads((out / "kpis.json").read_text())["clock"]["processes"] == 2
