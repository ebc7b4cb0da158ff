"""Dispatching baselines for mixed-priority plants: the same jobs, resources and transport as a
scenario, scheduled by a small event-driven list scheduler with a priority rule.

Pure Python. It reads a validated :class:`scenarios.schema.Scenario` and otherwise imports
nothing of twinbid's agents, so the baseline figures do not depend on the system measured.

The model (:func:`plant_from_scenario`): every product instance is a job released at its
release time, due at its due time (or never), with the steps of its plan in order; a step may
be done by every resource offering one of its capabilities, taking the processing time the
scenario gives that resource for it (the alternative's, else the step's, else the resource's
own; a random duration at its mean) plus the capability's set-up when the resource last did
another capability; a job travels from where it is (its order's location, else ``entry``, as
the launcher places it) to the resource's location before a step (the scenario's transport
times). A resource does one step at a time. Breakdowns, faults and stock are not modelled.

:func:`schedule` — list scheduling: each job's next step would go to the resource that
finishes it earliest (ties: earlier start, then resource name; twinbid's top priority chooses
so too); at the earliest instant ``t*`` at which some job's step can start there, the rule picks
one of the jobs whose step starts then, and it is booked. Rules (:data:`RULES`), lower key first, remaining ties by job name:

* ``FIFO`` — the instant the job became ready for this step, then its release;
* ``PRIO-EDD`` — priority (1 first), then due time (none: last), then FIFO;
* ``ATC`` — apparent tardiness cost (Vepsalainen & Morton): the largest
  ``w / p * exp(-max(0, d - t - R) / (k * p_mean))`` first, with ``w = 6 - priority``, ``p`` the
  step's shortest processing time, ``R`` the job's remaining work from this step on, ``d`` its
  due time, ``p_mean`` the mean ``p`` of the candidates and ``k = 2``; jobs without a due time
  have index 0 and go by priority, then FIFO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from scenarios.schema import Scenario, Warehouse

__all__ = ["RULES", "Job", "Option", "Plant", "plant_from_scenario", "schedule", "weight"]

RULES = ("FIFO", "PRIO-EDD", "ATC")
ATC_K = 2.0
EPS = 1e-9


def weight(priority: int) -> int:
    """The weight of a priority in priority-weighted tardiness and flow time: 5 for priority 1
    down to 1 for priority 5."""
    return 6 - priority


@dataclass(frozen=True)
class Option:
    """One way to do a step: on ``resource`` via ``capability``, taking ``duration``."""

    resource: str
    capability: str
    duration: float
    setup: float


@dataclass(frozen=True)
class Job:
    name: str
    product_type: str
    priority: int
    release: float
    due: float | None
    location: str
    steps: tuple[tuple[Option, ...], ...]

    def remaining(self, k: int) -> float:
        return sum(min(o.duration for o in step) for step in self.steps[k:])


@dataclass(frozen=True)
class Plant:
    name: str
    jobs: tuple[Job, ...]
    locations: dict[str, str]  # resource -> location
    travel: Any  # shopfloor.transport.Distances

    def travel_time(self, a: str, b: str) -> float:
        return float(self.travel.travel_time(a, b))


@dataclass
class Result:
    rule: str
    completion: dict[str, float] = field(default_factory=dict)
    #: (job, step index from 0, resource, start, end)
    steps: list[tuple[str, int, str, float, float]] = field(default_factory=list)


def _setup(resource: Any, capability: str) -> float:
    if isinstance(resource, Warehouse):
        return 0.0
    offer = resource.capability(capability)
    return float(offer.setup) if offer is not None else 0.0


def plant_from_scenario(scenario: Scenario) -> Plant:
    """The jobs, resources and transport of a scenario, as the module docstring describes."""
    from scenarios.assembly import distances  # the launcher's own transport table

    jobs = []
    for p in scenario.product_instances():
        steps = []
        for step in p.plan:
            options = []
            for alt in step.options():
                for name in scenario.offering(alt.capability):
                    d = scenario.processing_time(step, name, alt.capability)
                    if d is None:
                        continue
                    res = scenario.resource(name)
                    options.append(Option(name, alt.capability, float(d.mean), _setup(res, alt.capability)))
            if not options:
                raise ValueError(f"{scenario.name}: {p.name}: no resource can do step {step}")
            steps.append(tuple(options))
        jobs.append(Job(p.name, p.type, p.priority, p.release, p.due, p.location or "entry", tuple(steps)))
    return Plant(
        scenario.name, tuple(jobs), {r.name: r.location for r in scenario.resources}, distances(scenario)
    )


def _key(rule: str, job: Job, k: int, ready: float, t: float, p_mean: float) -> tuple:
    fifo = (ready, job.release)
    if rule == "FIFO":
        return fifo
    if rule == "PRIO-EDD":
        return (job.priority, math.inf if job.due is None else job.due, *fifo)
    if rule == "ATC":
        index = 0.0
        if job.due is not None:
            p = min(o.duration for o in job.steps[k]) or EPS
            slack = max(0.0, job.due - t - job.remaining(k))
            index = weight(job.priority) / p * math.exp(-slack / (ATC_K * max(p_mean, EPS)))
        return (-index, job.priority, *fifo)
    raise ValueError(f"unknown rule {rule!r}; known: {', '.join(RULES)}")


def _end(o: Option, start: float, last_cap: dict[str, str | None]) -> float:
    """When ``o`` started at ``start`` ends: set-up only after another capability."""
    setup = o.setup if last_cap[o.resource] not in (None, o.capability) else 0.0
    return start + setup + o.duration


def schedule(plant: Plant, rule: str) -> Result:
    """The non-delay schedule of ``plant`` under ``rule`` (see the module docstring)."""
    free = dict.fromkeys(plant.locations, 0.0)
    last_cap: dict[str, str | None] = dict.fromkeys(plant.locations)
    nxt = {j.name: 0 for j in plant.jobs}
    ready = {j.name: j.release for j in plant.jobs}
    where = {j.name: j.location for j in plant.jobs}
    result = Result(rule)
    open_jobs = {j.name: j for j in plant.jobs if j.steps}
    for j in plant.jobs:
        if not j.steps:
            result.completion[j.name] = j.release

    def start_of(job: Job, o: Option) -> float:
        arrive = ready[job.name] + plant.travel_time(where[job.name], plant.locations[o.resource])
        return max(free[o.resource], arrive)

    while open_jobs:
        best = {}  # job -> (end, start, option): where its next step would finish earliest
        for name, job in open_jobs.items():
            best[name] = min(
                ((_end(o, start_of(job, o), last_cap), start_of(job, o), o) for o in job.steps[nxt[name]]),
                key=lambda x: (x[0], x[1], x[2].resource),
            )
        t = min(start for _, start, _ in best.values())
        candidates = sorted(n for n, (_, start, _) in best.items() if start <= t + EPS)
        p_mean = sum(min(o.duration for o in open_jobs[n].steps[nxt[n]]) for n in candidates) / len(
            candidates
        )
        name = min(
            candidates,
            key=lambda n: (_key(rule, open_jobs[n], nxt[n], ready[n], t, p_mean), n),
        )
        job = open_jobs[name]
        end, _, option = best[name]
        result.steps.append((name, nxt[name], option.resource, t, end))
        free[option.resource], last_cap[option.resource] = end, option.capability
        ready[name], where[name] = end, plant.locations[option.resource]
        nxt[name] += 1
        if nxt[name] == len(job.steps):
            result.completion[name] = end
            del open_jobs[name]
    return result
