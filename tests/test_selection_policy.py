"""Choosing is data: the scenario names each priority's selection policy (a built-in one or a
researcher's ``module:Class``), the product keeps it in its record, documents every bid's rank,
score and reason, and the analysis tables and the report show them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from agents.persistence import open_database
from agents.persistence.database import sqlite_url
from agents.persistence.tables import DocumentationRecord, ProductRecord
from protocol.mosquitto import find_mosquitto
from protocol.selection import POLICIES, PolicyError, make_policy
from scenarios.chaos import Chaos
from scenarios.launcher import RunOptions, run
from scenarios.loader import ScenarioError, load_scenario, load_scenario_text
from scenarios.schema import BUILTIN_POLICIES, Scenario, Selection
from twinbid import analysis
from twinbid.report import render_html

CHAOS = Path(__file__).resolve().parents[1] / "scenarios" / "chaos.yaml"

# Three drills: fast and dear, slow and cheap, slowest at a middling price. Priority 1 by the
# default policy takes the fast one, "cheapest" the cheap one, the researcher's Slowest the slowest.
DRILLS = {"fast": (2, 10), "cheap": (6, 1), "slowest": (9, 4)}


def _plant(selection: Any = None) -> Scenario:
    bidding: dict[str, Any] = {"defer_until_start": False}
    if selection is not None:
        bidding["selection"] = selection
    return Scenario.model_validate(
        {
            "name": "selection",
            "namespace": "selection",
            "clock": {"kind": "virtual"},
            "transport": {"default_time": 0},
            "bidding": bidding,
            "resources": [
                {
                    "kind": "workstation",
                    "name": name,
                    "location": "shop",
                    "capabilities": [{"name": "drilling", "duration": d, "cost_rate": rate}],
                }
                for name, (d, rate) in DRILLS.items()
            ],
            "product_types": [{"name": "part", "plan": [{"capability": "drilling"}]}],
            "orders": [
                {"type": "part", "quantity": 2, "priority": 1, "release": 0},
                {"type": "part", "quantity": 2, "priority": 5, "release": 100},
            ],
        }
    )


def _run(scenario: Scenario, out: Path) -> analysis.Run:
    result = asyncio.run(run(scenario, RunOptions(out=out, progress=False)))
    assert result.ok, result.notices
    return analysis.load(out)


def _winners(run: analysis.Run) -> dict[int, set[str]]:
    c = run.conversations
    return {int(p): set(g["winner"]) for p, g in c.groupby("priority")}


def test_a_scenario_choosing_cheapest_for_a_priority_really_picks_the_cheapest(tmp_path: Path) -> None:
    default = _run(_plant(), tmp_path / "default")
    assert _winners(default)[1] == {"fast"}  # priority 1: earliest completion
    chosen = _run(_plant({"by_priority": {1: "cheapest"}}), tmp_path / "cheapest")
    assert _winners(chosen) == {1: {"cheap"}, 5: {"cheap"}}
    c = chosen.conversations.set_index("product")
    assert set(c[c["priority"] == 1]["policy"]) == {"cheapest"}
    assert set(c[c["priority"] == 5]["policy"]) == {"priority-weighted"}
    # every bid of a decided round has its rank, score and the policy's reason; rank 1 won
    bids = chosen.bids[chosen.bids["rank"].notna()]
    assert len(bids) == 4 * 3
    assert (bids[bids["rank"] == 1]["resource"] == "cheap").all()
    top = bids[bids["priority"] == 1]
    assert (top["score"] == top["price"]).all()  # Cheapest scores by price
    assert top["selection_reason"].str.startswith("price ").all()
    for _, g in bids.groupby("conversation_id"):
        assert sorted(g["rank"]) == [1, 2, 3] and g.sort_values("rank")["score"].is_monotonic_increasing
    with open_database(sqlite_url(tmp_path / "cheapest" / "run.db")).session() as s:
        kept = {p.product: p.selection for p in s.exec(select(ProductRecord)).all()}
    assert sorted(kept.values()) == ["cheapest", "cheapest", "priority-weighted", "priority-weighted"]
    # the report's negotiation table names each choice's policy and reason
    html = render_html(chosen, {})
    assert '<th class="">policy</th>' in html and '<td class="">cheapest</td>' in html
    reason = top[top["rank"] == 1]["selection_reason"].iloc[0]
    assert f'<td class="">{reason}</td>' in html


def test_a_researchers_module_class_policy_is_used(tmp_path: Path) -> None:
    spec = "selection_policies:Slowest"
    chosen = _run(_plant({"default": spec}), tmp_path / "out")
    assert _winners(chosen) == {1: {"slowest"}, 5: {"slowest"}}
    assert set(chosen.conversations["policy"]) == {"slowest"}
    assert set(chosen.bids[chosen.bids["rank"] == 1]["resource"]) == {"slowest"}


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("no_such_module_for_twinbid:Policy", "cannot import module"),
        ("protocol.selection:NoSuchPolicy", "has no class"),
        ("protocol.selection:Offer", "has no rank"),
        ("selection_policies:", "module:Class"),
        ("fastest", "unknown selection policy"),
    ],
)
def test_a_bad_policy_is_a_validation_error_naming_where(spec: str, why: str) -> None:
    text = f"""
