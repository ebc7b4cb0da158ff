"""Agent processes of a multi-process run, and their supervision.

Each share of the plant (a slice of the resources and products) runs in a
worker process with its own node: its own MQTT connections, AAS server (on a
port fixed for the share, so other processes' cached endpoints stay valid
across a restart) and journal on the shared run database. The pool keeps one
warm spare — a process that has already imported everything — so a share whose
process died is taken over in a fraction of a second: its agents reload their
state from the database and resume.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protocol import lifeline

log = logging.getLogger(__name__)


@dataclass
class ShareState:
    share: int
    process: Any = None
    spawned_ms: int = 0  # when the process that now runs the share was given it
    ready_ms: int | None = None
    first_action_ms: int | None = None
    restarts: int = 0
    assign_q: Any = None
    incarnation: int = 0  # how many processes have run this share so far
    killed: bool = False


@dataclass
class Recovery:
    share: int
    killed_ms: int
    assigned_ms: int
    incarnation: int
    first_action_ms: int | None = None

    @property
    def seconds(self) -> float | None:
        return None if self.first_action_ms is None else (self.first_action_ms - self.assigned_ms) / 1000


STOP, GO = 0, 1
SPARE_DELAY = 3.0  # seconds a takeover has the CPU to itself before the next spare is started


def _spare_main(
    plant: Any, count: int, assign_q: Any, report_q: Any, flags: Any, launcher_pid: int, conn: Any = None
) -> None:
    """A worker process: import everything and warm up, then wait for the share to run.

    It ends the moment its launcher (pid ``launcher_pid``) does, however that ends: its parent is
    the fork server, and a worker that outlived a killed launcher went on executing steps beside
    the run that resumed it (``protocol.lifeline``). Ctrl-C reaches the whole process group; the
    launcher alone handles it and stops the workers through the stop flag (a worker interrupted on
    its own printed a traceback and left its share half written). ``conn`` is its line to the time
    barrier in a split virtual run.
    """
    # ... and with its fork server: multiprocessing reports every child of a dead fork server as dead
    # (exit 255), and the pool hands its share to a new process; the old one must not go on beside it.
    if not (lifeline.exit_with(launcher_pid) and lifeline.exit_with(os.getppid())):
        return
    # Ctrl-C, and a service manager's SIGTERM, reach every process of the group: the launcher stops us.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from scenarios import launcher  # noqa: F401 - the heavy imports happen here, before any assignment

    node = _warm_up(plant)
    assignment = assign_q.get()
    if assignment is None:
        return
    share, incarnation = assignment
    asyncio.run(_share_main(plant, share, incarnation, count, report_q, flags, node, conn))


def _warm_up(plant: Any) -> Any:
    """Build the node before the share is known, and pay the first-use costs a takeover would.

    A node (database engine, FastAPI app of the AAS server, HTTP clients) takes ~100 ms to build;
    it binds nothing until started, so the share's AAS port is filled in at assignment. The first
    product twin's AAS objects and JSON codecs cost more than the next; one is built and thrown away.
    """
    from sqlmodel import SQLModel

    from agents.aas.io import environment_json, read_json
    from agents.persistence import open_database
    from agents.persistence.journal import primary_key
    from agents.product.agent import build_shell
    from agents.runtime.node import Node
    from scenarios import assembly
    from scenarios.launcher import _clock

    try:
        node = Node(_node_config(plant, None), _clock(plant), open_database(plant.db_url, create=False))
        node.state.preload(["\0warm-up"])  # compiles the restart queries (SQLAlchemy caches them)
        for table in SQLModel.__subclasses__():
            if hasattr(table, "__table__"):
                primary_key(table)  # the first walk of a table's key columns costs ~10 ms
        for p in plant.scenario.product_instances()[:1]:
            objects = build_shell(assembly.product_order(plant.scenario, p), plant.scenario.namespace)
            read_json(environment_json(objects).encode())
        return node
    except Exception:  # a warm-up is an optimisation: the takeover builds what is missing
        log.debug("warm-up failed", exc_info=True)
        return None


def _node_config(plant: Any, share: int | None) -> Any:
    from agents.runtime.node import NodeConfig

    return NodeConfig(
        plant.scenario.namespace,
        plant.broker,
        plant.registry_url,
        aas_port=plant.aas_ports[share] if share is not None else 0,
        passwords=getattr(plant, "passwords", {}),
        http_secret=getattr(plant, "http_secret", None),
        signing_secret=getattr(plant, "signing_secret", None),
    )


async def _until(flags: Any, index: int) -> None:
    # Lock-free flags, polled: a process killed inside a multiprocessing Event's wait() leaves
    # the event's condition variable broken for every other process.
    while not flags[index]:  # noqa: ASYNC110 - a cross-process flag, not an asyncio.Event
        await asyncio.sleep(0.02)


async def _share_main(
    plant: Any,
    share: int,
    incarnation: int,
    count: int,
    report_q: Any,
    flags: Any,
    node: Any = None,
    conn: Any = None,
) -> None:
    from agents.persistence import open_database
    from agents.runtime.node import Node
    from scenarios.launcher import _clock, _preload_share, _start_products, _start_resources, _write_aasx
    from shopfloor.barrier import PipeLink, SplitVirtualClock

    if node is None:
        node = Node(
            _node_config(plant, share), _clock(plant, share), open_database(plant.db_url, create=False)
        )
    else:
        node.config.aas_port = plant.aas_ports[share]
    clock = node.clock
    link = None
    if isinstance(clock, SplitVirtualClock):
        link = PipeLink(conn, clock)
        clock.attach(link, share)
        link.start()
    node.finished_hooks.append(lambda a: report_q.put(("finished", a.name)) if a.kind == "product" else None)
    node.first_publish_hooks.append(lambda ms: report_q.put(("first-action", share, ms, incarnation)))
    await node.start()
    await clock.start()
    # Every agent's state in one query per table (a fresh run finds nothing, and each agent then
    # knows so without a query of its own).
    _preload_share(node, plant, share, count)
    if flags[GO]:
        # A takeover after a crash: the plant is running, resume everything at once.
        _, names = await asyncio.gather(
            _start_resources(node, plant, share, count), _start_products(node, plant, share, count)
        )
        report_q.put(("resources-ready", share))
    else:
        await _start_resources(node, plant, share, count)
        report_q.put(("resources-ready", share))
        await _until(flags, GO)
        names = await _start_products(node, plant, share, count)
    if link is not None:
        clock.ready(node.topic_filters())
    report_q.put(("ready", share, int(time.time() * 1000)))
    await _until(flags, STOP)
    await node.journal.commit()
    await node.stop()
    _write_aasx(node, names, plant.out / "aas")  # disconnected first: writing takes the loop a while
    await clock.stop()
    if link is not None:
        link.stop()
    report_q.put(("stopped", share))


def _context() -> Any:
    """Worker processes are forked from a fork server that has already imported the plant's code.

    A spawned process spends seconds importing (asyncio, basyx, SQLAlchemy, FastAPI ...) before it
    can take a share over; a fork of the server starts in milliseconds with all of it loaded. The
    server is a clean interpreter (no threads, no event loop), so forking it is safe, unlike
    forking the launcher itself.
    """
    if "forkserver" not in mp.get_all_start_methods():  # pragma: no cover - not Linux
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["scenarios.forkserver_setup", "scenarios.launcher"])
    return ctx


@dataclass
class WorkerPool:
    plant: Any
    shares: list[int]
    count: int  # how many shares the plant is cut into
    ctx: Any = field(default_factory=lambda: _context())
    states: dict[int, ShareState] = field(default_factory=dict)
    recoveries: list[Recovery] = field(default_factory=list)
    on_finished: Callable[[str], None] | None = None
    barrier: Any = None  # the time barrier's host (shopfloor/barrier.py) of a split virtual run

    def __post_init__(self) -> None:
        # [stop, go]; go: products may start, every share's resources are up
        self.flags = self.ctx.RawArray("b", 2)
        self._resources_ready: set[int] = set()
        self.lost: set[int] = set()  # shares whose process died and was not restarted
        self._spare: tuple[Any, Any] | None = None
        self._spare_due: float | None = None
        self._started = False
        # One report queue per process: a process killed while writing can only break its own.
        self._queues: list[Any] = []

    def pids(self) -> dict[str, int]:
        """The living worker processes, by role (``share-N``, ``spare``)."""
        found = {f"share-{st.share}": st.process.pid for st in self.states.values() if st.process is not None}
        if self._spare is not None:
            found["spare"] = self._spare[0].pid
        return {role: pid for role, pid in found.items() if pid is not None}

    @property
    def stopping(self) -> bool:
        return bool(self.flags[STOP])

    def _new_process(self) -> tuple[Any, Any]:
        assign_q, report_q = self.ctx.Queue(), self.ctx.Queue()
        ours, theirs = self.ctx.Pipe() if self.barrier is not None else (None, None)
        p = self.ctx.Process(
            target=_spare_main,
            args=(self.plant, self.count, assign_q, report_q, self.flags, os.getpid(), theirs),
            daemon=True,
        )
        p.start()
        p.barrier_conn = ours  # the launcher's end, given to the barrier when the process takes a share
        self._queues.append(report_q)
        return p, assign_q

    def _assign(self, share: int) -> None:
        proc, q = self._spare if self._spare else self._new_process()
        self._spare = None
        st = self.states.setdefault(share, ShareState(share))
        st.incarnation += 1
        q.put((share, st.incarnation))
        st.process, st.spawned_ms, st.ready_ms, st.first_action_ms = proc, int(time.time() * 1000), None, None
        st.assign_q = q  # keep it alive: a queue collected here unlinks the semaphore the child still needs
        if self.barrier is not None:
            self.barrier.add(share, proc.barrier_conn)
        # The next takeover is warm too, but its process is started only once this share has
        # resumed (see poll): its imports would otherwise take the CPU the takeover needs.
        self._spare_due = time.monotonic() + (SPARE_DELAY if self._started else 0.0)

    def start(self) -> None:
        for share in self.shares:
            self._assign(share)
        self._started = True
        self._ensure_spare(force=True)

    def _ensure_spare(self, force: bool = False) -> None:
        """Start the warm spare when it is due: at once at start, else after the last takeover
        resumed (its first action) or SPARE_DELAY seconds, whichever comes first."""
        if self._spare is not None or self._spare_due is None or self.stopping:
            return
        resuming = any(
            r.first_action_ms is None and self.states[r.share].incarnation == r.incarnation
            for r in self.recoveries
        )
        if force or not resuming or time.monotonic() >= self._spare_due:
            self._spare = self._new_process()
            self._spare_due = None

    def kill(self, share: int) -> int:
        """SIGKILL the process of a share; returns the wall time (ms)."""
        st = self.states[share]
        st.killed = True  # an expected death: poll() must not restart it behind our back
        if st.process is not None and st.process.is_alive():
            os.kill(st.process.pid, signal.SIGKILL)
            st.process.join(5)
        return int(time.time() * 1000)

    def restart(self, share: int, killed_ms: int) -> None:
        st = self.states[share]
        st.restarts += 1
        st.killed = False
        self._assign(share)
        self.recoveries.append(Recovery(share, killed_ms, st.spawned_ms, st.incarnation))

    def poll(self) -> None:
        """Drain the workers' reports; restart a share whose process died on its own."""
        for item in self._drain():
            kind = item[0]
            if kind == "finished" and self.on_finished:
                self.on_finished(item[1])
            elif kind == "resources-ready":
                self._resources_ready.add(item[1])
            elif kind == "ready":
                self.states[item[1]].ready_ms = item[2]
            elif kind == "first-action":
                _, share, ms, incarnation = item
                st = self.states[share]
                if incarnation == st.incarnation and st.first_action_ms is None:
                    st.first_action_ms = ms
                for r in self.recoveries:
                    if r.share == share and r.incarnation == incarnation and r.first_action_ms is None:
                        r.first_action_ms = ms
        if self.stopping:
            return
        self._ensure_spare()
        for st in self.states.values():
            if st.process is not None and not st.killed and not st.process.is_alive():
                if self.barrier is not None:
                    # A split virtual clock cannot replay what the lost process had in flight: the
                    # barrier reports the failure and the run ends instead of a different schedule.
                    self.lost.add(st.share)
                    continue
                log.warning(
                    "agent process of share %d died (exit %s); restarting", st.share, st.process.exitcode
                )
                self.restart(st.share, int(time.time() * 1000))

    async def resources_ready(self, timeout: float) -> None:  # noqa: ASYNC109 - a plain deadline
        """Wait until every share has its resources subscribed and registered."""
        deadline = time.monotonic() + timeout
        while not set(self.shares) <= self._resources_ready:
            if self.lost:  # not restarted (split virtual clock): the launcher ends the run
                return
            if time.monotonic() > deadline:
                missing = sorted(set(self.shares) - self._resources_ready)
                raise TimeoutError(f"agent processes of shares {missing} did not start in {timeout:g} s")
            self.poll()
            await asyncio.sleep(0.02)

    def go(self) -> None:
        self.flags[GO] = 1

    def _drain(self) -> list[tuple]:
        items = []
        for q in self._queues:
            while True:
                try:
                    items.append(q.get_nowait())
                except Exception:
                    break
        return items

    async def stop(self) -> None:
        # A share whose process is dead when the run ends (killed or crashed, not yet taken over)
        # is taken over once more: its agents resume from the database, see the stop and write
        # their products' AASX. Without this the last kill of a chaos run lost a third of them.
        for st in self.states.values():
            if st.process is not None and not st.process.is_alive():
                log.warning("agent process of share %d is down at the end of the run; resuming it", st.share)
                self.restart(st.share, int(time.time() * 1000))
        self.flags[STOP] = 1
        for st in self.states.values():
            if st.process is not None:
                await asyncio.to_thread(st.process.join, 30)
                if st.process.is_alive():
                    st.process.kill()
        if self._spare:
            proc, q = self._spare
            q.put(None)
            await asyncio.to_thread(proc.join, 10)
            if proc.is_alive():
                proc.kill()
        self.poll()
