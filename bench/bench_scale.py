"""Swarm scale: the largest swarm that starts, negotiates and finishes here; memory per agent, start-up time.

A plant generated in code (issue 11, "scale"): N agents, of which a share are products with one
step each and the rest resources (workstations); capability c is offered by `--bidders`
resources, product p needs capability p mod C; zero processing and transport time; real-time
clock; QoS 1 on a private mosquitto with per-agent accounts and ACL (the default); persistence and
AAS documentation on. Every size runs through the real launcher (`scenarios.launcher.run`) with
`--processes` agent processes, in a child process of its own, so that its memory and its
processes are its own: the benchmark samples the RSS of the whole process tree (launcher with
registry and recorder, fork server, agent workers, mosquitto) every 0.2 s, kills the tree when a
size exceeds its time or memory limit, and stops at the first size that does not finish.

Per size: agents; whether every product completed; start-up (launch until every product has
called for proposals, i.e. every agent is connected, subscribed, registered and acting);
connected (launch until the broker holds a connection for every agent); negotiation (first to
last message); peak RSS summed over the tree, and per agent; the increment per agent between two
sizes (which leaves out the fixed cost of the processes); CPU seconds by process, and per agent.

    python bench/bench_scale.py [--sizes 500,1000,2000,5000,10000] [--budget 540] [--processes 2]
                                [--product-share 0.5] [--bidders 2] [--size-timeout 600]
                                [--max-gib 16] [--json]
    python bench/bench_scale.py --breakdown 1000 [--tracemalloc] [--json]   # where the memory goes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machineinfo import machine

GIB = 1024**3
MIB = 1024**2
SAMPLE_S = 0.2


# --- the plant -------------------------------------------------------------------------------------


def split(agents: int, product_share: float, bidders: int) -> tuple[int, int, int]:
    """(resources, products, capabilities) of a swarm of ``agents``."""
    products = max(1, min(agents - bidders, round(agents * product_share)))
    resources = agents - products
    capabilities = max(1, resources // bidders)
    return resources, products, capabilities


def scale_yaml(agents: int, product_share: float = 0.5, bidders: int = 2, wall_timeout: float = 600) -> str:
    resources, products, caps = split(agents, product_share, bidders)
    lines = [
        f"name: scale-{agents}",
        "namespace: scale",
        "broker: mosquitto",
        "clock: {kind: real}",
        # generous windows: at start-up thousands of agents share two cores
        "bidding: {reply_window: 30, offer_validity: 60, confirm_timeout: 60, backoff: 5}",
        "transport: {default_time: 0}",
        f"stop: {{wall_timeout: {wall_timeout:g}}}",
        "resources:",
    ]
    for r in range(resources):
        c = r % caps
        lines.append(
            f"  - {{kind: workstation, name: r{r}, location: r{r}, "
            f"capabilities: [{{name: c{c}, duration: 0, cost_rate: {1 + r % 5}}}]}}"
        )
    lines.append("product_types:")
    for c in range(caps):
        lines.append(f"  - {{name: t{c}, plan: [{{capability: c{c}}}]}}")
    lines.append("orders:")
    for c in range(caps):
        quantity = len(range(c, products, caps))
        if quantity:
            lines.append(f"  - {{type: t{c}, quantity: {quantity}, priority: {1 + c % 5}, release: 0}}")
    return "\n".join(lines) + "\n"


# --- one size, in a child process --------------------------------------------------------------------


def raise_nofile() -> tuple[int, int]:
    """Soft limit of open files up to the hard limit (one socket per agent on both ends); inherited by
    mosquitto, the fork server and the agent workers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def one_size(agents: int, args: argparse.Namespace) -> dict[str, Any]:
    from scenarios.launcher import RunOptions, run
    from scenarios.loader import load_scenario_text

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    nofile = raise_nofile()
    t0 = time.time()
    scenario = load_scenario_text(
        scale_yaml(agents, args.product_share, args.bidders, args.size_timeout), f"scale-{agents}.yaml"
    )
    resources, products, caps = split(agents, args.product_share, args.bidders)
    with tempfile.TemporaryDirectory(prefix="twinbid-scale-", ignore_cleanup_errors=True) as tmp:
        out = Path(tmp) / "out"
        launched = time.time()
        result = asyncio.run(
            run(scenario, RunOptions(out=out, processes=args.processes, progress=False, broker="mosquitto"))
        )
        first_cfp, first_msg, last_msg = _message_times(out / "run.db")
    k = result.kpis
    started_ms = max(first_cfp.values()) if len(first_cfp) == products else None
    return {
        "agents": agents,
        "resources": resources,
        "products": products,
        "capabilities": caps,
        "processes": args.processes,
        "completed": k["products"]["completed"],
        "failed": k["products"]["failed"],
        "ok": result.ok,
        "timed_out": result.timed_out,
        "launched": launched,
        "scenario_s": round(launched - t0, 2),
        "startup_s": round(started_ms / 1000 - launched, 2) if started_ms else None,
        "negotiation_s": round((last_msg - first_msg) / 1000, 2) if first_msg else None,
        "run_s": k["wall_seconds"],
        "steps_per_s": round(k["steps"]["completed"] / ((last_msg - first_msg) / 1000), 1)
        if first_msg and last_msg > first_msg
        else None,
        "messages": k["messages"]["total"],
        "latency_p50_ms": k["negotiation_latency_ms"]["p50"],
        "latency_p99_ms": k["negotiation_latency_ms"]["p99"],
        "nofile": list(nofile),
        "notices": result.notices,
    }