name: bad
namespace: bad
bidding:
  selection:
    by_priority: {{2: "{spec}"}}
resources:
  - {{kind: workstation, name: m, location: shop, capabilities: [{{name: drilling, duration: 1}}]}}
product_types:
  - {{name: part, plan: [{{capability: drilling}}]}}
"""
    with pytest.raises(ScenarioError) as err:
        load_scenario_text(text, "bad.yaml")
    message = str(err.value)
    assert message.count("\n") == 0, message  # the policy is the only problem
    assert "bad.yaml: bidding.selection.by_priority[2]: " in message and why in message, message


def test_the_schema_knows_the_policies_protocol_ships_and_makes_what_it_accepts() -> None:
    assert set(BUILTIN_POLICIES) == set(POLICIES)
    for spec in (*BUILTIN_POLICIES, "selection_policies:Slowest"):
        assert callable(make_policy(spec).rank)
    with pytest.raises(PolicyError, match="failed"):
        make_policy("selection_policies:NeedsArguments")  # the schema cannot know; the product refuses


needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto binary not installed")


@needs_mosquitto
@pytest.mark.slow  # about a minute on a loaded machine
@pytest.mark.timeout(300)
def test_the_policy_persists_when_product_agents_are_killed_and_restarted(tmp_path: Path) -> None:
    """chaos.yaml with 'cheapest' for every priority, its agent processes SIGKILLed and taken over:
    every step, before and after a restart, ranked by price and won by the cheapest bid."""
    scenario = load_scenario(CHAOS)
    bidding = scenario.bidding.model_copy(update={"selection": Selection(default="cheapest")})
    scenario = scenario.model_copy(update={"bidding": bidding})
    chaos = Chaos(kills=3, interval=(0.3, 0.8), down=0.2, broker_restarts=0, seed=5)
    out = tmp_path / "out"
    result = asyncio.run(
        run(scenario, RunOptions(out=out, progress=False, broker="mosquitto", processes=3, chaos=chaos))
    )
    assert result.ok, (result.kpis.get("products"), result.timed_out, result.notices)
    kills = [e for e in result.chaos_log if e["event"] == "kill"]
    assert kills, "no agent process was killed"
    db = open_database(sqlite_url(out / "run.db"))
    with db.session() as s:
        products = s.exec(select(ProductRecord)).all()
        docs = s.exec(select(DocumentationRecord)).all()
    db.dispose()
    assert {p.selection for p in products} == {"cheapest"}
    assert len(docs) == 5 * len(products)
    for d in docs:
        record = {c["idShort"]: c for c in json.loads(d.element)["value"]}
        assert record["SelectionPolicy"]["value"] == "cheapest", (d.product, d.step)
        bids = [{c["idShort"]: c["value"] for c in b["value"]} for b in record["Bids"]["value"]]
        prices = [float(b["Price"]) for b in bids]
        assert prices == sorted(prices), (d.product, d.step)
        assert float(bids[0]["Score"]) == prices[0]
