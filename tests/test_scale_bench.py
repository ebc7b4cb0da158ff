"""bench/bench_scale.py: the generated plant, and one small size end to end (real launcher, real
mosquitto, real processes): every figure in the JSON line, and no process left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from conftest import needs_mosquitto

from scenarios.loader import load_scenario_text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import bench_scale  # noqa: E402


@pytest.mark.parametrize("agents", [4, 10, 101, 10_000])
def test_the_generated_plant_has_the_agents_asked_for(agents: int) -> None:
    scenario = load_scenario_text(bench_scale.scale_yaml(agents), "scale.yaml")
    resources, products, caps = bench_scale.split(agents, 0.5, 2)
    assert len(scenario.resources) == resources and len(scenario.product_instances()) == products
    assert resources + products == agents
    offered: dict[str, int] = {}
    for r in scenario.resources:
        for c in r.capability_names():
            offered[c] = offered.get(c, 0) + 1
    assert len(offered) == caps and min(offered.values()) >= 2  # every capability has its bidders
    assert all(p.plan[0].capability in offered for p in scenario.product_instances())


def test_the_open_files_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = bench_scale.raise_nofile()
    assert soft == hard or hard == -1


@needs_mosquitto
def test_a_small_swarm_end_to_end_reports_every_figure_and_leaves_no_process() -> None:
    before = {p.pid for p in psutil.process_iter()}
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_scale.py"), "--sizes", "12,24", "--json"],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["largest_ok"] == 24 and figures["machine"]["cores"]
    small, large = figures["runs"]
    for row in (small, large):
        assert row["ok"] and row["completed"] == row["products"] > 0, row
        assert 0 < row["startup_s"] and row["negotiation_s"] is not None
        assert row["peak_rss_mib"] > 50 and row["mib_per_agent"] > 0
        assert {"launcher", "mosquitto", "workers"} <= set(row["peak_rss_by_role_mib"]), row
    assert "delta_mib_per_agent" in large
    leftovers = [
        p for p in psutil.process_iter(["pid", "cmdline"])
        if p.pid not in before and "twinbid-scale-" in " ".join(p.info["cmdline"] or [])
    ]  # fmt: skip
    assert not leftovers