def _message_times(db: Path) -> tuple[dict[str, int], int | None, int | None]:
    """Each product's first call for proposal (wall ms), the first and the last message."""
    con = sqlite3.connect(db)
    try:
        first_cfp = dict(
            con.execute(
                "SELECT agent, MIN(created_wall_ms) FROM tb_outbox WHERE type = 'callForProposal' GROUP BY agent"
            ).fetchall()
        )
        first, last = con.execute(
            "SELECT MIN(created_wall_ms), MAX(created_wall_ms) FROM tb_outbox"
        ).fetchone()
    finally:
        con.close()
    return first_cfp, first, last


# --- where the memory goes: one process, component by component ------------------------------------


async def breakdown(n: int, trace: bool) -> dict[str, Any]:
    """Memory per agent by component, in one process (no accounts): ``n`` bare MQTT connections,
    the AAS objects of ``n`` resources and of ``n`` products (basyx), then ``n`` resource agents and
    ``n`` product agents started as the launcher starts them, and the products negotiated to the
    end. RSS deltas of this process and of mosquitto; with ``trace``, Python heap (tracemalloc)
    deltas by top-level package instead (RSS then includes tracemalloc's own bookkeeping)."""
    import gc
    import tracemalloc

    import psutil

    from agents.persistence import open_database
    from agents.persistence.database import sqlite_url
    from agents.product.agent import build_shell
    from agents.resource.agent import resource_objects
    from agents.runtime.node import Node, NodeConfig
    from protocol.broker import start_broker
    from protocol.tokens import RunTokens, new_secret
    from protocol.transport import MqttTransport
    from registry.service import RegistryServer
    from scenarios import assembly
    from scenarios.launcher import Plant, _clock, _start_products, _start_resources
    from scenarios.loader import load_scenario_text

    logging.basicConfig(level=logging.WARNING)
    raise_nofile()
    scenario = load_scenario_text(scale_yaml(2 * n, 0.5, 2), "breakdown.yaml")
    me = psutil.Process()
    if trace:
        tracemalloc.start(1)
    marks: list[tuple[str, int, int, int, Any]] = []
    broker_proc: list[Any] = []

    def mark(label: str) -> None:
        gc.collect()
        snap = tracemalloc.take_snapshot() if trace else None
        broker_rss = broker_proc[0].memory_info().rss if broker_proc else 0
        marks.append((label, me.memory_info().rss, broker_rss, len(asyncio.all_tasks()), snap))

    result: dict[str, Any] = {"n": n, "trace": trace, "steps": []}
    with tempfile.TemporaryDirectory(prefix="twinbid-scale-", ignore_cleanup_errors=True) as tmp:
        out = Path(tmp)
        broker = await asyncio.to_thread(lambda: start_broker("mosquitto", out))
        broker_proc.append(psutil.Process(broker.process.pid))
        secret = new_secret()  # the run's token secret: the node registers its agents with it
        registry = RegistryServer(
            sqlite_url(out / "registry.db"), tokens=RunTokens(secret, scenario.namespace)
        )
        db_url = sqlite_url(out / "run.db")
        try:
            url = await registry.start()
            plant = Plant(scenario, out, broker.address, url, db_url, "real", None, None, 0)
            clock = _clock(plant)
            config = NodeConfig(scenario.namespace, broker.address, url, http_secret=secret)
            node = Node(config, clock, open_database(db_url))
            await node.start()
            await clock.start()
            mark("node started")

            async def noop(*_: Any) -> None:
                return None

            sem = asyncio.Semaphore(32)
            transports = [MqttTransport(f"bare-{i}", broker.address, noop) for i in range(n)]

            async def connect(t: MqttTransport) -> None:
                async with sem:
                    await t.connect()
                    await t.subscribe(f"i40/{scenario.namespace}/to/{t.client_id}/+")

            await asyncio.gather(*(connect(t) for t in transports))
            mark("bare MQTT connections")
            await asyncio.gather(*(t.close(timeout=1) for t in transports))
            del transports
            mark("(closed)")
            log_dir = out / "aas-assets"
            log_dir.mkdir()
            res_objects = [
                resource_objects(
                    assembly.make_asset(scenario, r, log_dir, 0),
                    scenario.namespace,
                    r.kind,
                    assembly.cost_rates(r),
                )
                for r in scenario.resources
            ]
            mark("resource AAS objects (basyx)")
            prod_objects = [
                build_shell(assembly.product_order(scenario, p), scenario.namespace)
                for p in scenario.product_instances()
            ]
            mark("product AAS objects (basyx)")
            del res_objects, prod_objects
            mark("(dropped)")
            await _start_resources(node, plant, 0, 1)
            mark("resource agents")
            finished: set[str] = set()
            node.finished_hooks.append(lambda a: finished.add(a.name))
            await _start_products(node, plant, 0, 1)
            mark("product agents")
            deadline = time.monotonic() + 600
            while len(finished) < n and time.monotonic() < deadline:  # noqa: ASYNC110 - a plain poll
                await asyncio.sleep(0.2)
            await node.journal.commit()
            mark("products finished")
            result["finished"] = len(finished)
            await node.stop()
            await clock.stop()
        finally:
            await registry.stop()
            await asyncio.to_thread(broker.stop)
    for (label, rss, brss, tasks, snap), (_, rss0, brss0, tasks0, snap0) in zip(
        marks[1:], marks[:-1], strict=True
    ):
        step = {
            "step": label,
            "rss_kib_per_agent": round((rss - rss0) / 1024 / n, 1),
            "broker_kib_per_agent": round((brss - brss0) / 1024 / n, 2),
            "tasks_per_agent": round((tasks - tasks0) / n, 2),
        }
        if snap is not None:
            by_pkg: dict[str, int] = {}
            for stat in snap.compare_to(snap0, "filename"):
                by_pkg[_package(stat.traceback[0].filename)] = (
                    by_pkg.get(_package(stat.traceback[0].filename), 0) + stat.size_diff
                )
            step["heap_kib_per_agent"] = round(sum(by_pkg.values()) / 1024 / n, 1)
            step["heap_kib_per_agent_by_package"] = {
                k: round(v / 1024 / n, 1)
                for k, v in sorted(by_pkg.items(), key=lambda kv: -kv[1])
                if abs(v) / n >= 512
            }
        result["steps"].append(step)
    return result


