"""The priority service: within a product type, the more urgent class flows faster, and no
top-priority product whose lead time covers its work, its transport and one job already running
at each step is late.

The queue rules are checked on the resource's timeline; the promise itself on whole plants
(the shipped aircraft-sensor line, and rush orders arriving into a loaded shop).
"""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
from collections import defaultdict
from pathlib import Path

import pytest

from agents.resource.timeline import Slot, Timeline
from protocol.bidding.effects import Send
from protocol.bidding.provider import Provider
from protocol.bidding.requester import Requester, RequesterConfig, RState
from protocol.elements import Bid, StepCall
from protocol.selection import Offer, PriorityWeighted
from scenarios.launcher import RunOptions, run
from scenarios.loader import load_scenario, load_scenario_text

ROOT = Path(__file__).resolve().parents[1]
INF = float("inf")  # no due date


def slot(key: str, duration: float, *, rank: tuple, booked: bool = True, firm: bool = True,
         capability: str = "x", setup: float = 0.0, ready: float = 0.0) -> Slot:  # fmt: skip
    return Slot(key, key, capability, ready, 0.0, duration, setup, booked=booked, duration=duration,
                setup_change=setup, rank=rank, firm=firm, due=rank[1])  # fmt: skip


def queue(*slots: Slot) -> Timeline:
    t = Timeline()
    for s in slots:
        t.hold(s, len(t.order))
    t.repack(0.0, None)
    return t


# --- the queue rules ---------------------------------------------------------------------------


def test_an_urgent_newcomer_goes_ahead_of_a_firm_booking_of_a_less_urgent_class() -> None:
    t = queue(slot("p3", 10, rank=(3, INF, 0.1), firm=True))
    index, (start, end, _) = t.place(slot("p1", 5, rank=(1, INF, 0.9), booked=False), 0.0, None)
    assert (index, start, end) == (0, 0.0, 5.0)
    t.hold(slot("p1", 5, rank=(1, INF, 0.9)), index)
    (moved,) = t.repack(0.0, None)
    assert (moved.key, moved.start, moved.end) == ("p3", 5.0, 15.0)  # re-confirmed later


def test_a_firm_booking_yields_in_its_class_only_to_a_step_due_earlier() -> None:
    t = queue(slot("a", 10, rank=(2, 500.0, 0.1), firm=True))
    assert t.place(slot("later", 5, rank=(2, 900.0, 0.01)), 0.0, None)[0] == 1
    assert t.place(slot("sooner", 5, rank=(2, 100.0, 0.9)), 0.0, None)[0] == 0


def test_open_offers_bind_even_against_a_more_urgent_class() -> None:
    """An offer is binding until it is answered; the urgent caller gets the honest later start
    (the machine then waits for nobody: the offer is decided within one reply window)."""
    t = queue(slot("offer", 10, rank=(5, INF, 0.1), booked=False))
    assert t.place(slot("p1", 5, rank=(1, INF, 0.1)), 0.0, None)[:1] == (1,)


def test_an_urgent_product_is_never_queued_behind_a_less_urgent_class_to_save_a_setup() -> None:
    t = queue(slot("p4", 10, rank=(4, INF, 0.1), capability="mill", setup=3))
    # Behind the milling job it would save a setup; it goes first and pays it instead.
    index, (start, _, setup) = t.place(
        slot("p1", 5, rank=(1, INF, 0.1), capability="mill", setup=3), 0.0, "drill"
    )
    assert (index, start, setup) == (0, 0.0, 3.0)


def test_the_machine_waits_for_an_open_offer_of_a_more_urgent_class() -> None:
    urgent = slot("p1", 5, rank=(1, INF, 0.1), booked=False, ready=2.0)
    booked = slot("p3", 10, rank=(3, INF, 0.1))
    t = queue(urgent, booked)
    assert t.held_for(booked, 0.0, None) is urgent  # starting p3 now would delay p1's offer
    short = queue(slot("p1", 5, rank=(1, INF, 0.1), booked=False, ready=20.0), booked)
    assert short.held_for(booked, 0.0, None) is None  # p3 ends before p1's product is there
    same = queue(slot("p3b", 5, rank=(3, INF, 0.1), booked=False, ready=2.0), booked)
    assert same.held_for(booked, 0.0, None) is None  # only a more urgent class holds the machine


# --- the product's choice --------------------------------------------------------------------------


def offer(name: str, completion: float, price: float, latest_end: float) -> Offer:
    bid = Bid(name, "x", completion - 10, completion, 10, 0, 0, price, 1e6, "here")
    return Offer(f"p-{name}", name, bid, latest_end)


