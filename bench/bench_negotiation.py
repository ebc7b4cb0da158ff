"""Negotiation speed on the reference workload (issue 11), through the real launcher.

20 resources and 20 capabilities; capability c is offered by the k resources (c+j) mod 20 for
j < k; 100 products start together, each running 10 steps one after another, step s of
product p needing capability (7p+3s) mod 20; zero processing and transport time; QoS 1 on a
private mosquitto with `set_tcp_nodelay true`; persistence and AAS documentation on, as in a
real run. Reports negotiated steps per second (wall), per-step negotiation latency (call for
proposal to informConfirm, wall ms) p50/p99 and messages per step, for k = 1, 5, 10, in one
process and in two; and the latency of one product negotiating alone with 10 bidders. Beside
them, the CPU the negotiation cost the whole machine: every process of the run (agents, fork
server and workers, mosquitto, registry, recorder) sampled with psutil, over the active window
(first to last message), per step and by role — a figure that depends far less on what else the
machine was doing than steps per second do.

Each configuration runs ``--repeat`` times (default 3) and every figure is the median. Beside it,
alternately with it, the same workload runs as a bare-bones contract net directly on gmqtt (no
persistence, no AAS, no state machine; ``bare_contract_net.py``) through its own private
mosquitto: the floor issue 11 compares against, measured on this machine in this session, and
twinbid's steps/s as a ratio to it (``--no-bare`` leaves it out).

``--against PATH`` compares this checkout with another one (a ``git worktree`` of the commit
before a change, say) instead: each configuration runs ``--repeat`` times in each, alternately
(this, other, other, this, ...), every run in a fresh Python whose imports and working directory
are that checkout's; it prints the medians of both and their ratios (this / other). The machine's
speed drifts by 10-25 % between runs here, so a change of a few per cent shows only this way.

    python bench/bench_negotiation.py [--k 1,5,10] [--processes 1,2] [--products 100] [--repeat 3]
                                      [--no-bare] [--against PATH] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import psutil
from bare_contract_net import run_bare
from machineinfo import machine
from reference_workload import ALONE, N_RES, STEPS, capability, cost_rate, offered_by

from protocol.mosquitto import MosquittoProcess, find_mosquitto
from scenarios.launcher import RunOptions, run
from scenarios.loader import load_scenario_text


def reference_yaml(k: int, products: int, steps: int = STEPS, bidders_alone: bool = False) -> str:
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
        cap_list = ", ".join(
            f"{{name: c{c}, duration: 0, cost_rate: {cost_rate(r, c)}}}" for c in offered_by(r, k)
        )
        lines.append(f"  - {{kind: workstation, name: r{r}, location: r{r}, capabilities: [{cap_list}]}}")
    lines.append("product_types:")
    for p in range(products):
        plan = ", ".join(f"{{capability: c{capability(p, s)}}}" for s in range(steps))
        lines.append(f"  - {{name: t{p}, plan: [{plan}]}}")
    lines.append("orders:")
    for p in range(products):
        lines.append(f"  - {{type: t{p}, quantity: 1, priority: {1 + p % 5}, release: 0}}")
    return "\n".join(lines) + "\n"


class CpuSampler:
    """CPU time of this process and every descendant (agents, fork server, workers, mosquitto,
    registry, recorder), sampled every 0.1 s, so the CPU a negotiation costs the whole machine can
    be read off for the active window: the figure that does not depend on how loaded the machine
    was. A process that exits keeps its last sample."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.samples: list[tuple[float, dict[str, float]]] = []  # (epoch s, CPU s by role)
        self._last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._me = psutil.Process()
        self._procs: dict[int, psutil.Process] = {}
        self._next_scan = 0.0
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        # Finding the descendants reads every process's stat file on the machine: done once a
        # second, not per sample, so the sampler (a thread of the launcher's process) does not
        # take the CPU and the GIL it is measuring.
        now = time.monotonic()
        if now >= self._next_scan:
            self._next_scan = now + 1.0
            for proc in [self._me, *self._me.children(recursive=True)]:
                self._procs.setdefault(proc.pid, proc)
        for pid, proc in list(self._procs.items()):
            try:
                times = proc.cpu_times()
                cpu = times.user + times.system
                role = self._last[pid][0] if pid in self._last else _role(proc, self._me)
            except psutil.Error:
                del self._procs[pid]
                continue
            self._last[pid] = (role, cpu)
        by_role: dict[str, float] = {}
        for role, cpu in self._last.values():
            by_role[role] = by_role.get(role, 0.0) + cpu
        self.samples.append((time.time(), by_role))

    def between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds by role spent from ``start`` to ``end`` (epoch s; nearest samples)."""
        if not self.samples:
            return {}
        first = min(self.samples, key=lambda s: abs(s[0] - start))[1]
        last = min(self.samples, key=lambda s: abs(s[0] - end))[1]
        return {role: round(last.get(role, 0.0) - first.get(role, 0.0), 3) for role in sorted(last)}


def _role(proc: psutil.Process, me: psutil.Process) -> str:
    if proc.pid == me.pid:
        return "launcher (agents, journal)"
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        cmd = ""
    if "mosquitto" in proc.name():
        return "mosquitto"
    if "recorder_process" in cmd:
        return "recorder"
    if "registry.process" in cmd:
        return "registry"
    return "workers (agents, journal)"


def one(k: int, processes: int, products: int) -> dict:
    scenario = load_scenario_text(reference_yaml(k, products), f"reference-k{k}.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        with CpuSampler() as cpu:
            result = asyncio.run(run(scenario, RunOptions(out=out, processes=processes, progress=False)))
        with sqlite3.connect(out / "run.db") as db:
            first_ms, last_ms = db.execute(
                "SELECT MIN(created_wall_ms), MAX(created_wall_ms) FROM tb_outbox"
            ).fetchone()
    k_ = result.kpis
    steps = k_["steps"]["completed"]
    span = _negotiation_span(k_)
    by_role = cpu.between(first_ms / 1000, last_ms / 1000) if first_ms else {}
    total = sum(by_role.values())
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
        # CPU of every process of the run, over the active window (first to last message)
        "cpu_ms_per_step": round(1000 * total / steps, 2) if steps and by_role else None,
        "cpu_cores_busy": round(total / span, 2) if span and by_role else None,
        "cpu_s_by_role": by_role,
    }


def _negotiation_span(kpis: dict) -> float | None:
    return kpis.get("active_seconds") or kpis["wall_seconds"]


def bare(k: int, processes: int, products: int) -> dict:
    """The bare-bones gmqtt contract net on the same workload, through its own private mosquitto."""
    with tempfile.TemporaryDirectory() as tmp, MosquittoProcess(Path(tmp), persistence=False) as mosq:
        return run_bare(mosq.port, k, processes, products)


_MEDIAN_OF = (
    "steps_per_s",
    "latency_p50_ms",
    "latency_p99_ms",
    "messages_per_step",
    "wall_s",
    "cpu_ms_per_step",
    "cpu_cores_busy",
)


def median_row(runs: list[dict]) -> dict:
    """One row of figures: the median of each over the repeats (the runs themselves kept beside)."""
    row = dict(runs[len(runs) // 2])
    for key in _MEDIAN_OF:
        values = [r[key] for r in runs if r.get(key) is not None]
        row[key] = round(statistics.median(values), 2) if values else None
    roles = sorted({role for r in runs for role in r["cpu_s_by_role"]})
    row["cpu_s_by_role"] = {
        role: round(statistics.median(r["cpu_s_by_role"].get(role, 0.0) for r in runs), 3) for role in roles
    }
    row["failed"] = sum(r["failed"] for r in runs)
    if len(runs) > 1:
        row["repeats"] = [{key: r.get(key) for key in (*_MEDIAN_OF, "cpu_s_by_role")} for r in runs]
    return row


def measure(k: int, procs: int, products: int, repeat: int, with_bare: bool) -> dict:
    """twinbid and (unless off) the bare net, alternately, ``repeat`` times each; medians."""
    t0 = time.perf_counter()
    runs, bares = [], []
    for _ in range(repeat):
        runs.append(one(k, procs, products))
        if with_bare:
            bares.append(bare(k, procs, products))
    row = median_row(runs)
    if bares:
        row["bare"] = {
            key: round(statistics.median(b[key] for b in bares), 2)
            for key in ("steps_per_s", "latency_p50_ms", "latency_p99_ms", "messages_per_step")
        }
        if row["steps_per_s"]:
            row["ratio_to_bare"] = round(row["steps_per_s"] / row["bare"]["steps_per_s"], 3)
    row["bench_s"] = round(time.perf_counter() - t0, 1)
    return row


HERE = Path(__file__).resolve().parents[1]  # this checkout
_COMPARED = ("steps_per_s", "cpu_ms_per_step", "latency_p50_ms", "latency_p99_ms")


def one_in(tree: Path, k: int, processes: int, products: int, timeout: float = 1800) -> dict:
    """`one` run by another checkout's code, in a fresh Python with its imports and working directory."""
    bench = tree / "bench" / "bench_negotiation.py"
    if not bench.is_file():
        raise SystemExit(f"--against {tree}: no bench/bench_negotiation.py there (a twinbid checkout?)")
    code = (
        "import json, sys\nsys.path.insert(0, 'bench')\nimport bench_negotiation as b\n"
        f"print('\\nRESULT ' + json.dumps(b.one({k}, {processes}, {products})))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True, timeout=timeout
    )
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(
        f"the run in {tree} ended without figures (exit {out.returncode}): {out.stderr[-2000:]}"
    )


