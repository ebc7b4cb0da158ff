"""bench/bench_negotiation.py and its floor, the bare-bones gmqtt contract net: the net runs the same
workload as the reference scenario, its figures are real (every step negotiated, 2k + 3 messages
each, in one process and in two), and a small benchmark run reports medians of its repeats and
the ratio to the net (real launcher, real mosquitto, real processes)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import needs_mosquitto

from protocol.mosquitto import MosquittoProcess
from scenarios.loader import load_scenario_text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import bare_contract_net  # noqa: E402
import bench_negotiation  # noqa: E402


@pytest.mark.parametrize("k", [1, 5, 10])
def test_the_bare_net_runs_the_reference_workload(k: int) -> None:
    scenario = load_scenario_text(bench_negotiation.reference_yaml(k, 30), "reference.yaml")
    offered: dict[str, set[str]] = {}
    rates: dict[tuple[str, str], float] = {}
    for r in scenario.resources:
        for cap in r.capabilities:
            offered.setdefault(cap.name, set()).add(r.name)
            rates[(r.name, cap.name)] = cap.cost_rate
    for c in range(bare_contract_net.N_RES):
        bidders = bare_contract_net.offerers(c, k)
        assert len(bidders) == k and {f"r{r}" for r in bidders} == offered[f"c{c}"]
        for r in bidders:
            assert rates[(f"r{r}", f"c{c}")] == bare_contract_net.cost_rate(r, c)
    for p, product in enumerate(scenario.product_instances()):
        caps = [step.capability for step in product.plan]
        assert caps == [f"c{bare_contract_net.capability(p, s)}" for s in range(bare_contract_net.STEPS)]


@needs_mosquitto
@pytest.mark.parametrize("processes", [1, 2])
def test_the_bare_net_negotiates_every_step(processes: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, MosquittoProcess(Path(tmp), persistence=False) as mosq:
        figures = bare_contract_net.run_bare(mosq.port, k=3, processes=processes, products=6)
    assert figures["steps"] == 60 and figures["processes"] == processes
    assert figures["messages_per_step"] == 2 * 3 + 3  # call, 3 proposals, accept, 2 rejects, confirm, inform
    assert figures["steps_per_s"] > 0 and 0 < figures["latency_p50_ms"] <= figures["latency_p99_ms"]


@needs_mosquitto
def test_a_small_run_reports_medians_of_its_repeats_and_the_ratio_to_the_bare_net() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_negotiation.py"),
         "--k", "2", "--processes", "1", "--products", "3", "--repeat", "3", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["repeat"] == 3 and figures["machine"]["cores"]
    (row,) = figures["runs"]
    assert row["steps"] == 30 and row["failed"] == 0 and len(row["repeats"]) == 3
    for key in ("steps_per_s", "latency_p50_ms", "cpu_ms_per_step"):
        assert row[key] == round(statistics.median(r[key] for r in row["repeats"]), 2), key
    assert row["cpu_s_by_role"]["launcher (agents, journal)"] > 0 and "mosquitto" in row["cpu_s_by_role"]
    assert row["bare"]["messages_per_step"] == 7 and row["bare"]["steps_per_s"] > 0
    assert row["ratio_to_bare"] == round(row["steps_per_s"] / row["bare"]["steps_per_s"], 3)
    alone = figures["alone"]
    assert alone["k"] == 10 and alone["steps"] == 10 and alone["bare"]["messages_per_step"] == 23
    assert "bare st/s" in result.stdout and "single product alone" in result.stdout