def test_an_offer_that_makes_the_product_late_ranks_behind_on_time_offers() -> None:
    call = StepCall("p", 2, "x", "here", 0.0, priority=5, due=130.0, remaining_work=40.0)
    latest = call.latest_end(10)  # due less the 30 of work after this step
    assert latest == 100.0
    cheap_late, dear_on_time = offer("cheap", 120, 1, latest), offer("dear", 90, 9, latest)
    ranked = PriorityWeighted().rank([cheap_late, dear_on_time], 5)
    assert [r.offer.provider for r in ranked] == ["dear", "cheap"]
    assert "late (ends after 100)" in ranked[1].reason
    # without a due date (or with every offer late) priority 5 takes the cheapest
    no_due = [offer("cheap", 120, 1, INF), offer("dear", 90, 9, INF)]
    assert PriorityWeighted().rank(no_due, 5)[0].offer.provider == "cheap"
    all_late = [offer("cheap", 120, 1, 50), offer("dear", 90, 9, 50)]
    assert PriorityWeighted().rank(all_late, 5)[0].offer.provider == "cheap"
    # the requester gives each offer its call's latest end
    r = Requester("me", "conv", call)
    assert r._offer("p1", "dear", dear_on_time.bid).latest_end == 100.0


# --- whole plants --------------------------------------------------------------------------------


def flows(out: Path) -> dict[str, dict[int, list[tuple[float, bool]]]]:
    """product type -> priority -> [(flow time, late)] of the completed products, from run.db."""
    with sqlite3.connect(out / "run.db") as conn:
        last = dict(conn.execute("SELECT product, MAX(finished) FROM tb_step GROUP BY product"))
        rows = conn.execute(
            "SELECT product, product_type, priority, release, due, status FROM tb_product"
        ).fetchall()
    found: dict[str, dict[int, list[tuple[float, bool]]]] = defaultdict(lambda: defaultdict(list))
    for product, ptype, priority, release, due, status in rows:
        assert status == "completed", f"{product} {status}"
        found[ptype][priority].append((last[product] - release, due is not None and last[product] > due))
    return found


def assert_priority_service(out: Path) -> None:
    for ptype, by in flows(out).items():
        means = {p: statistics.fmean(f for f, _ in v) for p, v in sorted(by.items())}
        ordered = list(means.values())
        assert ordered == sorted(ordered) and len(set(ordered)) == len(ordered), (
            f"{ptype}: mean flow time by priority {means} does not fall with the priority number"
        )
        late = [f for f, is_late in by.get(1, []) if is_late]
        assert not late, f"{ptype}: {len(late)} priority-1 products late (flow {late})"


def run_scenario(scenario, out: Path) -> dict:
    return asyncio.run(run(scenario, RunOptions(out=out, progress=False))).kpis


@pytest.mark.slow
def test_aircraft_sensor_serves_priority_1_first_within_each_type(tmp_path: Path) -> None:
    scenario = load_scenario(ROOT / "scenarios" / "aircraft-sensor.yaml")
    scenario = scenario.model_copy(update={"vendors": [], "orders": [
        o.model_copy(update={"vendor": None}) for o in scenario.orders]})  # fmt: skip
    kpis = run_scenario(scenario, tmp_path / "run")
    assert kpis["products"]["completed"] == 100
    assert_priority_service(tmp_path / "run")
    table = kpis["flow_time"]["by_type_and_priority"]
    assert table["temperature-probe"]["1"]["late"] == 0 and table["temperature-probe"]["1"]["count"] == 5


# Rush orders into a loaded shop: twelve priority-3 and six priority-5 parts are queued at every
# machine when three priority-1 parts and a trickle of priority-2 ones arrive. Work content 250,
# transport 3 x 10, one job already running at each step at most 150 + 150 + 50: a lead time of
# 650 covers the promise's premise.
RUSH = """
name: rush orders
namespace: rush
clock: {kind: virtual}
seed: 7
bidding: {reply_window: 2, offer_validity: 10, confirm_timeout: 5}
transport: {default_time: 10}
resources:
  - {kind: workstation, name: saw-fast, location: a, capabilities: [{name: cutting, duration: 100, cost_rate: 3}]}
  - {kind: workstation, name: saw-slow, location: a, capabilities: [{name: cutting, duration: 150, cost_rate: 1}]}
  - {kind: workstation, name: weld-fast, location: b, capabilities: [{name: welding, duration: 100, cost_rate: 3}]}
  - {kind: workstation, name: weld-slow, location: b, capabilities: [{name: welding, duration: 150, cost_rate: 1}]}
  - {kind: workstation, name: tester, location: c, capabilities: [{name: testing, duration: 50, cost_rate: 1}]}
  - {kind: warehouse, name: stores, location: s, capacity: 10, capabilities: {store: {duration: 5, cost_rate: 1}}}
product_types:
  - name: part
    plan:
      - {capability: cutting}
      - {capability: welding}
      - {capability: testing}
orders:
  - {type: part, quantity: 12, priority: 3, release: 0}
  - {type: part, quantity: 6, priority: 5, release: 0}
  - {type: part, quantity: 4, priority: 2, release: 100, interval: 150}
  - {type: part, quantity: 3, priority: 1, release: 300, interval: 200, lead_time: 650}
stop: {when: all_done, wall_timeout: 300}
"""


