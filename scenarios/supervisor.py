"""A run owns its processes: it revives the services it started and names every process it runs.

The launcher starts a broker, a registry, a recorder, a fork server and agent workers. Two
things follow from owning them:

* **Supervision.** When one of them dies on its own, the plant must carry on: the broker comes
  back on the same port with its persistence (agents reconnect to the address they know and
  resume their persistent sessions), the registry on the same URL with its database, the recorder
  with its persistent session, the fork server at once (the next takeover needs it). Agent
  workers are the pool's own business (``scenarios.workers``).
* **A register of the run's processes**, ``OUT/processes.json``: role, pid and start time of the
  launcher and each child. Each child ends with its launcher (``protocol.lifeline``); the register
  is what lets ``--resume`` check that none of them still runs before it starts a second plant on
  the same record — a resumed run beside a live one executes steps twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing.forkserver
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.lifeline import process_start_ticks

log = logging.getLogger(__name__)

PROCESSES_FILE = "processes.json"


class RunStillAlive(RuntimeError):
    """A process of the run in this folder still runs: it cannot be resumed beside it."""


def write_register(out: Path, pids: dict[str, int]) -> None:
    """``OUT/processes.json``: every living process of the run, by role (replaced atomically)."""
    entries = {
        role: {"pid": pid, "start": ticks}
        for role, pid in pids.items()
        if (ticks := process_start_ticks(pid)) is not None
    }
    tmp = out / f".{PROCESSES_FILE}.tmp"
    tmp.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out / PROCESSES_FILE)


def living(out: Path) -> dict[str, int]:
    """The processes named in ``OUT/processes.json`` that still run (same pid, same start time)."""
    try:
        entries = json.loads((out / PROCESSES_FILE).read_text())
    except (OSError, ValueError):
        return {}
    alive = {}
    for role, entry in entries.items():
        with contextlib.suppress(KeyError, TypeError, ValueError):
            pid = int(entry["pid"])
            if pid != os.getpid() and process_start_ticks(pid) == entry["start"]:
                alive[role] = pid
    return alive


async def refuse_if_alive(out: Path, grace: float = 5.0) -> None:
    """Raise :class:`RunStillAlive` if a process of the run in ``out`` still runs after ``grace``
    seconds (children of a launcher that was just killed need a moment to follow it)."""
    deadline = time.monotonic() + grace
    while alive := living(out):
        if time.monotonic() >= deadline:
            names = ", ".join(f"{role} (pid {pid})" for role, pid in sorted(alive.items()))
            raise RunStillAlive(
                f"{out} is still being run by {names}: stop that run first (SIGTERM to its launcher)"
            )
        await asyncio.sleep(0.1)


def _forkserver_pid() -> int | None:
    # multiprocessing keeps its fork server's pid in a private attribute; it restarts a dead one
    # itself (ensure_running), but only when the next process is started.
    return getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)


@dataclass
class Supervisor:
    """Revives the run's services when they die and keeps ``OUT/processes.json`` current."""

    out: Path
    broker: Any  # protocol.broker.RunningBroker
    registry: Any  # registry.process.RegistryProcess
    recorder: Any = None  # protocol.recorder_process.RecorderProcess
    pool: Any = None  # scenarios.workers.WorkerPool
    interval: float = 0.25
    revived: list[dict[str, Any]] = field(default_factory=list)  # what was restarted, when
    _registered: dict[str, int] = field(default_factory=dict)
    _forkserver: int | None = None

    def pids(self) -> dict[str, int]:
        found = {"launcher": os.getpid()}
        for role, part in (("broker", self.broker), ("registry", self.registry), ("recorder", self.recorder)):
            process = getattr(part, "process", None)
            pid = getattr(process, "pid", None)
            if pid is not None:
                found[role] = pid
        if self.pool is not None:
            found.update(self.pool.pids())
            if (pid := _forkserver_pid()) is not None:
                found["forkserver"] = pid
        return found

    def register(self) -> None:
        """Write ``OUT/processes.json`` if the set of processes changed."""
        pids = self.pids()
        if pids != self._registered:
            write_register(self.out, pids)
            self._registered = pids

    async def check(self) -> None:
        """One round: revive what died, then register who runs."""
        if await asyncio.to_thread(self.broker.revive):
            self._note("broker")
        if self.registry.died:
            await self.registry.restart()
            self._note("registry")
        if self.recorder is not None and self.recorder.died:
            await asyncio.to_thread(self.recorder.restart)
            self._note("recorder")
        if self.pool is not None and not self.pool.stopping:
            pid = _forkserver_pid()
            if pid is not None and process_start_ticks(pid) is None:
                await asyncio.to_thread(multiprocessing.forkserver.ensure_running)
                pid = _forkserver_pid()
            if self._forkserver is not None and pid != self._forkserver:  # also when a takeover restarted it
                self._note("forkserver")
            self._forkserver = pid
        self.register()

    def _note(self, role: str) -> None:
        log.warning("the run's %s died; restarted it", role)
        self.revived.append({"process": role, "ms": int(time.time() * 1000)})

    async def run(self) -> None:
        """Check every ``interval`` seconds until cancelled; a failed round is logged and retried."""
        while True:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("supervising the run's processes failed; trying again")
            await asyncio.sleep(self.interval)
