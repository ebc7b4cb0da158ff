"""`twinbid run`: start a plant from a scenario, run it to the end, leave a complete record.

The launcher starts the broker (unless the scenario or the command line names
one), the registry, the recorder and every agent — in this process, or spread
over worker processes — shows progress, injects the scenario's faults, and at the
end writes the output folder: `run.db`, `messages.jsonl`, `aas/*.aasx`,
`gantt.png` and `kpis.json`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import select

from agents.aas.io import write_aasx
from agents.ordertaking.auth import VendorFileError
from agents.persistence import open_database, runs
from agents.persistence.database import (
    Database,
    build_analysis_indexes,
    checkpoint,
    drop_analysis_indexes,
    sqlite_url,
)
from agents.persistence.runs import RecordLock
from agents.product.agent import start_product
from agents.resource.agent import start_resource
from agents.runtime.agent import Agent
from agents.runtime.node import Node, NodeConfig
from protocol.broker import (
    SLOW_ROUND_TRIP,
    BrokerStartError,
    BrokerUnreachable,
    RunningBroker,
    probe_broker,
    start_broker,
)
from protocol.credentials import Credentials, save_http_secret
from protocol.mosquitto import MosquittoTLS, free_port
from protocol.recorder_process import RecorderProcess
from protocol.signing import public_key_text, run_signing_secret, write_keys
from protocol.tokens import new_secret
from protocol.transport import BrokerAddress
from registry.process import RegistryProcess
from scenarios import assembly, gantt, kpis, log_completeness
from scenarios.chaos import Chaos
from scenarios.intake import OrderIntake
from scenarios.loader import ScenarioError, load_scenario
from scenarios.notifications import ScenarioNotifier
from scenarios.schema import Scenario
from scenarios.supervisor import PROCESSES_FILE, Supervisor, refuse_if_alive
from scenarios.workers import Recovery, WorkerPool
from shopfloor.barrier import BarrierHost, SplitVirtualClock, TimeBarrier
from shopfloor.clock import Clock, make_clock

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    out: Path
    broker: str | None = None
    db: str | None = None
    processes: int = 1
    seed: int | None = None
    progress: bool = True
    resume: bool = False  # continue the run recorded in `out` (same database): agents reload their state
    chaos: Chaos | None = None  # kill agent processes at random (needs processes > 1)
    orders_host: str = "127.0.0.1"  # the order-taking service (started when the scenario lists vendors)
    orders_port: int = 0
    on_orders_url: Callable[[str], None] | None = None


@dataclass
class RunResult:
    out: Path
    kpis: dict[str, Any]
    timed_out: bool = False
    interrupted: bool = False
    notices: list[str] = field(default_factory=list)
    recoveries: list[Recovery] = field(default_factory=list)
    chaos_log: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        p = self.kpis["products"]
        return not self.timed_out and not self.interrupted and p["completed"] == p["total"]


@dataclass
class Plant:
    """What every process of a run needs to build its share of the plant."""

    scenario: Scenario
    out: Path
    broker: BrokerAddress
    registry_url: str
    db_url: str
    clock_kind: str
    time_scale: float | None
    wall_origin_ms: int | None
    seed: int
    aas_ports: dict[int, int] = field(
        default_factory=dict
    )  # share -> AAS server port (stable across restarts)
    passwords: dict[str, str] = field(default_factory=dict)  # agent -> MQTT password (broker auth on)
    split: bool = False  # a virtual clock over several processes: timers fire through the time barrier
    http_secret: str | None = None  # the run's token secret for AAS/registry writes (protocol/tokens.py)
    signing_secret: str | None = None  # what the agents' Ed25519 keys derive from (protocol/signing.py)


def split_virtual_refusals(
    scenario: Scenario, processes: int, chaos: bool, resume: bool = False
) -> list[str]:
    """Why a virtual clock cannot give one schedule over ``processes`` processes, if it cannot.

    The time barrier (shopfloor/barrier.py) counts deliveries between processes from the agents'
    subscriptions at start-up; agents that die, restart or appear later (kills, chaos) would make
    it guess, and so would a broker restart that drops deliveries. Those are refused, not replaced.
    """
    if processes < 2 or scenario.clock.kind != "virtual":
        return []
    why = []
    if chaos:
        why.append("chaos kills agent processes at wall-clock instants")
    for fault in scenario.faults:
        what = "restarts the broker" if getattr(fault, "restart_broker", False) else f"kills {fault.kill}"
        why.append(f"faults: the fault at t={fault.at:g} {what}")
    if resume:
        why.append(
            "--resume: a split virtual clock does not yet restart its processes at the recorded instant"
        )
    return why


def _clock(plant: Plant, share: int = 0) -> Clock:
    if plant.split:
        return SplitVirtualClock(share)
    return make_clock(
        plant.clock_kind, time_scale=plant.time_scale or 1.0, wall_origin_ms=plant.wall_origin_ms
    )


def _share(items: list[Any], share: int, shares: int) -> list[Any]:
    """The items (resources, product instances) run by process ``share`` of ``shares``."""
    return [x for i, x in enumerate(items) if i % shares == share]


def _preload_share(node: Node, plant: Plant, share: int, shares: int) -> None:
    """A restart: read back the state of every agent of the share in a few queries."""
    scenario = plant.scenario
    items = _share(scenario.resources, share, shares) + _share(scenario.product_instances(), share, shares)
    node.state.preload(x.name for x in items)


def _start_concurrency() -> int:
    """How many agents a process starts at once (connect, subscribe, register): 64, or
    ``TWINBID_START_CONCURRENCY``. More overlaps more round trips and makes bigger registration
    batches (5,000 agents started in 48 s with 64, 66 s with 32, back to back), but every one in
    flight may hold a connection in the broker's listen queue (mosquitto's backlog is 100; no
    overflow was seen with 64 in each of two processes)."""
    try:
        return max(1, int(os.environ.get("TWINBID_START_CONCURRENCY", "64")))
    except ValueError:
        return 64


async def _start_resources(node: Node, plant: Plant, share: int, shares: int) -> None:
    """Start this process's share of the resources (before any product, in every process)."""
    scenario = plant.scenario
    config = assembly.requester_config(scenario, plant.clock_kind, plant.time_scale)
    validity = assembly.offer_validity(scenario, config)
    dist = assembly.distances(scenario)
    log_dir = plant.out / "assets"
    log_dir.mkdir(parents=True, exist_ok=True)
    sem = asyncio.Semaphore(_start_concurrency())

    async def resource(r: Any) -> None:
        async with sem:
            asset = assembly.make_asset(scenario, r, log_dir, plant.seed)
            await start_resource(
                node,
                asset,
                kind=r.kind,
                distances=dist,
                cost_rates=assembly.cost_rates(r),
                validity=validity,
                breakdown_policy=getattr(r, "breakdown_policy", "finish_late"),
            )

    await asyncio.gather(*(resource(r) for r in _share(scenario.resources, share, shares)))


