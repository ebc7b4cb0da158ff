"""Reference schedules for job-shop instances: dispatching rules, a feasibility check, CP-SAT.

Pure Python (plus OR-Tools for CP-SAT, when installed). It reads instances with
``scenarios.jobshop`` and otherwise imports nothing of twinbid, so the reference figures do not
depend on the system being measured.

The problem (:class:`Problem`) is the *flexible* job shop, which contains the classic one: every
job is a sequence of operations; every operation has one or more options ``(machine,
duration)``; an operation runs without interruption on one of its machines; a machine does one
operation at a time; all jobs are released at 0. A classic instance is one option per operation.

* :func:`dispatch` — non-delay schedule generation (Giffler–Thompson style): repeatedly take the
  earliest instant ``t*`` at which some next-in-job operation can start; among the operations
  that can start at ``t*`` a priority rule picks one, and it goes on the option that finishes
  earliest (ties: earlier start, then lower machine number). Rules (:data:`RULES`):
  ``FIFO`` (earliest arrival in the machine queue, i.e. the instant the job's previous operation
  ended; ties by job index), ``SPT`` (shortest processing time), ``MWKR`` (most work remaining,
  this operation included). For flexible operations an operation's processing time is its
  shortest option. Every rule breaks remaining ties by job index, so results are deterministic.
* :func:`validate` — the list of everything wrong with a schedule (empty when feasible).
* :func:`solve_cpsat` — a CP-SAT model (interval variables, one optional interval per option,
  no-overlap per machine, precedence in the job, minimise the makespan) with a time limit.
  Without ``ortools`` it returns ``status="skipped"`` and a note instead of failing.

``python bench/jobshop_baselines.py FILE...`` prints the rules' makespans for instance files.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scenarios.jobshop import JobShopInstance, read_instance

__all__ = [
    "RULES",
    "CpSatResult",
    "DispatchResult",
    "Problem",
    "ScheduledOp",
    "cpsat_available",
    "dispatch",
    "dispatch_all",
    "lower_bound",
    "makespan_of",
    "problem_from_instance",
    "problem_from_scenario",
    "solve_cpsat",
    "validate",
]

#: One way to do an operation: (machine, duration).
Option = tuple[int, int]


@dataclass(frozen=True)
class Problem:
    """A (flexible) job-shop problem: ``jobs[j][k]`` lists the options of job j's k-th operation."""

    name: str
    n_machines: int
    jobs: tuple[tuple[tuple[Option, ...], ...], ...]
    #: Proven optimal makespan, when known (classic instances from ``index.json``).
    optimum: int | None = None
    #: A makespan known to be achievable (e.g. the classic optimum for a flexible variant).
    upper_bound: int | None = None
    machine_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for j, job in enumerate(self.jobs):
            for k, options in enumerate(job):
                if not options:
                    raise ValueError(f"{self.name}: job {j}, operation {k} has no machine")
                machines = [m for m, _ in options]
                if len(set(machines)) != len(machines):
                    raise ValueError(f"{self.name}: job {j}, operation {k} lists a machine twice")
                for m, d in options:
                    if not 0 <= m < self.n_machines:
                        raise ValueError(f"{self.name}: job {j}, operation {k}: machine {m} out of range")
                    if d < 0:
                        raise ValueError(f"{self.name}: job {j}, operation {k}: negative duration {d}")

    @property
    def n_jobs(self) -> int:
        return len(self.jobs)

    @property
    def n_operations(self) -> int:
        return sum(len(job) for job in self.jobs)

    @property
    def flexible(self) -> bool:
        return any(len(options) > 1 for job in self.jobs for options in job)

    def duration(self, job: int, op: int, machine: int) -> int | None:
        """The duration of an operation on a machine, None if that machine cannot do it."""
        for m, d in self.jobs[job][op]:
            if m == machine:
                return d
        return None


@dataclass(frozen=True)
class ScheduledOp:
    job: int
    op: int  # index of the operation within its job
    machine: int
    start: float
    end: float


@dataclass
class DispatchResult:
    rule: str
    makespan: float
    schedule: list[ScheduledOp]


@dataclass
class CpSatResult:
    #: ``optimal`` | ``feasible`` (time limit hit) | ``infeasible`` | ``unknown`` (no solution in
    #: time) | ``model_invalid`` | ``skipped`` (ortools missing)
    status: str
    makespan: int | None
    bound: int | None
    wall_seconds: float
    schedule: list[ScheduledOp] = field(default_factory=list)
    note: str = ""
    workers: int = 0

    @property
    def gap(self) -> float | None:
        """(best - bound) / best: 0 when optimality is proven."""
        if self.makespan is None or self.bound is None or self.makespan == 0:
            return None
        return (self.makespan - self.bound) / self.makespan


