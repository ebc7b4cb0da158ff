"""Negotiation speed on the reference workload (issue 11), through the real launcher.

20 resources and 20 capabilities; capability c is offered by the k resources (c+j) mod 20 for
j < k; 100 products start together, each running 10 steps one after another, step s of
product p needing capability (7p+3s) mod 20; zero processing and transport time; QoS 1 on a
private mosquitto with `set_tcp_nodelay true`; persistence and AAS documentation on, as in a
real run. Reports negotiated steps per second (wall), per-step negotiation latency (call for
proposal to informConfirm, wall ms) p50/p99 and messages per step, for k = 1, 5, 10, in one
process and in two; and the latency of one product negotiating alone with 10 bidders.

    python bench/bench_negotiation.py [--k 1,5,10] [--processes 1,2] [--products 100] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machineinfo import machine

from scenarios.launcher import RunOptions, run
from scenarios.loader import load_scenario_text

N_RES = 20


def reference_yaml(k: int, products: int, steps: int = 10, bidders_alone: bool = False) -> str:
    lines = [
        f"name: negotiation-k{k}",
        "namespace: bench",
        "broker: mosquitto",
        "clock: {kind: real}",
        "bidding: {reply_window: 5, offer_validity: 10, confirm_timeout: 10}",
        "transport: {default_time: 0}",
        "stop: {wall_timeout: 600}",
        "resources:",
    ]
    for r in range(N_RES):
        caps = [c for c in range(N_RES) if any((c + j) % N_RES == r for j in range(k))]
        cap_list = ", ".join(f"{{name: c{c}, duration: 0, cost_rate: {1 + (r * 7 + c) % 5}}}" for c in caps)
        lines.append(f"  - {{kind: workstation, name: r{r}, location: r{r}, capabilities: [{cap_list}]}}")
    lines.append("product_types:")
    for p in range(products):
        plan = ", ".join(f"{{capability: c{(7 * p + 3 * s) % N_RES}}}" for s in range(steps))
        lines.append(f"  - {{name: t{p}, plan: [{plan}]}}")
    lines.append("orders:")
    for p in range(products):
        lines.append(f"  - {{type: t{p}, quantity: 1, priority: {1 + p % 5}, release: 0}}")
    return "\n".join(lines) + "\n"


def one(k: int, processes: int, products: int) -> dict:
    scenario = load_scenario_text(reference_yaml(k, products), f"reference-k{k}.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(
            run(scenario, RunOptions(out=Path(tmp) / "out", processes=processes, progress=False))
        )
    k_ = result.kpis
    steps = k_["steps"]["completed"]
    span = _negotiation_span(k_)
    return {
        "k": k,
        "processes": processes,
        "products": products,
        "steps": steps,
        "steps_per_s": round(steps / span, 1) if span else None,
        "latency_p50_ms": k_["negotiation_latency_ms"]["p50"],
        "latency_p99_ms": k_["negotiation_latency_ms"]["p99"],
        "messages_per_step": k_["messages"]["per_step"],
        "wall_s": k_["wall_seconds"],
        "failed": k_["products"]["failed"],
    }


def _negotiation_span(kpis: dict) -> float | None:
    return kpis.get("active_seconds") or kpis["wall_seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", default="1,5,10")
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--products", type=int, default=100)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for procs in [int(x) for x in args.processes.split(",")]:
        for k in [int(x) for x in args.k.split(",")]:
            t0 = time.perf_counter()
            row = one(k, procs, args.products)
            row["bench_s"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    alone = one(10, 1, 1)
    print(f"machine: {machine()}")
    print(
        f"{'k':>3} {'procs':>5} {'steps':>6} {'steps/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'msg/step':>8} {'wall s':>7}"
    )
    for r in rows:
        print(
            f"{r['k']:>3} {r['processes']:>5} {r['steps']:>6} {r['steps_per_s']!s:>8} {r['latency_p50_ms']!s:>8.8}"
            f" {r['latency_p99_ms']!s:>8.8} {r['messages_per_step']!s:>8} {r['wall_s']:>7}"
        )
    print(
        f"single product alone, 10 bidders: p50 {alone['latency_p50_ms']} ms, p99 {alone['latency_p99_ms']} ms"
    )
    if args.json:
        print(json.dumps({"machine": machine(), "runs": rows, "alone": alone}))


if __name__ == "__main__":
    main()
