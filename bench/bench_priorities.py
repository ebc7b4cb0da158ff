"""Priority benchmark: does twinbid serve urgent products first? Mixed-priority plants, per priority.

    python bench/bench_priorities.py [--json] [--plants gen-1,gen-2,gen-3,demo,chaos,aircraft-sensor]
                                     [--products N] [--run-timeout S] [--against PATH]

Plants: seeded random plants (``gen-<seed>``, :func:`generated_plant`: workstations of different
speed at several locations, three product types, ``--products`` orders of mixed priority
arriving over time into a loaded shop, each due ``1.2``-``3`` times its work content after its
release) and the shipped scenarios ``demo``, ``chaos`` and ``aircraft-sensor``.

Every plant is made deterministic first (:func:`deterministic`): virtual clock, every random
duration at its mean, no breakdowns, no faults, no vendors (their orders stay), so twinbid and
the baselines schedule exactly the same work. Then, on the same plant:

* **twinbid** — ``scenarios.launcher.run`` in a temporary folder (embedded broker); each
  product's completion from the run database (``tb_product``);
* **FIFO, PRIO-EDD, ATC** — non-delay dispatching of the same jobs, resources and transport
  (``bench/priority_baselines.py``).

Per priority: products, mean flow time (completion - release), mean lateness (completion - due,
products with a due time), on-time rate, and priority-weighted tardiness ``TWT = sum w *
max(0, C - d)`` with ``w = 6 - priority`` (5 for priority 1). Per plant: TWT, priority-weighted
mean flow time (the measure for plants without due times), makespan, twinbid's ratio to the
best baseline on both, and the **inversions**: pairs of priorities within one product type where
the more urgent one flowed slower on average.

``--against PATH`` also runs twinbid from another checkout (a ``git worktree`` of the commit to
compare with) on the same plants, in a fresh Python with that tree's code; the figures are
printed side by side, ratios this / against within one run.

Prints the machine; with ``--json`` one JSON object of every figure as the last line. Ends by
itself: every run has a wall-clock safety net (``--run-timeout``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import priority_baselines as pb
from machineinfo import machine

from scenarios.launcher import RunOptions, run
from scenarios.loader import dump_scenario, load_scenario
from scenarios.schema import Scenario, Stop

HERE = Path(__file__).resolve().parents[1]
SHIPPED = ("demo", "chaos", "aircraft-sensor")
METHODS = ("twinbid", *pb.RULES)


# --------------------------------------------------------------------------- plants


def generated_plant(seed: int, products: int = 40) -> Scenario:
    """A seeded mixed-priority plant: 6 capabilities, each offered by one or two workstations
    (a fast dear one and a slow cheap one) spread over four cells one transport unit apart;
    three product types of 3-5 steps; ``products`` orders of one product, priorities 1-5 drawn
    uniformly, released by a Poisson stream at about 95 % of the busiest machines' capacity, each due
    ``U(1.2, 3)`` times its work content after its release."""
    rng = random.Random(f"bench-priorities:{seed}")
    caps = ["cut", "mill", "drill", "weld", "paint", "test"]
    resources, fastest = [], {}
    for cap in caps:
        base = rng.randint(4, 12)
        fastest[cap] = base
        for i in range(rng.choice((1, 2))):
            resources.append(
                {
                    "kind": "workstation",
                    "name": f"{cap}-{i + 1}",
                    "location": f"cell-{rng.randrange(4)}",
                    "capabilities": [
                        {"name": cap, "duration": base + 3 * i, "setup": 0, "cost_rate": 4 - 2 * i}
                    ],
                }
            )
    types = []
    for t in range(3):
        plan = rng.sample(caps, rng.randint(3, 5))
        types.append({"name": f"type-{t}", "plan": [{"capability": c} for c in plan]})
    work = {pt["name"]: sum(fastest[s["capability"]] for s in pt["plan"]) for pt in types}
    per_cap = {c: sum(1 for r in resources if r["capabilities"][0]["name"] == c) for c in caps}
    # the busiest capability's machines at ~95 %: mean time between arrivals
    load = {
        c: statistics.fmean(sum(s["capability"] == c for s in pt["plan"]) for pt in types) * fastest[c]
        for c in caps
    }
    gap = max(load[c] / per_cap[c] for c in caps) / 0.95
    orders, t = [], 0.0
    for _ in range(products):
        pt = rng.choice(types)["name"]
        orders.append(
            {
                "type": pt,
                "priority": rng.randint(1, 5),
                "release": round(t, 1),
                "lead_time": round(work[pt] * rng.uniform(1.2, 3.0), 1),
                "location": "entry",
            }
        )
        t += rng.expovariate(1.0 / gap)
    return Scenario.model_validate(
        {
            "name": f"gen-{seed}",
            "description": f"Generated mixed-priority plant, seed {seed}.",
            "namespace": f"gen-{seed}",
            "clock": {"kind": "virtual"},
            "seed": seed,
            "transport": {"default_time": 1},
            "resources": resources,
            "product_types": types,
            "orders": orders,
        }
    )


def _mean_of(value: Any) -> Any:
    """A duration's data with a distribution replaced by its mean."""
    if isinstance(value, dict) and len(value) == 1:
        ((kind, args),) = value.items()
        if kind == "uniform":
            return (args[0] + args[1]) / 2
        if kind == "triangular":
            return sum(args) / 3
        if kind == "normal":
            return args[0]
    return value