# --------------------------------------------------------------------------- problems


def problem_from_instance(source: str | PathLike[str] | JobShopInstance) -> Problem:
    """The classic problem of an instance file (or a parsed :class:`JobShopInstance`)."""
    inst = source if isinstance(source, JobShopInstance) else read_instance(source)
    return Problem(
        name=inst.name,
        n_machines=inst.n_machines,
        jobs=tuple(tuple(((m, d),) for m, d in job) for job in inst.jobs),
        optimum=inst.optimum,
        machine_names=tuple(f"m{k}" for k in range(inst.n_machines)),
    )


def problem_from_scenario(scenario: Any) -> Problem:
    """The job-shop problem of a scenario made by ``scenarios.jobshop`` (classic or flexible).

    Duck-typed on the scenario's public helpers (``resources``, ``product_instances()``,
    ``capabilities()``, ``processing_time()``), so this module imports no twinbid model. Job j is
    the j-th product instance; machine i is the i-th resource. Every option of a step, on every
    resource offering its capability, becomes an option; durations must be fixed whole numbers
    (what the converter writes).
    """
    names = tuple(r.name for r in scenario.resources)
    index = {name: i for i, name in enumerate(names)}
    offered = scenario.capabilities()
    jobs: list[tuple[tuple[Option, ...], ...]] = []
    for product in scenario.product_instances():
        if product.release:
            raise ValueError(
                f"{scenario.name}: product {product.name} is released at {product.release}, not 0"
            )
        ops: list[tuple[Option, ...]] = []
        for k, step in enumerate(product.plan):
            options: dict[int, int] = {}
            for capability in step.capabilities:
                for res in offered.get(capability, ()):
                    duration = scenario.processing_time(step, res, capability)
                    if duration is None:
                        continue
                    if duration.dist != "fixed" or duration.mean != int(duration.mean):
                        raise ValueError(
                            f"{scenario.name}: {product.name} step {k} on {res}: the duration must be a "
                            f"fixed whole number, not {duration.to_data()!r}"
                        )
                    m = index[res]
                    options[m] = min(options.get(m, math.inf), int(duration.mean))  # type: ignore[arg-type]
            if not options:
                raise ValueError(f"{scenario.name}: {product.name} step {k}: no resource can do it")
            ops.append(tuple(options.items()))
        jobs.append(tuple(ops))
    bench = getattr(scenario, "benchmark", None)
    optimum = getattr(bench, "optimum", None)
    upper = getattr(bench, "upper_bound", None)
    return Problem(
        name=scenario.name,
        n_machines=len(names),
        jobs=tuple(jobs),
        optimum=int(optimum) if optimum is not None else None,
        upper_bound=int(upper) if upper is not None else None,
        machine_names=names,
    )


def lower_bound(problem: Problem) -> int:
    """A trivial lower bound: the longest job (shortest options) and, for each machine, the work
    only it can do; for flexible problems also the total shortest work spread over all machines."""
    job_bound = max((sum(min(d for _, d in ops) for ops in job) for job in problem.jobs), default=0)
    dedicated = [0] * problem.n_machines
    total = 0
    for job in problem.jobs:
        for ops in job:
            total += min(d for _, d in ops)
            if len(ops) == 1:
                dedicated[ops[0][0]] += ops[0][1]
    spread = math.ceil(total / problem.n_machines) if problem.n_machines else 0
    return max(job_bound, max(dedicated, default=0), spread)


# --------------------------------------------------------------------------- dispatching


@dataclass(frozen=True)
class Candidate:
    """What a priority rule sees of an operation that can start now."""

    job: int
    op: int
    arrival: float  # when the job became ready for this operation (previous operation's end)
    processing: int  # shortest option
    work_remaining: int  # this operation and the rest of the job, shortest options


#: Priority rules: a sort key, smallest first.
RULES: dict[str, Callable[[Candidate], tuple[float, ...]]] = {
    "FIFO": lambda c: (c.arrival, c.job),
    "SPT": lambda c: (c.processing, c.job),
    "MWKR": lambda c: (-c.work_remaining, c.job),
}