def compare(k: int, processes: int, products: int, repeat: int, against: Path) -> dict:
    """This checkout and ``against``, ``repeat`` runs each, alternately; medians and their ratios."""
    t0 = time.perf_counter()
    trees = [("this", HERE), ("against", against)]
    runs: dict[str, list[dict]] = {"this": [], "against": []}
    for i in range(repeat):
        for name, tree in trees if i % 2 == 0 else trees[::-1]:
            runs[name].append(one_in(tree, k, processes, products))
    this, other = median_row(runs["this"]), median_row(runs["against"])
    ratio = {
        key: round(this[key] / other[key], 3) if this.get(key) and other.get(key) else None
        for key in _COMPARED
    }
    return {
        "k": k,
        "processes": processes,
        "products": products,
        "this": this,
        "against": other,
        "ratio": ratio,
        "bench_s": round(time.perf_counter() - t0, 1),
    }


def _grid(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    """(k, processes, products) of every configuration asked for, processes outermost."""
    return [
        (k, p, args.products)
        for p in map(int, args.processes.split(","))
        for k in map(int, args.k.split(","))
    ]


def main_compare(args: argparse.Namespace) -> None:
    against = Path(args.against).resolve()
    rows = []
    for k, p, n in [*_grid(args), ALONE]:
        rows.append(compare(k, p, n, args.repeat, against))
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"machine: {machine()}")
    print(
        f"this: {HERE}\nagainst: {against}\nmedians of {args.repeat} alternating run(s) each; ratio = this / against"
    )
    print(
        f"{'k':>3} {'procs':>5} {'prods':>5} | {'steps/s':>8} {'against':>8} {'ratio':>6}"
        f" | {'CPU ms/step':>11} {'against':>8} {'ratio':>6} | {'p50 ms':>7} {'against':>8} {'ratio':>6}"
    )
    for r in rows:
        a, b, q = r["this"], r["against"], r["ratio"]
        print(
            f"{r['k']:>3} {r['processes']:>5} {r['products']:>5} | {a['steps_per_s']!s:>8} {b['steps_per_s']!s:>8}"
            f" {q['steps_per_s']!s:>6} | {a['cpu_ms_per_step']!s:>11} {b['cpu_ms_per_step']!s:>8}"
            f" {q['cpu_ms_per_step']!s:>6} | {a['latency_p50_ms']!s:>7} {b['latency_p50_ms']!s:>8}"
            f" {q['latency_p50_ms']!s:>6}"
        )
    if any(r[side]["failed"] for r in rows for side in ("this", "against")):
        print("some products failed: the figures above are not comparable", file=sys.stderr)
    if args.json:
        print(
            json.dumps({"machine": machine(), "repeat": args.repeat, "against": str(against), "runs": rows})
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", default="1,5,10")
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--products", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each configuration; figures are medians")
    ap.add_argument("--no-bare", action="store_true", help="leave out the bare-bones gmqtt contract net")
    ap.add_argument(
        "--against",
        metavar="PATH",
        help="another twinbid checkout: alternate runs of both, medians and ratios",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.against:
        return main_compare(args)
    with_bare = not args.no_bare and find_mosquitto() is not None
    rows = []
    for k, procs, products in _grid(args):
        row = measure(k, procs, products, args.repeat, with_bare)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    alone = measure(*ALONE, args.repeat, with_bare)
    print(f"machine: {machine()}")
    print(
        f"medians of {args.repeat} run(s) each; bare = the bare-bones gmqtt contract net, same workload and broker"
    )
    print(
        f"{'k':>3} {'procs':>5} {'steps':>6} {'steps/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'msg/step':>8}"
        f" {'wall s':>7} {'CPU ms/step':>11} {'cores':>5} {'bare st/s':>9} {'bare p50':>8} {'ratio':>6}"
    )
    for r in rows:
        b = r.get("bare", {})
        print(
            f"{r['k']:>3} {r['processes']:>5} {r['steps']:>6} {r['steps_per_s']!s:>8} {r['latency_p50_ms']!s:>8.8}"
            f" {r['latency_p99_ms']!s:>8.8} {r['messages_per_step']!s:>8} {r['wall_s']!s:>7}"
            f" {r['cpu_ms_per_step']!s:>11} {r['cpu_cores_busy']!s:>5} {b.get('steps_per_s', '-')!s:>9}"
            f" {b.get('latency_p50_ms', '-')!s:>8} {r.get('ratio_to_bare', '-')!s:>6}"
        )
    for r in rows:
        roles = ", ".join(f"{role} {sec:g}" for role, sec in r["cpu_s_by_role"].items())
        print(f"  k={r['k']} procs={r['processes']}: CPU s while negotiating: {roles}")
    bare_alone = alone.get("bare", {})
    print(
        f"single product alone, 10 bidders: p50 {alone['latency_p50_ms']} ms, p99 {alone['latency_p99_ms']} ms"
        f" (bare: p50 {bare_alone.get('latency_p50_ms', '-')} ms, p99 {bare_alone.get('latency_p99_ms', '-')} ms)"
    )
    if any(r["failed"] for r in [*rows, alone]):
        print("some products failed: the figures above are not comparable", file=sys.stderr)
    if args.json:
        print(json.dumps({"machine": machine(), "repeat": args.repeat, "runs": rows, "alone": alone}))


if __name__ == "__main__":
    main()