def test_rush_orders_into_a_loaded_shop_are_served_first(tmp_path: Path) -> None:
    kpis = run_scenario(load_scenario_text(RUSH), tmp_path / "run")
    assert kpis["products"]["completed"] == 25
    assert_priority_service(tmp_path / "run")
    # every resource is in the utilisation figures, the unused warehouse too
    assert set(kpis["utilisation"]) == {"saw-fast", "saw-slow", "weld-fast", "weld-slow", "tester", "stores"}
    assert kpis["utilisation"]["stores"] == 0.0


@pytest.mark.slow
def test_chaos_on_mosquitto_serves_priority_1_first(tmp_path: Path, mosquitto) -> None:
    """A wall clock (accelerated) and a real mosquitto: 30 priority-1 and 30 priority-5 shafts."""
    scenario = load_scenario(ROOT / "scenarios" / "chaos.yaml")
    out = tmp_path / "run"
    kpis = asyncio.run(run(scenario, RunOptions(out=out, progress=False, broker=mosquitto.url))).kpis
    assert kpis["products"]["completed"] == 60
    assert_priority_service(out)


# One machine: three priority-1 parts queue on it at 0; the resource is killed at 5 and restarts
# at 6 with its bookings reloaded from the database; a priority-3 part calls at 8.
RECOVERED = """
name: recovered class
namespace: recovered
clock: {kind: virtual}
transport: {default_time: 0}
resources:
  - {kind: workstation, name: ws, location: a, capabilities: [{name: milling, duration: 10, cost_rate: 1}]}
product_types:
  - {name: part, plan: [{capability: milling}]}
orders:
  - {type: part, quantity: 3, priority: 1, release: 0}
  - {type: part, quantity: 1, priority: 3, release: 8}
faults:
  - {at: 5, kill: ws, restart_after: 1}
stop: {when: all_done, wall_timeout: 120}
"""


def test_bookings_recovered_after_a_crash_keep_their_class(tmp_path: Path) -> None:
    kpis = run_scenario(load_scenario_text(RECOVERED), tmp_path / "run")
    assert kpis["products"]["completed"] == 4
    with sqlite3.connect(tmp_path / "run" / "run.db") as conn:
        ends = dict(conn.execute("SELECT product, finished FROM tb_step"))
    assert ends["part-4"] > max(ends["part-1"], ends["part-2"], ends["part-3"]), ends


def test_on_a_wall_clock_a_deferred_call_goes_out_a_reply_window_before_the_best_start() -> None:
    """A deferral calls again `defer_lead_ms` before the best offer starts; where that is now or
    past, waiting wins no time and the product takes the best offer at once."""

    def close(lead_ms: int, best_start: float) -> Requester:
        call = StepCall("p-1", 1, "milling", "store", 0.0, priority=1)
        config = RequesterConfig(clock_origin_ms=0, defer_lead_ms=lead_ms)
        r = Requester("urn:p", "conv-1", call, frozenset({"urn:a", "urn:b"}), config)
        (cfp,) = [e.message for e in r.start(0) if isinstance(e, Send)]
        for name, start in (("urn:a", best_start), ("urn:b", best_start + 5)):
            p, _ = Provider.on_call(name, cfp, 1)
            assert p is not None
            bid = Bid(name, "milling", start, start + 5, 5, 0, 0, 5, 100, "x")
            (proposal,) = [e.message for e in p.propose(bid, 99_000, 2)]
            r.receive(proposal, 3)
        return r

    r = close(2_000, 10.0)
    assert r.state is RState.BACKOFF and r.deadline == 8_000  # 10 s less the 2 s lead
    r = close(2_000, 1.5)  # calling again 2 s earlier than 1.5 s is now: accept instead
    assert r.state is RState.AWARDING and r.winner is not None and r.winner.provider == "urn:a"