def _package(filename: str) -> str:
    parts = Path(filename).parts
    for anchor in ("site-packages", "python3.11", "main"):
        if anchor in parts:
            rest = parts[parts.index(anchor) + 1 :]
            if rest:
                name = rest[0]
                return name[:-3] if name.endswith(".py") else name
    return Path(filename).name


# --- the parent: run sizes, sample memory, enforce limits ------------------------------------------------


class Sampler(threading.Thread):
    """Every SAMPLE_S: RSS of every process in the tree under ``root`` (by role), and the broker's open
    files (its client connections above its idle count)."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.root = psutil.Process(root)
        self.stop_event = threading.Event()
        self.samples: list[tuple[float, int, dict[str, int], int | None]] = []  # (t, total, by role, fds)
        self.seen: dict[int, Any] = {}  # pid -> Process (create time checked by psutil on kill)
        self.peak_total = 0
        self.peak_roles: dict[str, int] = {}
        self.cpu: dict[int, tuple[str, float]] = {}  # pid -> (role, CPU seconds so far), last sample

    def role(self, p: Any) -> str:
        """launcher (with the recorder), registry (its own process), mosquitto, forkserver (the
        preloaded parent of the agent processes), workers (agent processes, forked from it), other
        (multiprocessing's resource tracker)."""
        if p.pid == self.root.pid:
            return "launcher"
        try:  # not cached: a fresh child shows its parent's command line until it has exec'd
            if "mosquitto" in p.name():
                return "mosquitto"
            if p.ppid() != self.root.pid:
                return "workers"
            cmdline = " ".join(p.cmdline())
            if "registry.process" in cmdline:
                return "registry"
            return "forkserver" if "forkserver" in cmdline else "other"
        except self.psutil.Error:
            return "other"

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(SAMPLE_S)

    def sample(self) -> None:
        ps = self.psutil
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except ps.Error:
            return
        total, roles, fds = 0, {}, None
        for p in procs:
            self.seen.setdefault(p.pid, p)
            try:
                rss = p.memory_info().rss
                role = self.role(p)
                if role == "mosquitto":
                    fds = p.num_fds()
                times = p.cpu_times()
                self.cpu[p.pid] = (role, times.user + times.system)
            except ps.Error:
                continue
            total += rss
            roles[role] = roles.get(role, 0) + rss
        self.samples.append((time.time(), total, roles, fds))
        if total > self.peak_total:
            self.peak_total, self.peak_roles = total, roles

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds (user + system) each role used, as last sampled (a process that ended
        keeps its last figure)."""
        out: dict[str, float] = {}
        for role, seconds in self.cpu.values():
            out[role] = out.get(role, 0.0) + seconds
        return {k: round(v, 1) for k, v in sorted(out.items())}

    def connected_at(self, agents: int) -> float | None:
        """When the broker first held a connection for every agent (fds above its fewest)."""
        fds = [f for *_, f in self.samples if f is not None]
        if not fds:
            return None
        idle = min(fds)
        for t, _, _, f in self.samples:
            if f is not None and f - idle >= agents:
                return t
        return None

    def kill_all(self, grace: float = 10.0) -> int:
        """SIGKILL every process seen in the tree that is still alive after ``grace`` seconds (the
        fork server and the resource tracker end shortly after the launcher; the broker runs in a
        session of its own, so a process-group kill would miss it)."""
        others = [p for pid, p in self.seen.items() if pid != self.root.pid]
        _, alive = self.psutil.wait_procs(others, timeout=grace)
        killed = 0
        for p in alive:
            try:
                if p.is_running():
                    p.kill()
                    killed += 1
            except self.psutil.Error:
                pass
        return killed


def measure(agents: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", str(agents), "--json"]
    cmd += ["--processes", str(args.processes), "--product-share", str(args.product_share)]
    cmd += ["--bidders", str(args.bidders), "--size-timeout", str(args.size_timeout)]
    t0 = time.time()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    sampler = Sampler(child.pid)
    sampler.start()
    limit = args.max_gib * GIB
    deadline = time.monotonic() + args.size_timeout + 120  # the run's own timeout, then write-out
    reason = None
    out_chunks: list[bytes] = []
    err_chunks: list[bytes] = []
    readers = [
        threading.Thread(target=lambda: out_chunks.append(child.stdout.read()), daemon=True),
        threading.Thread(target=lambda: err_chunks.append(child.stderr.read()), daemon=True),
    ]
    for r in readers:
        r.start()
    while child.poll() is None:
        if sampler.peak_total > limit:
            reason = f"peak RSS above --max-gib {args.max_gib:g}"
        elif time.monotonic() > deadline:
            reason = f"no end within {args.size_timeout + 120:g} s"
        if reason:
            os.killpg(child.pid, signal.SIGINT)  # let the launcher stop its broker and workers
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                pass
            break
        time.sleep(0.2)
    sampler.stop_event.set()
    sampler.join()
    if child.poll() is None:
        child.kill()
    child.wait()
    leftovers = sampler.kill_all()
    for r in readers:
        r.join(5)
    stdout = b"".join(out_chunks).decode(errors="replace").strip().splitlines()
    row: dict[str, Any] = {"agents": agents}
    if stdout:
        try:
            row = json.loads(stdout[-1])
        except json.JSONDecodeError:
            pass
    stderr = b"".join(err_chunks).decode(errors="replace")
    log_path = Path(tempfile.gettempdir()) / f"twinbid-bench-scale-{agents}.log"
    log_path.write_text(stderr)
    row["log"] = str(log_path)
    if "ok" not in row:
        row["ok"] = False
        row["error"] = reason or f"exit {child.returncode}: {_last_error(stderr)}"
    elif reason:
        row["ok"] = False
        row["error"] = reason
    connected = sampler.connected_at(agents)
    launched = row.pop("launched", t0)
    row["connected_s"] = round(connected - launched, 2) if connected else None
    row["peak_rss_mib"] = round(sampler.peak_total / MIB, 1)
    row["peak_rss_by_role_mib"] = {k: round(v / MIB, 1) for k, v in sorted(sampler.peak_roles.items())}
    row["mib_per_agent"] = round(sampler.peak_total / MIB / agents, 3)
    row["cpu_s_by_role"] = sampler.cpu_by_role()
    row["cpu_ms_per_agent"] = round(sum(row["cpu_s_by_role"].values()) * 1000 / agents, 1)
    row["bench_s"] = round(time.time() - t0, 1)
    row["leftover_processes_killed"] = leftovers
    return row


def _last_error(stderr: str) -> str:
    """The last traceback of a log, in short: our innermost frames and the exception."""
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
    if not starts:
        return " | ".join(lines[-3:])
    tb = lines[starts[-1] :]
    ours = [
        line.strip().replace('File "', "").replace('", line ', ":")
        for line in tb
        if line.strip().startswith('File "') and "site-packages" not in line and "/lib/python3" not in line
    ]
    return " <- ".join(reversed(ours[-3:])) + " | " + tb[-1].strip()


def table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'agents':>7} {'res':>6} {'prod':>6} {'done':>11} {'connect s':>9} {'start s':>8} {'negot s':>8}"
        f" {'steps/s':>8} {'peak MiB':>9} {'MiB/agent':>9} {'Δ MiB/agent':>11}"
    )
    print(head)
    for r in rows:
        done = f"{r.get('completed', '?')}/{r.get('products', '?')}"
        delta = r.get("delta_mib_per_agent")
        print(
            f"{r['agents']:>7} {r.get('resources', ''):>6} {r.get('products', ''):>6} {done:>11}"
            f" {r.get('connected_s')!s:>9} {r.get('startup_s')!s:>8} {r.get('negotiation_s')!s:>8}"
            f" {r.get('steps_per_s')!s:>8} {r['peak_rss_mib']:>9} {r['mib_per_agent']:>9}"
            f" {'' if delta is None else delta:>11}"
        )
        if r.get("error"):
            print(f"        stopped: {r['error']}")
    for r in rows:
        print(f"  {r['agents']:>6} agents, peak RSS by process: {r['peak_rss_by_role_mib']}")
        if r.get("cpu_s_by_role"):
            print(
                f"  {r['agents']:>6} agents, CPU s by process: {r['cpu_s_by_role']}"
                f" ({r['cpu_ms_per_agent']} ms per agent, start to end of the run)"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="500,1000,2000,5000,10000", help="swarm sizes (agents), ascending")
    ap.add_argument("--processes", type=int, default=2, help="agent processes per run")
    ap.add_argument("--product-share", type=float, default=0.5, help="products / agents (one step each)")
    ap.add_argument("--bidders", type=int, default=2, help="resources offering each capability")
    ap.add_argument("--size-timeout", type=float, default=600, help="wall seconds a size may run")
    ap.add_argument("--max-gib", type=float, default=16.0, help="stop a size whose tree exceeds this RSS")
    ap.add_argument(
        "--budget",
        type=float,
        default=540,
        help="skip sizes that would end after this many seconds (0: none)",
    )
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--breakdown",
        type=int,
        metavar="N",
        help="instead: memory per agent by component, N of each, one process",
    )
    ap.add_argument("--tracemalloc", action="store_true", help="with --breakdown: Python heap by package")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size here
    args = ap.parse_args()
    if args.breakdown is not None:
        figures = asyncio.run(breakdown(args.breakdown, args.tracemalloc))
        info = machine()
        print(f"machine: {info}")
        print(
            f"memory per agent, {args.breakdown} of each, one process ({figures.get('finished')} products finished)"
        )
        print(f"{'step':<32} {'RSS KiB':>9} {'broker KiB':>10} {'tasks':>6} {'heap KiB':>9}")
        for st in figures["steps"]:
            print(
                f"{st['step']:<32} {st['rss_kib_per_agent']:>9} {st['broker_kib_per_agent']:>10}"
                f" {st['tasks_per_agent']:>6} {st.get('heap_kib_per_agent', ''):>9}"
            )
            if st.get("heap_kib_per_agent_by_package"):
                print(f"{'':<34}{st['heap_kib_per_agent_by_package']}")
        if args.json:
            print(json.dumps({"machine": info, "breakdown": figures}))
        return
    if args.one is not None:
        row = one_size(args.one, args)
        print(json.dumps(row))
        return
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    skipped: list[int] = []
    for agents in [int(x) for x in args.sizes.split(",")]:
        if rows and args.budget:
            # the time a size takes grows about linearly with it: skip what would not fit the budget
            left = args.budget - (time.monotonic() - started)
            if rows[-1]["bench_s"] * agents / rows[-1]["agents"] > left:
                skipped.append(agents)
                continue
        row = measure(agents, args)
        if rows and row.get("ok") and rows[-1].get("ok"):
            prev = rows[-1]
            row["delta_mib_per_agent"] = round(
                (row["peak_rss_mib"] - prev["peak_rss_mib"]) / (agents - prev["agents"]), 3
            )
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        if not row.get("ok"):
            break
    largest = max((r["agents"] for r in rows if r.get("ok")), default=0)
    info = machine()
    print(f"machine: {info}")
    table(rows)
    print(f"largest swarm that finished: {largest} agents (target: 10,000 within 4 GiB)")
    if skipped:
        print(f"not run (over --budget {args.budget:g} s): {', '.join(map(str, skipped))} agents")
    if args.json:
        print(json.dumps({"machine": info, "largest_ok": largest, "skipped": skipped, "runs": rows}))


if __name__ == "__main__":
    main()
