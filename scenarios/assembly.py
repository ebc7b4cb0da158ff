"""From a validated scenario to the objects a run starts: assets, orders, distances, tuning.

Kept apart from the launcher so that every process of a multi-process run builds
exactly the same plant from the same file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agents.product.order import PlannedStep, ProductOrder
from protocol.bidding.requester import RequesterConfig
from scenarios.schema import PlanStep, ProductInstance, Scenario, Warehouse, Workstation
from shopfloor.asset import Asset
from shopfloor.transport import Distances
from shopfloor.warehouse import Warehouse as SimWarehouse
from shopfloor.workstation import Workstation as SimWorkstation

#: A bidding window shorter than this in wall time cannot be met on a loaded machine.
MIN_WALL_WINDOW_S = 0.25


def distances(scenario: Scenario) -> Distances:
    t = scenario.transport
    legs = [(leg.from_, leg.to, leg.time) for leg in t.legs]
    return Distances(legs, default=t.default_time, symmetric=t.symmetric)


def make_asset(scenario: Scenario, resource: Workstation | Warehouse, log_dir: Path, seed: int) -> Asset:
    log_path = log_dir / f"{resource.name}.jsonl"
    if isinstance(resource, Workstation):
        caps: dict[str, Any] = {}
        for c in resource.capabilities:
            duration = c.duration.to_data() if c.duration is not None else 0.0
            caps[c.name] = {"duration": duration, "setup": c.setup}
        b = resource.breakdown
        return SimWorkstation(
            resource.name,
            caps,
            location=resource.location,
            cost_rate=max((c.cost_rate for c in resource.capabilities), default=1.0),
            mtbf=_mean(b.mtbf) if b else None,
            mttr=_mean(b.mttr) if b else None,
            seed=seed,
            log_path=log_path,
        )
    store = resource.capabilities.store
    retrieve = resource.capabilities.retrieve
    # Exactly the declared operations with their declared durations (a step may time itself;
    # validation makes sure one of the two gives a time).
    return SimWarehouse(
        resource.name,
        capacity=resource.capacity,
        inventory=dict(resource.stock),
        location=resource.location,
        store_capability="store" if store is not None else None,
        retrieve_capability="retrieve" if retrieve is not None else None,
        store_duration=_declared(store),
        retrieve_duration=_declared(retrieve),
        cost_rate=max(op.cost_rate for op in (store, retrieve) if op is not None),
        seed=seed,
        log_path=log_path,
    )


def _declared(op: Any) -> Any:
    """A declared operation's duration as config data (0 when only the steps give times)."""
    return op.duration.to_data() if op is not None and op.duration is not None else 0.0


def _mean(value: Any) -> float:
    return float(getattr(value, "mean", value))


def cost_rates(resource: Workstation | Warehouse) -> dict[str, float]:
    if isinstance(resource, Workstation):
        return {c.name: c.cost_rate for c in resource.capabilities}
    ops = resource.capabilities
    return {
        name: op.cost_rate
        for name, op in (("store", ops.store), ("retrieve", ops.retrieve))
        if op is not None
    }


def _step(scenario: Scenario, index: int, step: PlanStep) -> PlannedStep:
    options = step.options()
    params: dict[str, Any] = dict(step.parameters)
    durations = []
    for alt in options:
        d = alt.duration or step.duration
        if d is not None:
            params[f"duration:{alt.capability}"] = d.mean  # a random step time is planned at its mean
            durations.append(d.mean)
        else:
            offered = [
                scenario.processing_time(step, r, alt.capability) for r in scenario.offering(alt.capability)
            ]
            durations += [x.mean for x in offered if x is not None]
    nominal = min(durations) if durations else 0.0
    return PlannedStep(
        index, options[0].capability, tuple(a.capability for a in options[1:]), params, nominal
    )


def product_order(scenario: Scenario, p: ProductInstance) -> ProductOrder:
    steps = tuple(_step(scenario, i + 1, s) for i, s in enumerate(p.plan))
    start = p.location or _default_location(scenario)
    return ProductOrder(
        name=p.name,
        product_type=p.type,
        priority=p.priority,
        release=p.release,
        steps=steps,
        location=start,
        due=p.due,
        vendor=p.vendor,
        selection=scenario.bidding.selection.for_priority(p.priority),
    )


def _default_location(scenario: Scenario) -> str:
    return "entry"


def defers(scenario: Scenario) -> bool:
    """Does a top-priority product defer its call until its best offer would start?

    As the scenario says; unset, only in a plant whose orders all share one priority and that
    takes no vendor orders. Deferral rejects the offers in hand and calls again when the best one
    would start, so that a machine freeing up goes to the most urgent caller of the class. In a
    plant of one class that wins time (the job shops: docs/benchmarks.md). With classes mixed it
    loses time: the resource queues already put the urgent class ahead of every less urgent
    booking that has not started (agents/resource/timeline.py), so the offer in hand is the
    earliest the class can get, and while the product waits its machine starts less urgent work.
    """
    explicit = scenario.bidding.defer_until_start
    if explicit is not None:
        return explicit
    return not scenario.vendors and len({o.priority for o in scenario.orders}) <= 1


def requester_config(scenario: Scenario, clock_kind: str, time_scale: float | None) -> RequesterConfig:
    b = scenario.bidding
    window = b.reply_window
    if clock_kind == "accelerated" and time_scale:
        window = max(window, MIN_WALL_WINDOW_S * 1000 / time_scale)
    elif clock_kind == "real":
        window = max(window, MIN_WALL_WINDOW_S)
    return RequesterConfig(
        reply_window_ms=int(window * 1000),
        max_rounds=b.max_rounds,
        backoff_ms=int(b.backoff * 1000),
        backoff_max_ms=int(b.backoff * 1000 * b.backoff_factor ** max(b.max_rounds - 1, 0)),
        confirm_timeout_ms=int(max(b.confirm_timeout, window) * 1000),
        # Silence is no refusal: the winner may be restarting, and withdrawing an award it may
        # already be executing would risk the step twice. Keep asking (the answer is idempotent).
        confirm_retries=1000,
        defer_until_start=defers(scenario),
        defer_lead_ms=0 if clock_kind == "virtual" else int(window * 1000),
    )


def offer_validity(scenario: Scenario, config: RequesterConfig) -> float:
    return max(scenario.bidding.offer_validity, config.reply_window_ms / 1000)
