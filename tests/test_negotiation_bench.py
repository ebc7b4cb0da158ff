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
import reference_workload as w  # noqa: E402


@pytest.mark.parametrize("k", [1, 5, 10])
def test_the_scenario_is_the_reference_workload(k: int) -> None:
    scenario = load_scenario_text(bench_negotiation.reference_yaml(k, 30), "reference.yaml")
    offered: dict[str, set[str]] = {}
    rates: dict[tuple[str, str], float] = {}
    for r in scenario.resources:
        for cap in r.capabilities:
            offered.setdefault(cap.name, set()).add(r.name)
            rates[(r.name, cap.name)] = cap.cost_rate
    # the issue's own words: capability c offered by the k resources (c + j) mod 20 for j < k ...
    for c in range(20):
        assert offered[f"c{c}"] == {f"r{(c + j) % 20}" for j in range(k)}
        assert sorted(w.offerers(c, k)) == sorted((c + j) % 20 for j in range(k))  # what the bare net uses
        for r in w.offerers(c, k):
            assert rates[(f"r{r}", f"c{c}")] == w.cost_rate(r, c)
            assert c in w.offered_by(r, k)
    # ... and step s of product p needing capability (7p + 3s) mod 20, ten steps each
    for p, product in enumerate(scenario.product_instances()):
        caps = [step.capability for step in product.plan]
        assert caps == [f"c{(7 * p + 3 * s) % 20}" for s in range(10)]
        assert [w.capability(p, s) for s in range(w.STEPS)] == [(7 * p + 3 * s) % 20 for s in range(10)]


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


@needs_mosquitto
def test_against_runs_each_checkout_with_its_own_code_alternately_and_reports_ratios(tmp_path: Path) -> None:
    """``--against PATH``: the same configuration in this checkout and in another, each run in a
    fresh Python importing that checkout's code; medians of each side and this / against."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(REPO, other, ignore=shutil.ignore_patterns(".git", "out", "*.egg-info", "__pycache__"))
    bench = other / "bench" / "bench_negotiation.py"
    text = bench.read_text()
    marker = '    return {\n        "k": k,\n        "processes": processes,\n        "products": products,\n        "steps": steps,'
    assert marker in text
    bench.write_text(
        text.replace(marker, marker.replace('"k": k,', '"k": k,\n        "checkout": "other",'), 1)
    )
    row = bench_negotiation.compare(2, 1, 3, 2, other)
    this, against = row["this"], row["against"]
    assert "checkout" not in this and against["checkout"] == "other"  # each side ran its own code
    for side in (this, against):
        assert side["steps"] == 30 and side["failed"] == 0 and len(side["repeats"]) == 2
    for key in ("steps_per_s", "cpu_ms_per_step", "latency_p50_ms"):
        assert row["ratio"][key] == round(this[key] / against[key], 3), key
    with pytest.raises(SystemExit, match=r"no bench/bench_negotiation\.py"):
        bench_negotiation.one_in(tmp_path, 2, 1, 3)
