"""Schedule-quality benchmark: the twinbid swarm on classic job-shop instances.

    python bench/bench_jobshop.py [--json] [--instances ft06,la01,...] [--flexible 2,3]
                                  [--random SEEDS] [--time-limit S] [--broker mosquitto|URL]
                                  [--run-timeout S]

For every instance in ``data/jobshop`` (``index.json`` order; ``--instances`` picks some):

* runs the twinbid swarm on the virtual clock (``scenarios.launcher.run``, each run in its own
  temporary output folder, embedded broker unless ``--broker``) and reads its makespan from the
  run's KPIs; the swarm's schedule is read back from ``run.db`` and checked for feasibility
  (precedence, no machine overlap, exact durations) by the same validator as the baselines;
* builds the non-delay dispatching schedules FIFO, SPT and MWKR (``bench/jobshop_baselines.py``);
* prints instance, optimum, twinbid makespan and gap ``(makespan - optimum) / optimum``, the
  rules' makespans and gaps, the swarm run's wall seconds, and the mean gaps.

Then, for each ``--flexible`` K (default 2 and 3; ``--flexible ''`` for none), the flexible
variant of every instance (``scenarios.jobshop.flexible_variant(inst, K, seed=0)``: each
operation on K machines, same duration) is run the same way and compared with CP-SAT's best
makespan and proven lower bound within ``--time-limit`` seconds (skipped with a note when
``ortools`` is not installed). Gaps there are against CP-SAT's best: exact when CP-SAT proved it
optimal, otherwise a lower estimate of the true gap.

Then, for each ``--random`` seed (default 1; ``--random ''`` for none), a random job shop of every
instance's size and duration range (``scenarios.jobshop.random_like(inst, seed)``, Taillard's
scheme), instances no dispatching rule or swarm setting was tuned on, run the same way against
CP-SAT's best. The public and the random set are summarised side by side: mean gap of each, and
the instances where the swarm is worse than FIFO.

Prints the machine (CPU model, cores, Python); with ``--json`` one JSON object of every figure as
the last line. Ends by itself: every swarm run has a wall-clock safety net (``--run-timeout``)
and a run that fails or times out is reported as such, not waited for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jobshop_baselines as jb
from machineinfo import machine

from scenarios.jobshop import (
    JobShopInstance,
    flexible_variant,
    random_like,
    read_instance,
    scenario_from_jobshop,
)
from scenarios.launcher import RunOptions, run
from scenarios.schema import Scenario, Stop


def _ortools_version() -> str | None:
    try:
        import ortools
    except ImportError:
        return None
    return ortools.__version__


JOBSHOP_DIR = Path(__file__).resolve().parents[1] / "data" / "jobshop"  # vendored: data/README.md
RULES = tuple(jb.RULES)


# --------------------------------------------------------------------------- the swarm


def swarm_schedule(db_path: Path, scenario: Scenario) -> list[jb.ScheduledOp]:
    """The schedule the swarm executed, from the run database's steps (as the product twins saw
    them): job = index of the product instance, machine = index of the resource."""
    jobs = {p.name: j for j, p in enumerate(scenario.product_instances())}
    machines = {r.name: i for i, r in enumerate(scenario.resources)}
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as con:
        rows = con.execute("SELECT product, step, resource, started, finished FROM tb_step").fetchall()
    steps = sorted({step for _, step, *_ in rows})
    first = steps[0] if steps else 0  # steps are numbered from 1 today; do not depend on it
    out = []
    for product, step, resource, started, finished in rows:
        if started is None or finished is None or resource not in machines:
            continue  # not executed: validate() reports the operation as not scheduled
        out.append(jb.ScheduledOp(jobs[product], step - first, machines[resource], started, finished))
    return out


def run_swarm(
    scenario: Scenario, problem: jb.Problem, broker: str | None, timeout: float
) -> tuple[dict[str, Any], list[jb.ScheduledOp]]:
    """One swarm run on the virtual clock in a temporary folder: its figures (makespan, how it
    went, feasibility of what it executed) and its schedule (empty if it could not be read)."""
    scenario = scenario.model_copy(update={"stop": Stop(wall_timeout=timeout)})
    figures: dict[str, Any] = {"makespan": None, "ok": False}
    schedule: list[jb.ScheduledOp] = []
    with tempfile.TemporaryDirectory(prefix=f"twinbid-bench-{scenario.name}-") as folder:
        t0 = time.perf_counter()
        try:
            result = asyncio.run(run(scenario, RunOptions(out=Path(folder), broker=broker, progress=False)))
        except Exception as exc:  # report and go on with the next instance
            figures.update(error=f"{type(exc).__name__}: {exc}", wall_seconds=time.perf_counter() - t0)
            return figures, schedule
        figures["wall_seconds"] = round(time.perf_counter() - t0, 2)
        k = result.kpis
        figures.update(
            ok=result.ok,
            timed_out=result.timed_out,
            makespan=k.get("makespan"),
            run_wall_seconds=k.get("wall_seconds"),
            products=k.get("products"),
            messages=(k.get("messages") or {}).get("total"),
            messages_per_step=(k.get("messages") or {}).get("per_step"),
            notices=result.notices,
        )
        try:
            schedule = swarm_schedule(Path(folder) / "run.db", scenario)
            violations = jb.validate(problem, schedule)
        except Exception as exc:  # the schedule could not be read back: say so, do not guess
            figures["feasible"] = None
            figures["feasibility_note"] = f"not checked: {type(exc).__name__}: {exc}"
        else:
            figures["feasible"] = not violations
            figures["violations"] = violations[:10]
    return figures, schedule


def same_schedule(a: list[jb.ScheduledOp], b: list[jb.ScheduledOp]) -> bool:
    """Every operation on the same machine at the same time."""
    key = {(o.job, o.op): (o.machine, o.start, o.end) for o in a}
    return (
        bool(a) and len(a) == len(b) and all(key.get((o.job, o.op)) == (o.machine, o.start, o.end) for o in b)
    )


def compare(
    swarm: dict[str, Any], schedule: list[jb.ScheduledOp], rules: dict[str, jb.DispatchResult]
) -> None:
    """Record which dispatching rules produced exactly the swarm's schedule (a diagnostic)."""
    if swarm.get("feasible"):
        swarm["same_schedule_as"] = [r for r, res in rules.items() if same_schedule(schedule, res.schedule)]


