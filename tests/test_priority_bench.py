"""The priority benchmark's baselines (bench/priority_baselines.py) and plants (bench/bench_priorities.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from scenarios.loader import load_scenario
from scenarios.schema import Scenario

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_priorities as bp
import priority_baselines as pb

ROOT = Path(__file__).resolve().parents[1]


def _plant(orders: list[dict], transport: float = 0.0) -> Scenario:
    """One machine 'm' at 'shop' (drilling takes 10), products of one step released at 'entry'."""
    return Scenario.model_validate(
        {
            "name": "t",
            "namespace": "t",
            "transport": {"default_time": transport},
            "resources": [
                {
                    "kind": "workstation",
                    "name": "m",
                    "location": "shop",
                    "capabilities": [{"name": "drilling", "duration": 10}],
                }
            ],
            "product_types": [{"name": "part", "plan": [{"capability": "drilling"}]}],
            "orders": orders,
        }
    )


def test_rules_order_the_queue_as_documented() -> None:
    # a (priority 5, released first) occupies the machine; then b (priority 4, due late),
    # c (priority 1, no due) and d (priority 4, due soon) wait for it.
    scenario = _plant(
        [
            {"type": "part", "priority": 5, "release": 0},
            {"type": "part", "priority": 4, "release": 1, "due": 200},
            {"type": "part", "priority": 1, "release": 2},
            {"type": "part", "priority": 4, "release": 3, "due": 25},
        ]
    )
    plant = pb.plant_from_scenario(scenario)
    order = {rule: [name for name, *_ in pb.schedule(plant, rule).steps] for rule in pb.RULES}
    assert order["FIFO"] == ["part-1", "part-2", "part-3", "part-4"]
    assert order["PRIO-EDD"] == ["part-1", "part-3", "part-4", "part-2"]
    # ATC: d is late unless it goes next (index w/p * e^0 = 0.2); b has slack; c has no due time
    assert order["ATC"] == ["part-1", "part-4", "part-2", "part-3"]
    done = pb.schedule(plant, "FIFO").completion
    assert done == {"part-1": 10, "part-2": 20, "part-3": 30, "part-4": 40}


def test_transport_and_alternatives_are_the_scenarios() -> None:
    scenario = Scenario.model_validate(
        {
            "name": "t",
            "namespace": "t",
            "transport": {"default_time": 5, "legs": [{"from": "far", "to": "near", "time": 1}]},
            "resources": [
                {
                    "kind": "workstation",
                    "name": "far",
                    "location": "far",
                    "capabilities": [{"name": "drilling", "duration": 8}],
                },
                {
                    "kind": "workstation",
                    "name": "near",
                    "location": "near",
                    "capabilities": [{"name": "drilling", "duration": {"uniform": [4, 6]}}],
                },
            ],
            "product_types": [
                {"name": "part", "plan": [{"capability": "drilling"}, {"capability": "drilling"}]}
            ],
            "orders": [{"type": "part", "priority": 1, "release": 0, "location": "far"}],
        }
    )
    result = pb.schedule(pb.plant_from_scenario(scenario), "FIFO")
    # step 1: far would take 0..8; near, one unit away, 1..6 (its mean duration 5)
    # step 2: near again 6..11; far, one unit back, 7..15
    assert [(r, s, e) for _, _, r, s, e in result.steps] == [("near", 1, 6), ("near", 6, 11)]


def test_generated_plants_are_seeded_and_mixed() -> None:
    a, b = bp.generated_plant(1), bp.generated_plant(1)
    assert a == b and bp.generated_plant(2) != a
    products = a.product_instances()
    assert len(products) == 40 and {p.priority for p in products} == {1, 2, 3, 4, 5}
    assert all(p.due is not None and p.due > p.release for p in products)


def test_shipped_plants_are_made_deterministic() -> None:
    plant = bp.deterministic(load_scenario(ROOT / "scenarios" / "aircraft-sensor.yaml"))
    data = plant.model_dump(mode="json")
    assert data["clock"]["kind"] == "virtual" and not data["faults"] and not data["vendors"]
    assert all(r.get("breakdown") is None for r in data["resources"])
    text = json.dumps(data)
    assert "uniform" not in text and "triangular" not in text and "normal" not in text
    assert len(plant.product_instances()) == 100


def test_benchmark_smoke_run_on_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert bp.main(["--plants", "demo", "--json"]) == 0
    out = capsys.readouterr().out
    assert "machine:" in out and "twinbid / best baseline" in out
    figures = json.loads(out.strip().splitlines()[-1])
    (row,) = figures["plants"]
    assert row["twinbid"]["completed"] == row["products"] == 10
    for method in ("twinbid", *pb.RULES):
        f = row[method]
        assert set(f["by_priority"]) == {"1", "5"} and f["completed"] == 10
        assert f["weighted_flow"] > 0 and f["makespan"] > 0
    best = min(row[r]["weighted_flow"] for r in pb.RULES)
    assert row["ratio_to_best"]["weighted_flow"] == round(row["twinbid"]["weighted_flow"] / best, 3)
