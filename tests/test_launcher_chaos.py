"""Chaos on the launcher itself: SIGKILL `twinbid run` alone, ten times, and `--resume` it each time.

Nothing else is killed by the test: the run's broker, registry, recorder, fork server and agent
workers must end with their launcher (protocol.lifeline), or the resumed run would work beside
them. Some kills land while the launcher is still starting its plant, the others while the plant
is at work. At the end every product is complete and every step was executed exactly once (by the
assets' own logs) and documented exactly once (database and AASX agree).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from test_recovery import check_nothing_lost_nothing_twice
from test_supervision import CHAOS, alive, descendants, twinbid

from protocol.lifeline import process_start_ticks

KILLS = 10


def _asset_events(out: Path) -> int:
    return sum(len(log.read_bytes().splitlines()) for log in out.glob("assets/*.jsonl"))


def _kill_launcher_alone(proc, within_s: float) -> None:
    children = descendants(proc.pid)
    starts = {p: process_start_ticks(p) for p in children}
    proc.kill()
    proc.wait(10)
    deadline = time.monotonic() + within_s
    while alive(children, starts) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(children, starts), "processes of the killed launcher live on"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sigkill_the_launcher_ten_times_and_resume(tmp_path: Path) -> None:
    # scenarios/chaos.yaml on a clock three times slower (30 wall ms a unit): about a minute of work,
    # so that ten kills land in it.
    scenario = yaml.safe_load(CHAOS.read_text())
    scenario["clock"]["time_scale"] = 30
    scenario["stop"]["wall_timeout"] = 600
    path = tmp_path / "chaos.yaml"
    path.write_text(yaml.safe_dump(scenario))
    out = tmp_path / "run"
    rng = random.Random(21)
    log = []
    for kill in range(KILLS):
        args = ["--out", str(out)] if kill == 0 else ["--resume", str(out)]
        proc = twinbid("run", str(path), "--processes", "2", "--broker", "mosquitto", *args, "-q")
        before, started = _asset_events(out), time.monotonic()
        if kill % 2:  # while the launcher starts its plant
            time.sleep(rng.uniform(1.0, 6.0))
        else:  # while the plant is at work
            while _asset_events(out) == before and time.monotonic() - started < 90 and proc.poll() is None:
                time.sleep(0.1)
            time.sleep(rng.uniform(0.2, 2.0))
        assert proc.poll() is None, f"the run ended before kill {kill + 1}:\n{proc.stdout.read()}"
        _kill_launcher_alone(proc, within_s=15)
        log.append({"kill": kill + 1, "after_s": round(time.monotonic() - started, 1)})
    final = twinbid("run", str(path), "--processes", "2", "--broker", "mosquitto", "--resume", str(out), "-q")
    output, _ = final.communicate(timeout=900)
    assert final.returncode == 0, output
    figures = json.loads((out / "kpis.json").read_text())
    check_nothing_lost_nothing_twice(out, SimpleNamespace(kpis=figures, chaos_log=[]))
    print(log)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_virtual_clock_run_resumed_after_its_launcher_was_killed_finishes(tmp_path: Path) -> None:
    """One process on a virtual clock: SIGKILL mid-run, then --resume goes on from the last
    recorded instant to the end, nothing lost, nothing done twice."""
    scenario = yaml.safe_load(CHAOS.read_text())
    scenario["clock"] = {"kind": "virtual"}
    path = tmp_path / "virtual.yaml"
    path.write_text(yaml.safe_dump(scenario))
    out = tmp_path / "run"
    proc = twinbid("run", str(path), "--broker", "mosquitto", "--out", str(out), "-q")
    while _asset_events(out) < 40 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before the kill:\n{proc.stdout.read()}"
    _kill_launcher_alone(proc, within_s=15)
    resumed = twinbid("run", str(path), "--broker", "mosquitto", "--resume", str(out), "-q")
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    figures = json.loads((out / "kpis.json").read_text())
    assert figures["clock"]["kind"] == "virtual"
    check_nothing_lost_nothing_twice(out, SimpleNamespace(kpis=figures, chaos_log=[]))
