"""Common machinery of the simulated assets: the execution log, idempotent and resumable execute.

Default physical interruption policy (documented in ``docs/shopfloor.md``): the equipment keeps
working through a crash of its agent process. Before a job's time starts to run, a ``started``
entry with the planned setup, duration, breakdown delay and end is on disk; when it ends, a
``finished`` entry with the record. After a restart:

* a job with a ``finished`` entry and outcome ``done`` is never executed again: ``execute()``
  returns the logged record;
* a job with only a ``started`` entry is *resumed*: ``execute()`` waits out the remaining time, from
  the recorded start and planned duration (its planned end), and records ``resumed=True``; if the
  planned end has already passed it finishes at once, recording the planned end as the end;
* a job whose last attempt ``failed`` (it never started: item missing, warehouse full) is attempted
  again by a new ``execute()`` call (``attempt`` counts).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from abc import abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .asset import Asset, Estimate, ExecutionRecord, Job, JobStatus
from .breakdowns import Breakdowns
from .execution_log import ExecutionLog

if TYPE_CHECKING:
    from .clock import Clock

__all__ = ["SimulatedAsset"]

log = logging.getLogger(__name__)


@dataclass
class _JobEntry:
    state: str  # "started" | "finished"
    started: dict[str, Any] | None
    record: ExecutionRecord | None
    attempts: int


class SimulatedAsset(Asset):
    """Base class of :class:`~shopfloor.workstation.Workstation` and
    :class:`~shopfloor.warehouse.Warehouse`.

    Subclasses set their own fields first, then call ``super().__init__``, which replays the log
    (calling :meth:`_on_entry` for every entry, exactly as when the entry was first written).
    ``parallel`` is how many jobs the equipment works on at once; further ``execute()`` calls wait.
    """

    def __init__(
        self,
        name: str,
        *,
        location: str = "",
        cost_rate: float = 0.0,
        seed: object = 0,
        log_path: str | os.PathLike[str] | None = None,
        breakdowns: Breakdowns | None = None,
        parallel: int = 1,
    ) -> None:
        self.name = name
        self.location = location
        self.cost_rate = float(cost_rate)
        self.seed = seed
        self.breakdowns = breakdowns
        self._sem = asyncio.Semaphore(max(1, int(parallel)))
        self._running: dict[str, asyncio.Future[None]] = {}
        self._jobs: dict[str, _JobEntry] = {}
        self._last_capability: str | None = None
        self.log = ExecutionLog(log_path)
        for entry in self.log:
            self._index(entry)
            self._on_entry(entry)

    # -- to implement ----------------------------------------------------------------------
    @abstractmethod
    def _plan(self, job: Job, previous_capability: str | None) -> Estimate | None:
        """Setup and duration for ``job`` (deterministic per job), or None if it is not offered."""

    def _problem(self, job: Job) -> str | None:
        """Why ``job`` cannot be done right now (e.g. warehouse full), or None."""
        return None

    def _on_entry(self, entry: dict[str, Any]) -> None:
        """Apply the physical effect of a log entry (live and on replay)."""

    # -- Asset -----------------------------------------------------------------------------
    def estimate(self, job: Job, *, previous_capability: str | None) -> Estimate | None:
        if job.capability not in self.capabilities():
            return None
        if self._problem(job) is not None:
            return None
        return self._plan(job, previous_capability)

    def job_status(self, job_id: str) -> JobStatus:
        entry = self._jobs.get(job_id)
        if entry is None:
            return JobStatus("not_started", None)
        if entry.state == "finished":
            return JobStatus("finished", entry.record)
        assert entry.started is not None
        return JobStatus("started", self._record_from_started(entry.started, outcome="running"))

    def available_from(self, t: float) -> float:
        if self.breakdowns is None:
            return t
        until = self.breakdowns.down_until(t)
        return t if until is None else until

    @property
    def last_capability(self) -> str | None:
        """Capability of the last job that started here (physical set-up state), from the log."""
        return self._last_capability

    def records(self) -> list[ExecutionRecord]:
        """Records of all finished jobs (latest attempt per job), in log order."""
        return [e.record for e in self._jobs.values() if e.state == "finished" and e.record is not None]

    def describe(self) -> dict[str, Any]:
        data = super().describe()
        data["kind"] = type(self).__name__.lower()
        if self.breakdowns is not None:
            data["mtbf"] = self.breakdowns.mtbf
            data["mttr"] = self.breakdowns.mttr
        return data

    def close(self) -> None:
        self.log.close()

    async def execute(self, job: Job, clock: Clock, *, previous_capability: str | None) -> ExecutionRecord:
        loop = asyncio.get_running_loop()
        while True:
            entry = self._jobs.get(job.job_id)
            if entry is not None and entry.state == "finished" and entry.record is not None:
                if entry.record.outcome == "done":
                    return entry.record
            running = self._running.get(job.job_id)
            if running is None:
                break
            # The same job is already executing here (a duplicate request): wait for it.
            with clock.waiting():
                await asyncio.shield(running)
        done: asyncio.Future[None] = loop.create_future()
        self._running[job.job_id] = done
        try:
            with clock.waiting():
                await self._sem.acquire()
            try:
                entry = self._jobs.get(job.job_id)
                if entry is not None and entry.state == "started":
                    return await self._resume(job, entry, clock)
                if entry is not None and entry.record is not None and entry.record.outcome == "done":
                    return entry.record
                return await self._run(job, clock, previous_capability, (entry.attempts if entry else 0) + 1)
            finally:
                self._sem.release()
        finally:
            del self._running[job.job_id]
            done.set_result(None)

    # -- internals -------------------------------------------------------------------------
    async def _run(
        self, job: Job, clock: Clock, previous_capability: str | None, attempt: int
    ) -> ExecutionRecord:
        start = clock.now()
        problem = (
            f"capability {job.capability!r} not offered by {self.name}"
            if job.capability not in self.capabilities()
            else self._problem(job)
        )
        plan = None if problem else self._plan(job, previous_capability)
        if plan is None:
            record = ExecutionRecord(
                job_id=job.job_id,
                capability=job.capability,
                start=start,
                end=start,
                setup=0.0,
                duration=0.0,
                breakdown_delay=0.0,
                outcome="failed",
                product=job.product,
                asset=self.name,
                params=dict(job.params),
                reason=problem or "cannot plan the job",
                start_ms=clock.epoch_ms(start),
                end_ms=clock.epoch_ms(start),
                attempt=attempt,
            )
            self._write({"event": "finished", **record.to_dict()})
            return record
        work = plan.setup + plan.duration
        if self.breakdowns is not None:
            end, delay, hits = self.breakdowns.finish(start, work)
        else:
            end, delay, hits = start + work, 0.0, []
        started = {
            "event": "started",
            **job.to_dict(),
            "asset": self.name,
            "attempt": attempt,
            "start": start,
            "end": end,
            "setup": plan.setup,
            "duration": plan.duration,
            "breakdown_delay": delay,
            "breakdowns": [[b.at, b.repair] for b in hits],
            "start_ms": clock.epoch_ms(start),
            "end_ms": clock.epoch_ms(end),
            "origin_ms": clock.origin_epoch_ms,
        }
        self._write(started)
        if end > clock.now():
            await clock.sleep_until(end)
        return self._finish(started, resumed=False)

    async def _resume(self, job: Job, entry: _JobEntry, clock: Clock) -> ExecutionRecord:
        started = entry.started
        assert started is not None
        if started.get("capability") != job.capability:
            log.warning(
                "%s: job %s was started as %r, asked to execute %r; resuming what was started",
                self.name,
                job.job_id,
                started.get("capability"),
                job.capability,
            )
        start, end = self._times_in(started, clock)
        log.info("%s: resuming job %s (planned end %.3f, now %.3f)", self.name, job.job_id, end, clock.now())
        if end > clock.now():
            await clock.sleep_until(end)
        started = {**started, "start": start, "end": end}
        return self._finish(started, resumed=True)

    @staticmethod
    def _times_in(started: dict[str, Any], clock: Clock) -> tuple[float, float]:
        """The logged start and planned end in ``clock``'s frame (same origin: the logged floats)."""
        if started.get("origin_ms") == clock.origin_epoch_ms:
            return float(started["start"]), float(started["end"])
        return clock.from_epoch_ms(int(started["start_ms"])), clock.from_epoch_ms(int(started["end_ms"]))

    def _finish(self, started: dict[str, Any], *, resumed: bool) -> ExecutionRecord:
        record = self._record_from_started(started, outcome="done")
        record.resumed = resumed
        self._write({"event": "finished", **record.to_dict()})
        return record

    def _record_from_started(self, started: dict[str, Any], *, outcome: str) -> ExecutionRecord:
        return ExecutionRecord(
            job_id=started["job_id"],
            capability=started["capability"],
            start=float(started["start"]),
            end=float(started["end"]),
            setup=float(started["setup"]),
            duration=float(started["duration"]),
            breakdown_delay=float(started["breakdown_delay"]),
            outcome=outcome,
            product=started.get("product", ""),
            asset=started.get("asset", self.name),
            params=dict(started.get("params") or {}),
            start_ms=started.get("start_ms"),
            end_ms=started.get("end_ms"),
            attempt=int(started.get("attempt", 1)),
            breakdowns=[list(b) for b in started.get("breakdowns", [])],
        )

    def _write(self, entry: dict[str, Any]) -> None:
        entry = {**entry, "wall_ms": time.time_ns() // 1_000_000}
        self.log.append(entry)
        self._index(entry)
        self._on_entry(entry)

    def _index(self, entry: dict[str, Any]) -> None:
        event = entry.get("event")
        job_id = entry.get("job_id")
        if job_id is None or event not in ("started", "finished"):
            return
        prev = self._jobs.get(job_id)
        attempts = prev.attempts if prev else 0
        if event == "started":
            self._jobs[job_id] = _JobEntry(
                "started", entry, None, max(attempts, int(entry.get("attempt", 1)))
            )
            self._last_capability = entry.get("capability")
        else:
            record = ExecutionRecord.from_dict(entry)
            started = prev.started if prev is not None and prev.state == "started" else None
            self._jobs[job_id] = _JobEntry("finished", started, record, max(attempts, record.attempt))