# --------------------------------------------------------------------------- the benchmark


def gap(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return round(100.0 * (value - reference) / reference, 2)


def baselines(problem: jb.Problem) -> dict[str, jb.DispatchResult]:
    results = jb.dispatch_all(problem, RULES)
    for rule, res in results.items():
        errors = jb.validate(problem, res.schedule)
        if errors:  # a bug in the baselines, never a property of the instance
            raise AssertionError(f"{problem.name} {rule}: infeasible schedule: {errors[:3]}")
    return results


def classic_row(inst: JobShopInstance, args: argparse.Namespace) -> dict[str, Any]:
    problem = jb.problem_from_instance(inst)
    rules = baselines(problem)
    swarm, schedule = run_swarm(scenario_from_jobshop(inst), problem, args.broker, args.run_timeout)
    compare(swarm, schedule, rules)
    row: dict[str, Any] = {
        "instance": inst.name,
        "size": f"{inst.n_jobs}x{inst.n_machines}",
        "operations": inst.n_operations,
        "optimum": inst.optimum,
        "twinbid": swarm,
        "twinbid_gap": gap(swarm["makespan"] if swarm["ok"] else None, inst.optimum),
    }
    for rule, res in rules.items():
        row[rule] = res.makespan
        row[f"{rule}_gap"] = gap(res.makespan, inst.optimum)
    return row


def cpsat_row(scenario: Scenario, problem: jb.Problem, args: argparse.Namespace) -> dict[str, Any]:
    """The swarm and the rules on one instance without a known optimum, against CP-SAT's best
    makespan within ``--time-limit`` seconds (started from the best rule's schedule)."""
    rules = baselines(problem)
    best_rule = min(rules.values(), key=lambda r: r.makespan)
    cp = jb.solve_cpsat(problem, args.time_limit, hint=best_rule.schedule)
    if cp.schedule and jb.validate(problem, cp.schedule):
        raise AssertionError(
            f"{problem.name}: CP-SAT schedule infeasible: {jb.validate(problem, cp.schedule)[:3]}"
        )
    swarm, schedule = run_swarm(scenario, problem, args.broker, args.run_timeout)
    compare(swarm, schedule, rules)
    ref = cp.makespan
    row: dict[str, Any] = {
        "instance": scenario.name,
        "cpsat": {
            "status": cp.status,
            "best": cp.makespan,
            "bound": cp.bound,
            "wall_seconds": round(cp.wall_seconds, 2),
            "workers": cp.workers,
            "note": cp.note,
        },
        "twinbid": swarm,
        "twinbid_gap": gap(swarm["makespan"] if swarm["ok"] else None, ref),
    }
    for rule, res in rules.items():
        row[rule] = res.makespan
        row[f"{rule}_gap"] = gap(res.makespan, ref)
    return row


def flexible_row(inst: JobShopInstance, k: int, args: argparse.Namespace) -> dict[str, Any]:
    scenario = flexible_variant(inst, k, 0)
    row = cpsat_row(scenario, jb.problem_from_scenario(scenario), args)
    return {**row, "alternatives": k, "classic_optimum": inst.optimum}


def random_row(inst: JobShopInstance, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """A random job shop of ``inst``'s size and duration range (seeded), against CP-SAT."""
    rand = random_like(inst, seed)
    row = cpsat_row(scenario_from_jobshop(rand), jb.problem_from_instance(rand), args)
    return {**row, "like": inst.name, "seed": seed, "size": f"{rand.n_jobs}x{rand.n_machines}"}


def mean_gaps(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in ("twinbid", *RULES):
        values = [r[f"{key}_gap"] for r in rows if r.get(f"{key}_gap") is not None]
        out[key] = round(statistics.fmean(values), 2) if values else None
    return out


def worse_than_fifo(rows: list[dict[str, Any]]) -> list[str]:
    """Instances where the swarm's makespan exceeds FIFO's (or the swarm did not finish)."""
    return [
        r["instance"]
        for r in rows
        if r["twinbid_gap"] is None or r.get("FIFO") is None or r["twinbid"]["makespan"] > r["FIFO"]
    ]


def side_by_side(classic: list[dict[str, Any]], rand: list[dict[str, Any]]) -> dict[str, Any]:
    """The public and the random set summarised alike: how many, mean gaps, worse than FIFO."""
    return {
        name: {"instances": len(rows), "mean_gap": mean_gaps(rows), "worse_than_fifo": worse_than_fifo(rows)}
        for name, rows in (("public", classic), ("random", rand))
        if rows
    }


# --------------------------------------------------------------------------- output


def _n(value: Any, width: int, fmt: str = "g") -> str:
    return f"{'-' if value is None else format(value, fmt):>{width}}"


def _swarm_cell(swarm: dict[str, Any]) -> str:
    if swarm.get("error"):
        return "error"
    if not swarm.get("ok"):
        return "timeout" if swarm.get("timed_out") else "failed"
    mark = "" if swarm.get("feasible") is not False else "!"
    return f"{swarm['makespan']:g}{mark}"


def _rule_cells(row: dict[str, Any]) -> str:
    return "".join(f"{_n(row[r], 7)}{_n(row[f'{r}_gap'], 7, '.1f')}" for r in RULES)


def print_report(results: dict[str, Any]) -> None:
    m = results["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, {m['os']}, ortools {m['ortools']}")
    broker = results["settings"]["broker"] or "embedded"
    print(f"swarm: virtual clock, broker {broker}; gap % = (makespan - reference) / reference")
    rule_head = "".join(f"{r:>7}{'gap%':>7}" for r in RULES)
    rows = results["classic"]
    if rows:
        print()
        print("Classic instances (reference: proven optimum)")
        print(f"{'instance':<10}{'size':>7}{'optimum':>9}{'twinbid':>9}{'gap%':>7}{rule_head}{'wall s':>8}")
        for r in rows:
            print(
                f"{r['instance']:<10}{r['size']:>7}{_n(r['optimum'], 9)}{_swarm_cell(r['twinbid']):>9}"
                f"{_n(r['twinbid_gap'], 7, '.1f')}{_rule_cells(r)}{_n(r['twinbid'].get('wall_seconds'), 8, '.1f')}"
            )
        mg = results["classic_mean_gap"]
        means = "".join(f"{'':>7}{_n(mg[r], 7, '.1f')}" for r in RULES)
        print(f"{'mean gap':<10}{'':>7}{'':>9}{'':>9}{_n(mg['twinbid'], 7, '.1f')}{means}")
    rows = results["flexible"]
    if rows:
        print()
        print(
            f"Flexible variants, seed 0 (reference: CP-SAT best within {results['settings']['time_limit']:g} s)"
        )
        print(
            f"{'instance':<13}{'classic':>8}{'CP-SAT':>8}{'bound':>7}{'status':>10}{'cp s':>6}"
            f"{'twinbid':>9}{'gap%':>7}{rule_head}{'wall s':>8}"
        )
        for r in rows:
            cp = r["cpsat"]
            print(
                f"{r['instance']:<13}{_n(r['classic_optimum'], 8)}{_n(cp['best'], 8)}{_n(cp['bound'], 7)}"
                f"{cp['status']:>10}{_n(cp['wall_seconds'], 6, '.1f')}{_swarm_cell(r['twinbid']):>9}"
                f"{_n(r['twinbid_gap'], 7, '.1f')}{_rule_cells(r)}{_n(r['twinbid'].get('wall_seconds'), 8, '.1f')}"
            )
        for k, mg in results["flexible_mean_gap"].items():
            means = "".join(f"{'':>7}{_n(mg[r], 7, '.1f')}" for r in RULES)
            print(f"{'mean, K=' + k:<13}{'':>48}{_n(mg['twinbid'], 7, '.1f')}{means}")
    rows = results["random"]
    if rows:
        print()
        print(
            f"Random job shops of the public sizes, seeds {results['settings']['random_seeds']} "
            f"(reference: CP-SAT best within {results['settings']['time_limit']:g} s)"
        )
        print(
            f"{'instance':<12}{'size':>7}{'CP-SAT':>8}{'bound':>7}{'status':>10}{'cp s':>6}"
            f"{'twinbid':>9}{'gap%':>7}{rule_head}{'wall s':>8}"
        )
        for r in rows:
            cp = r["cpsat"]
            print(
                f"{r['instance']:<12}{r['size']:>7}{_n(cp['best'], 8)}{_n(cp['bound'], 7)}"
                f"{cp['status']:>10}{_n(cp['wall_seconds'], 6, '.1f')}{_swarm_cell(r['twinbid']):>9}"
                f"{_n(r['twinbid_gap'], 7, '.1f')}{_rule_cells(r)}{_n(r['twinbid'].get('wall_seconds'), 8, '.1f')}"
            )
    notes = {r["cpsat"]["note"] for r in results["flexible"] + results["random"] if r["cpsat"]["note"]}
    for note in sorted(notes):
        print(f"CP-SAT: {note}")
    if results["sets"]:
        print()
        print("Public and random sets side by side (mean gap %; instances where twinbid is worse than FIFO)")
        print(f"{'set':<8}{'n':>4}{'twinbid':>9}" + "".join(f"{r:>7}" for r in RULES) + "  worse than FIFO")
        for name, st in results["sets"].items():
            mg = st["mean_gap"]
            print(
                f"{name:<8}{st['instances']:>4}{_n(mg['twinbid'], 9, '.1f')}"
                + "".join(_n(mg[r], 7, ".1f") for r in RULES)
                + f"  {', '.join(st['worse_than_fifo']) or 'none'}"
            )
    everything = results["classic"] + results["flexible"] + results["random"]
    if everything:
        same = [r for r in everything if r["twinbid"].get("same_schedule_as")]
        names = sorted({rule for r in same for rule in r["twinbid"]["same_schedule_as"]})
        print()
        print(
            f"twinbid's schedule is operation for operation a dispatching rule's on {len(same)} of "
            f"{len(everything)} runs" + (f" ({', '.join(names)})" if names else "")
        )
    problems = [
        (r["instance"], r["twinbid"])
        for r in everything
        if not r["twinbid"].get("ok") or r["twinbid"].get("feasible") is not True
    ]
    for name, swarm in problems:
        detail = (
            swarm.get("error")
            or swarm.get("feasibility_note")
            or "; ".join(swarm.get("violations") or [])
            or f"products {swarm.get('products')}, timed out {swarm.get('timed_out')}"
        )
        print(f"twinbid {name}: {detail}")
    print(f"total wall time: {results['wall_seconds']:.0f} s")


# --------------------------------------------------------------------------- main


def _instances(names: str | None) -> list[JobShopInstance]:
    index = json.loads((JOBSHOP_DIR / "index.json").read_text(encoding="utf-8"))
    available = [entry["name"] for entry in index]
    wanted = [n.strip() for n in names.split(",") if n.strip()] if names else available
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise SystemExit(f"unknown instance(s) {', '.join(unknown)}; available: {', '.join(available)}")
    files = {entry["name"]: entry["file"] for entry in index}
    return [read_instance(JOBSHOP_DIR / files[n]) for n in wanted]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--json", action="store_true", help="print one JSON object of every figure as the last line"
    )
    p.add_argument("--instances", help="comma-separated instance names (default: all in index.json)")
    p.add_argument(
        "--flexible", default="2,3", help="alternatives per operation for flexible variants ('' for none)"
    )
    p.add_argument(
        "--random",
        default="1",
        help="seeds of random job shops of every instance's size ('' for none; default 1)",
    )
    p.add_argument(
        "--time-limit", type=float, default=5.0, help="CP-SAT seconds per flexible or random instance"
    )
    p.add_argument("--broker", default=None, help="'mosquitto' or a broker URL (default: embedded)")
    p.add_argument(
        "--run-timeout", type=float, default=180.0, help="wall seconds before a swarm run is abandoned"
    )
    args = p.parse_args(argv)
    try:
        args.flex = [int(k) for k in args.flexible.split(",") if k.strip()]
    except ValueError:
        p.error(f"--flexible takes whole numbers separated by commas, not {args.flexible!r}")
    try:
        args.seeds = [int(s) for s in args.random.split(",") if s.strip()]
    except ValueError:
        p.error(f"--random takes whole numbers separated by commas, not {args.random!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    instances = _instances(args.instances)
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "jobshop",
        "machine": machine(ortools=_ortools_version()),
        "settings": {
            "instances": [i.name for i in instances],
            "flexible": args.flex,
            "flexible_seed": 0,
            "random_seeds": args.seeds,
            "time_limit": args.time_limit,
            "broker": args.broker,
            "clock": "virtual",
            "cpsat": jb.cpsat_available(),
        },
    }
    classic = []
    for inst in instances:
        classic.append(classic_row(inst, args))
        _progress(classic[-1])
    flexible = []
    for k in args.flex:
        for inst in instances:
            if k > inst.n_machines:
                continue
            flexible.append(flexible_row(inst, k, args))
            _progress(flexible[-1])
    rand = []
    for seed in args.seeds:
        for inst in instances:
            rand.append(random_row(inst, seed, args))
            _progress(rand[-1])
    results.update(
        classic=classic,
        classic_mean_gap=mean_gaps(classic),
        flexible=flexible,
        flexible_mean_gap={
            str(k): mean_gaps([r for r in flexible if r["alternatives"] == k]) for k in args.flex
        },
        random=rand,
        random_mean_gap=mean_gaps(rand),
        sets=side_by_side(classic, rand),
        wall_seconds=round(time.perf_counter() - t0, 1),
    )
    results["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print_report(results)
    if args.json:
        print(json.dumps(results, separators=(",", ":")))
    return 0


def _progress(row: dict[str, Any]) -> None:
    swarm = row["twinbid"]
    print(
        f"  {row['instance']}: twinbid {_swarm_cell(swarm)} in {swarm.get('wall_seconds', 0):.1f} s",
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