async def _start_products(node: Node, plant: Plant, share: int, shares: int) -> list[str]:
    """Start this process's share of the products; return their names."""
    scenario = plant.scenario
    config = assembly.requester_config(scenario, plant.clock_kind, plant.time_scale)
    instances = _share(scenario.product_instances(), share, shares)
    sem = asyncio.Semaphore(_start_concurrency())

    async def product(p: Any) -> None:
        async with sem:
            await start_product(node, assembly.product_order(scenario, p), config=config)

    await asyncio.gather(*(product(p) for p in instances))
    return [p.name for p in instances]


async def _start_agents(node: Node, plant: Plant, share: int, shares: int) -> list[str]:
    await _start_resources(node, plant, share, shares)
    return await _start_products(node, plant, share, shares)


def _startup_timeout(scenario: Scenario, shares: int) -> float:
    """How long the launcher waits for the worker processes' resources: two minutes, and 0.1 s
    more for every resource of a share (10,000-agent swarms start for minutes)."""
    return 120.0 + 0.1 * len(scenario.resources) / max(1, shares)


def _write_aasx(node: Node, names: list[str], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        objects = node.store.identifiables(name)
        if objects:
            write_aasx(folder / f"{name}.aasx", objects)


def _record_keys(out: Path, secret: str, *names: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_keys(out, {n: public_key_text(secret, n) for group in names for n in group})


# --- the run ----------------------------------------------------------------------------------------


def _raise_open_files_limit() -> None:
    """Every agent holds an MQTT connection (and the private broker one per agent): a swarm of
    more than ~1,000 agents needs more than the usual soft limit of open files. The broker, the
    fork server and the workers inherit the raised limit."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):  # e.g. a hard limit above the kernel's nr_open
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def recorder_address(broker: RunningBroker, credentials: Credentials | None) -> BrokerAddress:
    """Where the run's recorder connects, and in which MQTT version.

    On the run's own broker it speaks MQTT 3.1.1: paho decodes the (empty) MQTT 5 properties of
    every PUBLISH, about 40 % of the recorder's CPU per message, and the session expiry that only
    MQTT 5 has does not matter on a broker that stops with the run. On an external broker it keeps
    MQTT 5, whose session ends an hour after the recorder has gone instead of having the broker
    queue the namespace's messages for it for ever.
    """
    address = credentials.observer_address(broker.address) if credentials else broker.address
    if broker.kind != "external" and address.protocol == "auto":
        address = dataclasses.replace(address, protocol="3.1.1")
    return address


async def run(scenario: Scenario, options: RunOptions) -> RunResult:
    """Run the plant to the end; raises :class:`RunStillAlive` when resuming a run that still runs."""
    missing = scenario.missing_vendor_keys(os.environ)
    if missing:  # before anything starts or is written: a retry with the variable set is clean
        raise ScenarioError("\n".join(missing))
    out = options.out
    # One launcher per record: a second one is refused at once (a lock that dies with its holder).
    lock = RecordLock()
    created = [p for p in (out, out / "run.lock") if not p.exists()]
    await asyncio.to_thread(_lock_folder, out, lock)
    if options.resume:  # before the record is touched: a second plant beside a live one does steps twice
        try:
            await refuse_if_alive(out)  # a killed launcher's processes that outlived it
        except BaseException:
            lock.release()
            raise
    _raise_open_files_limit()
    notices: list[str] = []
    seed = options.seed if options.seed is not None else scenario.seed
    db_url = options.db or scenario.database or sqlite_url(out / "run.db")
    clock_kind, time_scale = scenario.clock.kind, scenario.clock.time_scale
    processes = max(1, options.processes)
    if options.chaos is not None and processes < 2:
        raise ValueError("chaos needs agent processes to kill: use processes >= 2")
    refusals = split_virtual_refusals(scenario, processes, options.chaos is not None, options.resume)
    if refusals:
        raise RunStartError(
            f"a virtual clock split over {processes} processes cannot give a deterministic schedule here: "
            + "; ".join(refusals)
            + ". Run with --processes 1, or use an accelerated clock"
        )
    split = processes > 1 and clock_kind == "virtual"
    # With chaos every agent lives in a killable worker; otherwise this process takes share 0.
    count = processes - 1 if options.chaos is not None else processes
    local = options.chaos is None
    broker_url = options.broker if options.broker is not None else scenario.broker
    db, run_id, created = await asyncio.to_thread(
        _open_record, scenario, db_url, options.resume, lock, created
    )
    try:
        credentials, tls = _broker_security(scenario, broker_url, out, notices)
        broker = await _start_broker(broker_url, out, credentials, tls)
    except BaseException:  # nothing ran: leave nothing that would refuse a retry
        _give_back(db, run_id, options.resume, created, lock)
        raise
    passwords = credentials.passwords if credentials is not None else {}
    # Issued with the broker accounts (saved beside them); a run without accounts still gets one:
    # its AAS servers and registry never take an anonymous write.
    http_secret = credentials.http_secret if credentials is not None else new_secret()
    # The agents' signing keys derive from a secret of the record, kept across resumes (the
    # broker accounts are issued anew); their public keys are recorded at launch for `twinbid verify`.
    signing_secret = run_signing_secret(out)
    _record_keys(
        out,
        signing_secret,
        [r.name for r in scenario.resources],
        [p.name for p in scenario.product_instances()],
    )
    if credentials is None:  # saved beside where the accounts would be, for processes joining the run
        save_http_secret(out / "broker", http_secret)
    # The registry runs in a process of its own: on the launcher's loop a swarm's registrations and
    # lookups competed with the launcher's own agents and the recorder (registry/process.py).
    registry = RegistryProcess(
        sqlite_url(out / "registry.db"), http_secret=http_secret, ns=scenario.namespace
    )
    started = time.perf_counter()
    recorder: RecorderProcess | None = None  # in a child process: its threads would hold our GIL
    node: Node | None = None
    clock: Clock | None = None
    pool: WorkerPool | None = None
    chaos_task: asyncio.Task | None = None
    supervisor = Supervisor(out, broker, registry)
    supervisor_task: asyncio.Task | None = None
    timed_out = interrupted = False
    finished: set[str] = set()
    notifier: ScenarioNotifier | None = None
    intake: OrderIntake | None = None
    host: BarrierHost | None = None
    try:
        supervisor_task = asyncio.create_task(supervisor.run())  # from the start: a broker may die early
        registry_url = await registry.start()
        drop_analysis_indexes(db)  # built again at the end: nothing reads them while the plant runs
        recorder = await _start_recorder(
            RecorderProcess(
                recorder_address(broker, credentials),
                scenario.namespace,
                out / "messages.jsonl",
                client_id="twinbid-recorder",
                clean=False,
            )
        )
        supervisor.recorder = recorder
        wall_origin = _wall_origin(db, processes, options.resume)
        worker_shares = list(range(1 if local else 0, count))
        plant = Plant(
            scenario, out, broker.address, registry_url, db_url, clock_kind, time_scale, wall_origin, seed,
            aas_ports={share: free_port() for share in worker_shares}, passwords=dict(passwords),
            split=split,
            http_secret=http_secret, signing_secret=signing_secret,
        )  # fmt: skip
        clock = _clock(plant)
        if isinstance(clock, SplitVirtualClock):
            host = BarrierHost(TimeBarrier(frozenset(range(count))))
            host.local(clock)
        if options.resume and hasattr(clock, "resume_at"):
            clock.resume_at(_last_sim_time(db))
        node = Node(
            NodeConfig(
                scenario.namespace,
                broker.address,
                registry_url,
                passwords=passwords,
                http_secret=http_secret,
                signing_secret=signing_secret,
            ),
            clock,
            db,
        )
        node.finished_hooks.append(lambda a: finished.add(a.name) if a.kind == "product" else None)
        notifier = ScenarioNotifier(scenario, db)
        if notifier.active:
            if not local:
                notices.append("vendor notifications are sent for products in this process only")
            node.event_hooks.append(notifier.on_event)
            await notifier.start()
        await node.start()
        if scenario.vendors and local and split:
            # Orders arrive at wall-clock instants; the barrier knows the plant's agents at start-up.
            notices.append(
                "order-taking service not started: vendor orders arrive at wall-clock instants, which a "
                f"virtual clock split over {processes} processes cannot place deterministically "
                "(run with --processes 1 to take orders)"
            )
        elif scenario.vendors and local:
            # Vendors may order into the running plant: POST /orders, or TakeOrder on the service's AAS.
            requester = assembly.requester_config(scenario, clock_kind, time_scale)
            try:
                intake = OrderIntake(
                    scenario, node, requester, registry_url=registry_url, outbox=notifier.outbox
                )
            except VendorFileError as exc:  # e.g. a vendor's key variable is not set: run without intake
                notices.append(f"order-taking service not started: {exc}")
            else:
                orders_url = await intake.start(options.orders_host, options.orders_port)
                notices.append(f"order-taking service: {orders_url}")
                for name, variable in sorted(intake.service.vendors.skipped.items()):
                    notices.append(f"vendor {name} cannot order over HTTP: {variable} is not set (optional)")
                if options.on_orders_url:
                    options.on_orders_url(orders_url)
        if worker_shares:
            pool = WorkerPool(plant, worker_shares, count, on_finished=finished.add, barrier=host)
            pool.start()
            supervisor.pool = pool
        if host is not None:
            host.start()
        await clock.start()
        _write_plant_file(out, scenario, broker, registry_url, clock)
        # Two phases across processes: every resource is subscribed and registered before any
        # product calls for proposals, or the first calls would find nobody listening. On a
        # virtual clock the start-up takes no simulated time: the clock waits until every agent
        # has started (its registration's HTTP round trips leave the loop idle, which the clock
        # would otherwise take for quiescence and move on, differently from run to run).
        with clock.activity():
            if local:
                _preload_share(node, plant, 0, count)
                await _start_resources(node, plant, 0, count)
            if pool is not None:
                await pool.resources_ready(timeout=_startup_timeout(scenario, count))
                pool.go()
            if local:
                await _start_products(node, plant, 0, count)
            if isinstance(clock, SplitVirtualClock):
                clock.ready(node.topic_filters())
        total = len(scenario.product_instances())
        _schedule_faults(scenario, node, plant, broker, notices)
        if options.chaos is not None and pool is not None:
            chaos_task = asyncio.create_task(options.chaos.run(pool, broker, lambda: len(finished) >= total))

        def expected() -> int:  # the scenario's products, and every vendor order taken so far
            return total + (len(intake.accepted) if intake is not None else 0)

        timed_out, interrupted = await _wait(
            scenario, clock, node, finished, expected, pool, options.progress, host
        )
        if host is not None and host.failure:
            notices.append(host.failure)
    except asyncio.CancelledError:  # Ctrl-C: stop cleanly and still leave a complete record
        interrupted = True
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
    finally:
        wall = time.perf_counter() - started
        if supervisor_task is not None:  # from here on the run stops its processes itself
            supervisor_task.cancel()
            with contextlib.suppress(BaseException):
                await supervisor_task
        if chaos_task is not None:
            chaos_task.cancel()
            with contextlib.suppress(BaseException):
                await chaos_task
        if node is not None:
            with contextlib.suppress(Exception):
                await node.journal.commit()
        if intake is not None:
            with contextlib.suppress(Exception):
                await intake.stop()
        if host is not None:
            host.closing()
        if pool is not None:
            await pool.stop()
        if host is not None:
            await host.stop()
            if host.barrier.stalls:
                notices.append(
                    f"the time barrier forced progress {host.barrier.stalls} times (deliveries between "
                    "processes that never arrived): the schedule may differ from a single-process run"
                )
        if node is not None:
            products = [n for n, a in node.agents.items() if a.kind == "product"]
            try:
                await node.stop()
            finally:
                # Written once the agents are disconnected: thousands of AASX files hold the loop for
                # a minute, and connections left open meanwhile lost their MQTT heartbeats.
                with contextlib.suppress(Exception):
                    _record_keys(out, node.signing_secret, [], products)  # products ordered meanwhile
                    _write_aasx(node, products, out / "aas")
        if notifier is not None:
            with contextlib.suppress(Exception):
                await notifier.stop()
        if clock is not None:
            await clock.stop()
        if recorder is not None:
            await asyncio.to_thread(recorder.stop)
        await registry.stop()
        await asyncio.to_thread(broker.stop)
    db.dispose()
    db = open_database(db_url)
    runs.end(db, "interrupted" if interrupted else "timed out" if timed_out else "ended")
    build_analysis_indexes(db)
    plan_steps = sum(len(p.plan) for p in scenario.product_instances())
    figures = kpis.compute(
        db,
        wall_seconds=wall,
        plan_steps=plan_steps,
        products_total=len(scenario.product_instances()) + (len(intake.accepted) if intake else 0),
        resources=[r.name for r in scenario.resources],
    )
    figures["recorded_messages"] = recorder.count if recorder else 0
    if recorder is not None:  # the log is complete or says where it is not (log_completeness)
        figures["negotiation_log"] = log_completeness.reconcile(
            db, out / "messages.jsonl", scenario.namespace
        )
        if figures["negotiation_log"]["reconciled"]:
            notices.append(
                f"messages.jsonl: {figures['negotiation_log']['reconciled']} messages the recorder did not "
                'receive were filled in from the journal (marked "reconciled": true)'
            )
    figures["clock"] = {"kind": clock_kind, "time_scale": time_scale, "processes": processes}
    if supervisor.revived:
        figures["revived"] = supervisor.revived
    if clock is not None and clock.kind == "virtual":
        # Timers the plant fired (one at a time; a split plant may fire a few more or fewer that
        # decide nothing, e.g. a dispatch timer re-armed by same-instant deliveries in another order).
        figures["clock"]["timers_fired"] = host.barrier.step if host is not None else clock.timers_fired
    recoveries = pool.recoveries if pool else []
    times = [r.seconds for r in recoveries if r.seconds is not None]
    if times:
        figures["recovery_s"] = {
            "p50": kpis.percentile(times, 0.5),
            "p99": kpis.percentile(times, 0.99),
            "count": len(times),
        }
    (out / "kpis.json").write_text(kpis.dumps(figures))
    (out / PROCESSES_FILE).unlink(missing_ok=True)  # every process of the run has ended
    gantt.gantt(db, out / "gantt.png", title=f"{scenario.name}: schedule")
    try:
        checkpoint(db)
    except Exception as exc:  # the record is whole, only not in one file: say so
        notices.append(f"run.db needs its -wal file beside it: {exc}")
    db.dispose()
    lock.release()
    chaos_log = options.chaos.log if options.chaos else []
    return RunResult(out, figures, timed_out, interrupted, notices, recoveries, chaos_log)


class RunStartError(RuntimeError):
    """The run could not start: the message says what and where, in one line."""


def _lock_folder(out: Path, lock: RecordLock) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lock.folder(out / "run.lock", str(out))


def _open_record(
    scenario: Scenario, db_url: str, resume: bool, lock: RecordLock, created: list[Path]
) -> tuple[Database, str, list[Path]]:
    """Lock the database and claim it for this run (one run per record; the output folder is
    locked already). Returns the database, the run id and the files and folders this run created
    (``created``: those before the database), removed if the run cannot start."""
    created = list(created)
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        path = Path(url.database)
        if not path.exists():
            created += [path.with_name(path.name + suffix) for suffix in ("", "-wal", "-shm", ".run-lock")]
    try:
        db = open_database(db_url)
    except SQLAlchemyError as exc:
        lock.release()
        _remove(created)
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        where = url.render_as_string(hide_password=True)
        raise RunStartError(f"cannot open the database {where}: {reason}") from None
    try:
        lock.database(db)
        run_id = runs.claim(db, scenario.name, resume=resume)
    except BaseException:
        db.dispose()
        lock.release()
        _remove(created)
        raise
    return db, run_id, created


def _give_back(db: Database, run_id: str, resume: bool, created: list[Path], lock: RecordLock) -> None:
    """The run did not start: its claim and the files it created go, so the same command can be retried."""
    with contextlib.suppress(Exception):
        if not resume:
            runs.unclaim(db, run_id)
    db.dispose()
    lock.release()
    _remove(created)


def _remove(paths: list[Path]) -> None:
    """Remove what a run that could not start created, files first (a folder only if left empty)."""
    for path in sorted(paths, key=Path.is_dir):
        with contextlib.suppress(OSError):
            path.rmdir() if path.is_dir() else path.unlink(missing_ok=True)


async def _start_recorder(recorder: RecorderProcess, within: float = 60.0) -> RecorderProcess:
    """Start the run's recorder; while its broker is down (being started again by the supervisor)
    it cannot connect, so it tries again until ``within`` seconds have passed."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await asyncio.to_thread(recorder.start)
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            log.warning("the recorder could not reach the run's broker; trying again")
            await asyncio.sleep(0.5)


async def _start_broker(
    url: str | None, out: Path, credentials: Credentials | None, tls: MosquittoTLS | None
) -> RunningBroker:
    """Start the run's broker, or reach the one the user runs: then time a small message's round
    trip, and say once when that broker holds small messages back."""
    try:
        # A broker started here ends with this process, however it ends (protocol.lifeline).
        broker = await asyncio.to_thread(
            lambda: start_broker(url, out, credentials=credentials, tls=tls, die_with_parent=True)
        )
        if broker.kind != "external":
            return broker
        round_trip = await probe_broker(broker.address)
    except (BrokerStartError, BrokerUnreachable, ValueError) as exc:
        raise RunStartError(str(exc)) from None
    if round_trip is not None and round_trip > SLOW_ROUND_TRIP:
        log.warning(
            "the broker at %s took %.0f ms to carry a small message there and back (loopback takes well "
            "under 1 ms): it holds small packets back (Nagle's algorithm). Negotiations will be slow; "
            "set `set_tcp_nodelay true` in mosquitto.conf (other brokers: TCP_NODELAY on)",
            broker.address.url(with_password=False),
            round_trip * 1000,
        )
    return broker


def _write_plant_file(
    out: Path, scenario: Scenario, broker: RunningBroker, registry_url: str, clock: Clock
) -> None:
    """``out/plant.json``: how another process joins the running plant (``twinbid vendor serve --plant OUT``):
    namespace, broker (without password), registry and the clock's time base, which every process shares."""
    info = {
        "namespace": scenario.namespace,
        "broker": broker.address.url(with_password=False),
        "registry": registry_url,
        "clock": {
            "kind": clock.kind,
            "time_scale": getattr(clock, "time_scale", None),
            "wall_origin_ms": getattr(clock, "wall_origin_ms", None),
        },
    }
    (out / "plant.json").write_text(json.dumps(info, indent=2) + "\n")


def _broker_security(
    scenario: Scenario, broker_url: str | None, out: Path, notices: list[str]
) -> tuple[Credentials | None, MosquittoTLS | None]:
    """Accounts (one per agent, and an observer) and TLS for a broker the launcher starts.

    The accounts are saved in ``OUT/broker/credentials.json`` (0600): the observer's password
    there lets ``twinbid observe`` follow the run.  An external broker keeps its own accounts.
    """
    security = scenario.security
    if broker_url is not None and broker_url.strip().lower() not in ("", "embedded", "amqtt", "mosquitto"):
        if security.tls is not None:
            notices.append("security.tls applies to a broker the launcher starts; ignored for " + broker_url)
        return None, None
    tls = None
    if security.tls is not None:
        tls = MosquittoTLS(certfile=security.tls.cert, keyfile=security.tls.key, cafile=security.tls.ca)
    if not security.auth:
        return None, tls
    credentials = Credentials(scenario.namespace, out / "broker")
    for r in scenario.resources:
        credentials.add_agent(r.name, offered_capabilities(r))
    for p in scenario.product_instances():
        credentials.add_agent(p.name)
    credentials.add_observer()
    credentials.save()
    return credentials, tls


def offered_capabilities(resource: Any) -> tuple[str, ...]:
    """The capabilities whose calls a resource's agent subscribes to: exactly those the
    scenario declares for it (a warehouse declared for ``retrieve`` alone takes no store)."""
    return tuple(resource.capability_names())


def _last_sim_time(db: Any) -> float:
    """The latest simulated instant the database knows of: where a resumed virtual run goes on."""
    from sqlalchemy import func

    from agents.persistence.tables import ConversationRecord, EventRecord, OutboxRecord

    with db.session() as s:
        times = [
            s.exec(select(func.max(EventRecord.sim))).first(),
            s.exec(select(func.max(OutboxRecord.created_sim))).first(),
            s.exec(select(func.max(ConversationRecord.updated_sim))).first(),
        ]
    return max((t for t in times if t is not None), default=0.0)


def _wall_origin(db: Any, processes: int, resume: bool) -> int | None:
    """Simulated time 0 in wall ms, shared by every process (and kept by a resumed run)."""
    from agents.persistence.tables import AgentRecord

    if resume:
        with db.session() as s:
            first = s.exec(select(AgentRecord.started_wall_ms).order_by(AgentRecord.started_wall_ms)).first()
        if first:
            return int(first)
    return int(time.time() * 1000) + 3000 if processes > 1 else None  # workers need ~2 s to start


async def _wait(
    scenario: Scenario,
    clock: Clock,
    node: Node,
    finished: set[str],
    total: Callable[[], int],
    pool: WorkerPool | None,
    progress: bool,
    host: BarrierHost | None = None,
) -> tuple[bool, bool]:
    """Until every product finished, the clock ran out, or the wall timeout; with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    stop = scenario.stop
    deadline = time.monotonic() + (stop.wall_timeout or 24 * 3600)
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        disable=not progress,
        transient=False,
    )
    last_msgs, last_t, idle = 0, time.monotonic(), 0
    with bar:
        task = bar.add_task("products", total=total(), info="")
        while True:
            if pool is not None:
                pool.poll()
            sent = sum(
                sum(v for k, v in a.counters.items() if k.startswith("sent:")) for a in node.agents.values()
            )
            now = time.monotonic()
            rate = (sent - last_msgs) / max(now - last_t, 1e-6)
            last_msgs, last_t = sent, now
            bar.update(
                task, completed=len(finished), info=f"t={clock.now():.1f}  {rate:,.0f} msg/s (this process)"
            )
            if stop.when == "all_done" and len(finished) >= total():
                return False, False
            if stop.max_time is not None and clock.now() >= stop.max_time:
                return False, False
            if now > deadline:
                return True, False
            if host is not None and host.failure:
                return False, True
            idle = idle + 1 if clock.kind == "virtual" and _stalled(clock, node, host) else 0
            if idle >= 10:  # a whole second with nothing to do and nothing pending
                log.warning("the plant is idle but %d products are unfinished", total() - len(finished))
                return False, False
            await asyncio.sleep(0.1)


def _stalled(clock: Clock, node: Node, host: BarrierHost | None = None) -> bool:
    if host is not None:  # split: only the barrier sees the whole plant
        return host.barrier.idle
    timers = getattr(clock, "timers", None)
    return bool(clock.pending == 0 and clock.busy == 0 and timers == 0 and node.agents)


def _schedule_faults(
    scenario: Scenario, node: Node, plant: Plant, broker: RunningBroker, notices: list[str]
) -> None:
    """The scenario's faults, at their simulated times; each one carried out is reported in the notices."""
    for fault in scenario.faults:
        if getattr(fault, "restart_broker", False):
            node.clock.call_at(fault.at, lambda f=fault: _restart_broker(node, broker, f.down_for, notices))
        else:
            node.clock.call_at(
                fault.at, lambda f=fault: _crash_agent(node, plant, f.kill, f.restart_after, notices)
            )


async def _restart_broker(node: Node, broker: RunningBroker, down_for: float, notices: list[str]) -> None:
    if broker.kind == "external":
        notices.append(f"t={node.clock.now():g}: cannot restart an external broker; fault skipped")
        return
    await asyncio.to_thread(broker.stop)
    if down_for:
        await asyncio.sleep(
            down_for * (node.clock.time_scale / 1000 if hasattr(node.clock, "time_scale") else 0)
        )
    await asyncio.to_thread(broker.restart)
    notices.append(f"t={node.clock.now():g}: broker restarted")


async def _crash_agent(
    node: Node, plant: Plant, name: str, restart_after: float | None, notices: list[str]
) -> None:
    """An in-process crash: the agent's connection and memory are dropped, its rows stay."""
    agent: Agent | None = node.agents.get(name)
    if agent is None:
        notices.append(f"t={node.clock.now():g}: {name} is not running here; kill skipped")
        return
    await node.crash_agent(agent)
    notices.append(f"t={node.clock.now():g}: {name} crashed")
    if restart_after is not None:
        node.clock.call_later(restart_after, lambda: _restart_agent(node, plant, name, notices))


async def _restart_agent(node: Node, plant: Plant, name: str, notices: list[str]) -> None:
    notices.append(f"t={node.clock.now():g}: {name} restarted")
    scenario = plant.scenario
    config = assembly.requester_config(scenario, plant.clock_kind, plant.time_scale)
    for r in scenario.resources:
        if r.name == name:
            asset = assembly.make_asset(scenario, r, plant.out / "assets", plant.seed)
            await start_resource(
                node,
                asset,
                kind=r.kind,
                distances=assembly.distances(scenario),
                cost_rates=assembly.cost_rates(r),
                validity=assembly.offer_validity(scenario, config),
                breakdown_policy=getattr(r, "breakdown_policy", "finish_late"),
            )
            return
    for p in scenario.product_instances():
        if p.name == name:
            await start_product(node, assembly.product_order(scenario, p), config=config)
            return


def run_file(path: Path, options: RunOptions) -> RunResult:
    scenario = load_scenario(path)
    return asyncio.run(run(scenario, options))