def _means(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: (_mean_of(v) if k in ("duration", "setup") else _means(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [_means(v) for v in data]
    return data


def deterministic(scenario: Scenario) -> Scenario:
    """The same plant without chance: virtual clock, means for random durations, no breakdowns,
    faults or vendors (orders keep their priorities, releases and due times)."""
    data = scenario.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    data = _means(data)
    data["clock"] = {"kind": "virtual"}
    data.pop("faults", None)
    data.pop("vendors", None)
    data.pop("stop", None)
    for r in data.get("resources", []):
        r.pop("breakdown", None)
        r.pop("breakdown_policy", None)
    for o in data.get("orders", []):
        o.pop("vendor", None)
    return Scenario.model_validate(data)


def plant(name: str, products: int) -> Scenario:
    if name.startswith("gen-"):
        return generated_plant(int(name.removeprefix("gen-")), products)
    if name in SHIPPED:
        return deterministic(load_scenario(HERE / "scenarios" / f"{name}.yaml"))
    raise SystemExit(f"unknown plant {name!r}: gen-<seed> or one of {', '.join(SHIPPED)}")


# --------------------------------------------------------------------------- twinbid


_READ = "SELECT product, product_type, priority, release, due, status, completed_sim FROM tb_product"


def _products_from(db: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        rows = con.execute(_READ).fetchall()
    keys = ("product", "product_type", "priority", "release", "due", "status", "completed")
    return [dict(zip(keys, r, strict=True)) for r in rows]


def run_twinbid(scenario: Scenario, timeout: float) -> dict[str, Any]:
    """One twinbid run of the plant on the virtual clock: per product its completion."""
    scenario = scenario.model_copy(update={"stop": Stop(wall_timeout=timeout)})
    with tempfile.TemporaryDirectory(prefix=f"twinbid-prio-{scenario.namespace}-") as folder:
        t0 = time.perf_counter()
        result = asyncio.run(run(scenario, RunOptions(out=Path(folder), progress=False)))
        return {
            "ok": result.ok,
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "messages": (result.kpis.get("messages") or {}).get("total"),
            "products": _products_from(Path(folder) / "run.db"),
        }


_AGAINST = """
import asyncio, json, sqlite3, sys, tempfile, time
from pathlib import Path
from scenarios.launcher import RunOptions, run
from scenarios.loader import load_scenario
from scenarios.schema import Stop
scenario = load_scenario(sys.argv[1])
scenario = scenario.model_copy(update={"stop": Stop(wall_timeout=float(sys.argv[2]))})
with tempfile.TemporaryDirectory() as folder:
    t0 = time.perf_counter()
    result = asyncio.run(run(scenario, RunOptions(out=Path(folder), progress=False)))
    with sqlite3.connect(Path(folder) / "run.db") as con:
        rows = con.execute(sys.argv[3]).fetchall()
    print("RESULT " + json.dumps({"ok": result.ok, "wall_seconds": round(time.perf_counter() - t0, 1),
          "messages": (result.kpis.get("messages") or {}).get("total"), "rows": rows}))
"""


def run_twinbid_in(tree: Path, scenario: Scenario, timeout: float) -> dict[str, Any]:
    """The same run with another checkout's code, in a fresh Python (its imports, its folder)."""
    with tempfile.TemporaryDirectory(prefix="twinbid-prio-against-") as folder:
        path = Path(folder) / "plant.yaml"
        path.write_text(dump_scenario(scenario), encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": str(tree)}
        out = subprocess.run(
            [sys.executable, "-c", _AGAINST, str(path), str(timeout), _READ],
            cwd=tree, env=env, capture_output=True, text=True, timeout=timeout + 120,
        )  # fmt: skip
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("RESULT "):
            got = json.loads(line[len("RESULT ") :])
            keys = ("product", "product_type", "priority", "release", "due", "status", "completed")
            got["products"] = [dict(zip(keys, r, strict=True)) for r in got.pop("rows")]
            return got
    raise RuntimeError(
        f"the run in {tree} ended without figures (exit {out.returncode}): {out.stderr[-2000:]}"
    )


def baseline_products(scenario: Scenario, rule: str) -> list[dict[str, Any]]:
    p = pb.plant_from_scenario(scenario)
    done = pb.schedule(p, rule).completion
    return [
        {"product": j.name, "product_type": j.product_type, "priority": j.priority, "release": j.release,
         "due": j.due, "status": "completed", "completed": done[j.name]}
        for j in p.jobs
    ]  # fmt: skip


# --------------------------------------------------------------------------- figures


def _r(x: float | None, digits: int = 1) -> float | None:
    return None if x is None else round(x, digits)


def figures(products: list[dict[str, Any]]) -> dict[str, Any]:
    """Per priority and over the plant: flow time, lateness, on-time rate, TWT, weighted flow."""
    done = [p for p in products if p["status"] == "completed" and p["completed"] is not None]
    by_prio: dict[str, Any] = {}
    for prio in sorted({p["priority"] for p in products}):
        mine = [p for p in done if p["priority"] == prio]
        flows = [p["completed"] - p["release"] for p in mine]
        dated = [p["completed"] - p["due"] for p in mine if p["due"] is not None]
        by_prio[str(prio)] = {
            "products": sum(1 for p in products if p["priority"] == prio),
            "completed": len(mine),
            "flow_mean": _r(statistics.fmean(flows)) if flows else None,
            "lateness_mean": _r(statistics.fmean(dated)) if dated else None,
            "on_time": _r(sum(x <= 1e-9 for x in dated) / len(dated), 3) if dated else None,
            "twt": _r(sum(pb.weight(prio) * max(0.0, x) for x in dated)),
        }
    wflow = sum(pb.weight(p["priority"]) * (p["completed"] - p["release"]) for p in done)
    weights = sum(pb.weight(p["priority"]) for p in done)
    return {
        "completed": len(done),
        "products": len(products),
        "makespan": _r(max((p["completed"] for p in done), default=None)),
        "twt": _r(sum(v["twt"] for v in by_prio.values())),
        "weighted_flow": _r(wflow / weights) if weights else None,
        "by_priority": by_prio,
        "inversions": inversions(done),
    }


def inversions(done: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Within each product type, pairs of priorities where the more urgent flowed slower."""
    out = []
    for pt in sorted({p["product_type"] for p in done}):
        means = {}
        for prio in sorted({p["priority"] for p in done if p["product_type"] == pt}):
            flows = [
                p["completed"] - p["release"]
                for p in done
                if p["product_type"] == pt and p["priority"] == prio
            ]
            means[prio] = statistics.fmean(flows)
        prios = sorted(means)
        for i, hi in enumerate(prios):
            for lo in prios[i + 1 :]:
                if means[hi] > means[lo] + 1e-9:
                    out.append(
                        {
                            "type": pt,
                            "urgent": hi,
                            "flow": _r(means[hi]),
                            "less_urgent": lo,
                            "its_flow": _r(means[lo]),
                        }
                    )
    return out


def plant_row(name: str, args: argparse.Namespace) -> dict[str, Any]:
    scenario = plant(name, args.products)
    row: dict[str, Any] = {"plant": name, "products": len(scenario.product_instances())}
    swarm = run_twinbid(scenario, args.run_timeout)
    row["twinbid"] = {**figures(swarm.pop("products")), **swarm}
    if args.against:
        other = run_twinbid_in(Path(args.against), scenario, args.run_timeout)
        row["against"] = {**figures(other.pop("products")), **other}
    for rule in pb.RULES:
        row[rule] = figures(baseline_products(scenario, rule))
    best = {
        key: min((row[r][key] for r in pb.RULES if row[r][key] is not None), default=None)
        for key in ("twt", "weighted_flow")
    }
    row["best_baseline"] = best
    row["ratio_to_best"] = {
        key: (_r(row["twinbid"][key] / best[key], 3) if best[key] else None)
        for key in ("twt", "weighted_flow")
    }
    if args.against:
        row["ratio_to_against"] = {
            key: (_r(row["twinbid"][key] / row["against"][key], 3) if row["against"][key] else None)
            for key in ("twt", "weighted_flow", "makespan")
        }
    return row


# --------------------------------------------------------------------------- output


def _n(value: Any, width: int, fmt: str = "g") -> str:
    return f"{'-' if value is None else format(value, fmt):>{width}}"


def print_report(results: dict[str, Any]) -> None:
    m = results["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, {m['os']}")
    print("twinbid: virtual clock, embedded broker; baselines: non-delay dispatching of the same plant")
    print("TWT = sum (6 - priority) * max(0, completion - due); wflow = priority-weighted mean flow time")
    methods = [m for m in (*METHODS[:1], "against", *METHODS[1:]) if any(m in r for r in results["plants"])]
    for r in results["plants"]:
        print()
        print(f"{r['plant']} ({r['products']} products)")
        print(
            f"{'method':<9}{'prio':>5}{'n':>4}{'done':>5}{'flow':>10}{'lateness':>10}{'on time':>8}{'TWT':>10}"
        )
        for method in methods:
            f = r[method]
            for prio, p in f["by_priority"].items():
                print(
                    f"{method:<9}{prio:>5}{p['products']:>4}{p['completed']:>5}{_n(p['flow_mean'], 10)}"
                    f"{_n(p['lateness_mean'], 10)}{_n(p['on_time'], 8, '.0%')}{_n(p['twt'], 10)}"
                )
            print(
                f"{method:<9}{'all':>5}{f['products']:>4}{f['completed']:>5}  makespan {_n(f['makespan'], 8)}"
                f"  TWT {_n(f['twt'], 9)}  wflow {_n(f['weighted_flow'], 8)}  inversions {len(f['inversions'])}"
            )
        ratio = r["ratio_to_best"]
        print(
            f"twinbid / best baseline: TWT {_n(ratio['twt'], 0)}, weighted flow {_n(ratio['weighted_flow'], 0)}"
        )
        if "ratio_to_against" in r:
            ra = r["ratio_to_against"]
            print(
                f"this / against: TWT {_n(ra['twt'], 0)}, weighted flow {_n(ra['weighted_flow'], 0)}, makespan {_n(ra['makespan'], 0)}"
            )
        for inv in r["twinbid"]["inversions"]:
            print(
                f"  twinbid inversion: {inv['type']}: priority {inv['urgent']} flow {inv['flow']:g} > "
                f"priority {inv['less_urgent']} flow {inv['its_flow']:g}"
            )
    print(f"total wall time: {results['wall_seconds']:.0f} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--json", action="store_true", help="print one JSON object of every figure as the last line"
    )
    p.add_argument(
        "--plants", default="gen-1,gen-2,gen-3," + ",".join(SHIPPED), help="comma-separated plants"
    )
    p.add_argument("--products", type=int, default=40, help="orders of a generated plant (default 40)")
    p.add_argument(
        "--run-timeout", type=float, default=600.0, help="wall seconds before a twinbid run is abandoned"
    )
    p.add_argument("--against", help="another twinbid checkout (e.g. a git worktree of a commit) to run too")
    args = p.parse_args(argv)
    args.names = [n.strip() for n in args.plants.split(",") if n.strip()]
    if args.against and not (Path(args.against) / "scenarios" / "launcher.py").is_file():
        p.error(f"--against {args.against}: not a twinbid checkout (no scenarios/launcher.py)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    t0 = time.perf_counter()
    rows = []
    for name in args.names:
        rows.append(plant_row(name, args))
        tb = rows[-1]["twinbid"]
        print(
            f"  {name}: twinbid TWT {tb['twt']:g}, {tb['completed']}/{tb['products']} in {tb['wall_seconds']} s",
            file=sys.stderr,
            flush=True,
        )
    results = {
        "benchmark": "priorities",
        "machine": machine(),
        "settings": {
            "plants": args.names,
            "products": args.products,
            "against": args.against,
            "weights": "6 - priority",
        },
        "plants": rows,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    results["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print_report(results)
    if args.json:
        print(json.dumps(results, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