def dispatch(problem: Problem, rule: str | Callable[[Candidate], tuple[float, ...]]) -> DispatchResult:
    """A non-delay schedule built with a priority rule (see the module docstring)."""
    key = RULES[rule] if isinstance(rule, str) else rule
    name = rule if isinstance(rule, str) else getattr(rule, "__name__", "custom")
    jobs = problem.jobs
    shortest = [[min(d for _, d in ops) for ops in job] for job in jobs]
    remaining = [[sum(s[k:]) for k in range(len(s))] for s in shortest]
    next_op = [0] * len(jobs)
    job_ready = [0.0] * len(jobs)
    machine_free = [0.0] * problem.n_machines
    schedule: list[ScheduledOp] = []
    left = problem.n_operations
    while left:
        # Earliest start of every next-in-job operation (over its options).
        est: dict[int, float] = {}
        for j, k in enumerate(next_op):
            if k < len(jobs[j]):
                est[j] = min(max(job_ready[j], machine_free[m]) for m, _ in jobs[j][k])
        t_star = min(est.values())
        conflict = [
            Candidate(j, next_op[j], job_ready[j], shortest[j][next_op[j]], remaining[j][next_op[j]])
            for j, t in est.items()
            if t == t_star
        ]
        chosen = min(conflict, key=key)
        j, k = chosen.job, chosen.op
        best: tuple[float, float, int, int] | None = None
        for m, d in jobs[j][k]:
            start = max(job_ready[j], machine_free[m])
            cand = (start + d, start, m, d)
            if best is None or cand < best:
                best = cand
        assert best is not None
        end, start, m, _ = best
        schedule.append(ScheduledOp(j, k, m, start, end))
        machine_free[m] = end
        job_ready[j] = end
        next_op[j] += 1
        left -= 1
    return DispatchResult(name, makespan_of(schedule), schedule)


def dispatch_all(problem: Problem, rules: Iterable[str] = RULES) -> dict[str, DispatchResult]:
    return {rule: dispatch(problem, rule) for rule in rules}


def makespan_of(schedule: Iterable[ScheduledOp]) -> float:
    return max((op.end for op in schedule), default=0.0)


# --------------------------------------------------------------------------- validation


def validate(problem: Problem, schedule: Sequence[ScheduledOp], *, tolerance: float = 1e-6) -> list[str]:
    """Everything that makes ``schedule`` infeasible for ``problem``; an empty list if none.

    Checks: every operation scheduled exactly once, on a machine that can do it, for exactly its
    duration on that machine, not before time 0; each operation starts after the previous one of
    its job ended; no two operations overlap on a machine.
    """
    errors: list[str] = []
    seen: dict[tuple[int, int], ScheduledOp] = {}
    for s in schedule:
        if not (0 <= s.job < problem.n_jobs and 0 <= s.op < len(problem.jobs[s.job])):
            errors.append(f"job {s.job}, operation {s.op}: no such operation")
            continue
        if (s.job, s.op) in seen:
            errors.append(f"job {s.job}, operation {s.op}: scheduled more than once")
            continue
        seen[(s.job, s.op)] = s
        d = problem.duration(s.job, s.op, s.machine)
        if d is None:
            errors.append(f"job {s.job}, operation {s.op}: machine {s.machine} cannot do it")
        elif abs((s.end - s.start) - d) > tolerance:
            errors.append(
                f"job {s.job}, operation {s.op}: runs {s.end - s.start:g} on machine {s.machine}, "
                f"its duration there is {d}"
            )
        if s.start < -tolerance:
            errors.append(f"job {s.job}, operation {s.op}: starts at {s.start:g}, before the release at 0")
    for j, job in enumerate(problem.jobs):
        for k in range(len(job)):
            if (j, k) not in seen:
                errors.append(f"job {j}, operation {k}: not scheduled")
            elif k and (j, k - 1) in seen and seen[(j, k)].start < seen[(j, k - 1)].end - tolerance:
                errors.append(
                    f"job {j}, operation {k}: starts at {seen[(j, k)].start:g} before operation {k - 1} "
                    f"ends at {seen[(j, k - 1)].end:g}"
                )
    by_machine: dict[int, list[ScheduledOp]] = {}
    for s in seen.values():
        by_machine.setdefault(s.machine, []).append(s)
    for m, ops in sorted(by_machine.items()):
        ops.sort(key=lambda s: (s.start, s.end))
        for a, b in itertools.pairwise(ops):
            if b.start < a.end - tolerance:
                errors.append(
                    f"machine {m}: job {a.job} op {a.op} [{a.start:g}, {a.end:g}) overlaps "
                    f"job {b.job} op {b.op} [{b.start:g}, {b.end:g})"
                )
    return errors


# --------------------------------------------------------------------------- CP-SAT


def cpsat_available() -> bool:
    try:
        import ortools.sat.python.cp_model  # noqa: F401
    except ImportError:
        return False
    return True


def solve_cpsat(
    problem: Problem,
    time_limit: float = 10.0,
    *,
    workers: int | None = None,
    hint: Sequence[ScheduledOp] | None = None,
    seed: int = 0,
) -> CpSatResult:
    """Minimise the makespan with CP-SAT within ``time_limit`` seconds.

    ``hint``: a feasible schedule (e.g. the best dispatching one) to start the search from.
    ``workers``: CP-SAT search workers (default: the number of CPUs, at least 1, at most 8).
    """
    try:
        from ortools.sat.python import cp_model
    except ImportError:
        return CpSatResult("skipped", None, None, 0.0, note="ortools is not installed (pip install ortools)")
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    model = cp_model.CpModel()
    horizon = sum(max(d for _, d in ops) for job in problem.jobs for ops in job)
    makespan = model.new_int_var(0, horizon, "makespan")
    starts: dict[tuple[int, int], Any] = {}
    ends: dict[tuple[int, int], Any] = {}
    presence: dict[tuple[int, int, int], Any] = {}
    per_machine: dict[int, list[Any]] = {}
    for j, job in enumerate(problem.jobs):
        for k, ops in enumerate(job):
            lo, hi = min(d for _, d in ops), max(d for _, d in ops)
            start = model.new_int_var(0, horizon - lo, f"s{j}_{k}")
            end = model.new_int_var(lo, horizon, f"e{j}_{k}")
            starts[(j, k)], ends[(j, k)] = start, end
            if len(ops) == 1:
                m, d = ops[0]
                per_machine.setdefault(m, []).append(model.new_interval_var(start, d, end, f"i{j}_{k}"))
                continue
            # One optional interval per option, sharing the operation's start; exactly one is present.
            lits = []
            for m, d in ops:
                lit = model.new_bool_var(f"x{j}_{k}_m{m}")
                presence[(j, k, m)] = lit
                lits.append(lit)
                per_machine.setdefault(m, []).append(
                    model.new_optional_fixed_size_interval_var(start, d, lit, f"i{j}_{k}_m{m}")
                )
            model.add_exactly_one(lits)
            model.add(end == start + sum(d * lit for (_, d), lit in zip(ops, lits, strict=True)))
            if lo == hi:
                model.add(end == start + lo)  # redundant, helps propagation
        for k in range(1, len(job)):
            model.add(starts[(j, k)] >= ends[(j, k - 1)])
        if job:
            model.add(makespan >= ends[(j, len(job) - 1)])
    for intervals in per_machine.values():
        model.add_no_overlap(intervals)
    model.add(makespan >= lower_bound(problem))
    model.minimize(makespan)
    if hint:
        for s in hint:
            model.add_hint(starts[(s.job, s.op)], round(s.start))
            for m, _ in problem.jobs[s.job][s.op]:
                lit = presence.get((s.job, s.op, m))
                if lit is not None:
                    model.add_hint(lit, m == s.machine)
        model.add_hint(makespan, round(makespan_of(hint)))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit)
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = seed
    t0 = time.perf_counter()
    code = solver.solve(model)
    wall = time.perf_counter() - t0
    status = {
        cp_model.OPTIMAL: "optimal",
        cp_model.FEASIBLE: "feasible",
        cp_model.INFEASIBLE: "infeasible",
        cp_model.MODEL_INVALID: "model_invalid",
    }.get(code, "unknown")
    if status not in ("optimal", "feasible"):
        return CpSatResult(status, None, None, wall, note=solver.status_name(code), workers=workers)
    schedule: list[ScheduledOp] = []
    for j, job in enumerate(problem.jobs):
        for k, ops in enumerate(job):
            if len(ops) == 1:
                m = ops[0][0]
            else:
                m = next(m for m, _ in ops if solver.boolean_value(presence[(j, k, m)]))
            s, e = solver.value(starts[(j, k)]), solver.value(ends[(j, k)])
            schedule.append(ScheduledOp(j, k, m, float(s), float(e)))
    best = round(solver.objective_value)
    bound = best if status == "optimal" else math.ceil(solver.best_objective_bound - 1e-9)
    return CpSatResult(status, best, bound, wall, schedule, workers=workers)


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Dispatching-rule makespans (and CP-SAT) of instance files.")
    parser.add_argument("files", nargs="+")
    parser.add_argument("--cpsat", type=float, metavar="SECONDS", help="also run CP-SAT with this time limit")
    args = parser.parse_args(argv)
    for path in args.files:
        problem = problem_from_instance(path)
        results = dispatch_all(problem)
        figures = "  ".join(f"{r} {res.makespan:g}" for r, res in results.items())
        line = f"{problem.name}: optimum {problem.optimum}  LB {lower_bound(problem)}  {figures}"
        if args.cpsat:
            cp = solve_cpsat(
                problem, args.cpsat, hint=min(results.values(), key=lambda r: r.makespan).schedule
            )
            line += f"  CP-SAT {cp.status} {cp.makespan} (bound {cp.bound}, {cp.wall_seconds:.1f} s)"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
