"""The work queue: booked steps, executed one after another through the asset.

Steps run in the timeline's queue order (see `Timeline`), each as soon as the
machine is free and the product has arrived. Whenever the queue changes (a
booking, a release, a step starting or ending, a breakdown), its times are
packed again and every booking whose times moved is re-confirmed with its
product (a new informConfirm), so what the product holds is always what the
resource will do; without breakdowns a step ends exactly at its last confirmed
time. The machine does not start a booked step in the time of an open offer of a more
urgent class (a tentative hold, `Timeline.held_for`): it waits for that offer's acceptance,
rejection or expiry, each of which dispatches again. On a virtual clock the machine picks its next step only after everything
else due at that instant (dispatch timers sort last), so a product arriving at
the instant the machine frees up competes for it. When a step ends the resource documents it in the
product's AAS (over HTTP, at the address the registry gives) *before* it tells
the product, so a product that hears `inform` finds the documentation there.

Every work order is a row in the run database; the asset's own execution log
is the physical truth a restarted resource consults about a step it was running.
"""

from __future__ import annotations

import asyncio
import json
import logging

from agents.aas import build, docjson, record_chain
from agents.aas.ids import submodel_id
from agents.aas.store import WriteKind, WriteRejected, WriteRequest
from agents.persistence.tables import WorkOrderRecord
from agents.resource.timeline import Slot, Timeline, moved_from
from agents.runtime.role import Role
from protocol.bidding.effects import Note
from protocol.bidding.provider import Provider, PState
from protocol.elements import Bid, StepResult
from registry.client import HttpError
from shopfloor.asset import Asset, ExecutionRecord, Job

#: Answers that say the write will never be accepted (unlike a product that is down or restarting).
FINAL_REFUSALS = (401, 403, 409)

log = logging.getLogger(__name__)

#: What a breakdown does to booked work. A breakdown *during* a step always ends in the step
#: finishing late (the physical process resumes after the repair; `inform` carries the delay):
#: aborting it half-done and bidding it again would execute it twice. The policies differ for a
#: step due to *start* while the machine is down: `finish_late` waits for the repair,
#: `inform_failure` hands the step back with `informFailure` so the product bids it again.
BREAKDOWN_POLICIES = ("finish_late", "inform_failure")


class WorkQueue(Role):
    def __init__(self, asset: Asset, timeline: Timeline, *, breakdown_policy: str = "finish_late") -> None:
        if breakdown_policy not in BREAKDOWN_POLICIES:
            raise ValueError(f"breakdown_policy must be one of {BREAKDOWN_POLICIES}")
        self.asset = asset
        self.timeline = timeline
        self.breakdown_policy = breakdown_policy
        self.orders: dict[str, dict] = {}  # cfp id -> work order row
        self.running: str | None = None
        self._task: asyncio.Task | None = None
        self._timer = None  # the dispatch timer
        self.executed = 0
        self.busy_time = 0.0

    @property
    def provider(self):
        from agents.bidding.provider_role import BiddingProvider

        return self.agent.role(BiddingProvider)

    # --- reports from the provider ----------------------------------------------------------------

    def held(self, p: Provider, slot: Slot, bid: Bid) -> None:
        row = {
            "resource": self.agent.name,
            "job_id": f"{slot.job_id}/{p.cfp_id}",
            "product": p.call.product,
            "step": p.call.step,
            "conversation_id": p.conversation_id,
            "cfp_id": p.cfp_id,
            "capability": slot.capability,
            "state": "held",
            "ready": slot.ready,
            "start": slot.start,
            "end": slot.end,
            "setup": slot.setup,
            "duration": bid.duration,
            "transport": bid.transport,
            "price": bid.price,
            "product_aas": p.requester,
            "priority": p.call.priority,
            "params": json.dumps(p.call.parameters, sort_keys=True),
            "started": None,
            "finished": None,
        }
        self._save(p.cfp_id, row)

    def booked(self, p: Provider, slot: Slot) -> None:
        self._save(p.cfp_id, {**self.orders[p.cfp_id], "state": "booked"})
        self._status()
        self.schedule_dispatch()

    def released(self, p: Provider, slot: Slot | None, *, booked: bool) -> None:
        row = self.orders.pop(p.cfp_id, None)
        if row is not None:
            self._save(p.cfp_id, {**row, "state": "released"}, keep=False)
        if booked:
            self._status()
        self.schedule_dispatch()

    def frontier(self) -> tuple[float, str | None]:
        """From when the machine is free for the queue, and the capability it is set up for then."""
        now = self.agent.now()
        slot = self.timeline.slots.get(self.running) if self.running else None
        if slot is not None:
            return max(now, slot.end), slot.capability
        return max(now, self.asset.available_from(now)), self.asset.last_capability

    @property
    def tolerance(self) -> float:
        """Moves up to this (simulated units) are not re-confirmed.

        Exact on a virtual clock. On a wall clock the agents' own work takes time: a queue that
        runs late by the time messages, documentation and timers took (its first booking's
        promised start has passed) drifts by that much, which is no news for a product. Allowed:
        that lateness, at least 0.1 and at most 1 wall second; any larger move is re-confirmed.
        """
        clock = self.agent.clock
        if clock.kind == "virtual":
            return 1e-9
        wall_second = 1000.0 / getattr(clock, "time_scale", 1000.0)  # simulated units
        now = self.agent.now()
        first = min((s.start for s in self.timeline.pending() if s.booked), default=now)
        return min(max(0.1 * wall_second, now - first), wall_second)

    async def resync(self) -> None:
        """Pack the queue again; re-confirm every booking whose times moved with its product."""
        base, previous = self.frontier()
        for slot in self.timeline.repack(base, previous, self.tolerance, self.running):
            await self._reconfirm(slot)

    async def _reconfirm(self, slot: Slot) -> None:
        row = self.orders.get(slot.key)
        if row is not None:
            self._save(slot.key, {**row, "start": slot.start, "end": slot.end, "setup": slot.setup})
        p = self.provider.rounds.by_cfp.get(slot.key)
        if p is not None:
            await self.provider.reschedule(p, slot.start, slot.end)

    def _save(self, key: str, row: dict, keep: bool = True) -> None:
        self.agent.node.journal.put(WorkOrderRecord, row)  # first: it may refuse (Unstorable)
        if keep:
            self.orders[key] = row

    # --- execution --------------------------------------------------------------------------------

    def schedule_dispatch(self, at: float | None = None) -> None:
        """Pick the next step at `at` (default now) — on a virtual clock after all else due then."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.agent.finished:
            return
        now = self.agent.now()
        when = now if at is None else max(at, now)
        # A tuple first sorts after every (name, key) / ("eval", ...) order: the machine chooses
        # once every product that arrives at this instant has been queued.
        self._timer = self.agent.clock.call_at(when, self._dispatch, order=((), self.agent.name, "dispatch"))

    async def _dispatch(self) -> None:
        self._timer = None
        if self.running is not None:
            return
        slot = self.timeline.next_booked()
        if slot is None:
            return
        now = self.agent.now()
        if slot.ready > now:
            self.schedule_dispatch(slot.ready)
            return
        base, previous = self.frontier()
        if self.timeline.held_for(slot, base, previous) is not None:
            return  # a more urgent offer is open: its answer or expiry dispatches again
        self.running = slot.key
        self._task = asyncio.current_task()
        try:
            await self._execute(slot)
        finally:
            self.running = None
            self._task = None
        await self.resync()
        self.schedule_dispatch()

    async def on_stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _begin(self, slot: Slot, job: Job, fresh: bool) -> None:
        """The step leaves the queue: its real times are re-confirmed if they differ, the rest repacked."""
        if fresh:
            now = self.agent.now()
            previous = self.asset.last_capability
            setup = 0.0 if slot.capability == previous else slot.setup_change
            start = max(now, self.asset.available_from(now))
            promised = (slot.start, slot.end)
            tol = self.tolerance  # while the step is still the queue's first booking
            self.timeline.start(slot.key, now, start + setup + slot.duration, setup)
            if moved_from(promised[0], promised[1], slot.start, slot.end, tol):
                await self._reconfirm(slot)
        else:  # resumed after a restart: the asset's planned times stand
            self.timeline.start(slot.key, slot.start, slot.end, slot.setup)
        await self.resync()

    async def _execute(self, slot: Slot) -> None:
        p = self.provider.rounds.by_cfp.get(slot.key)
        row = self.orders.get(slot.key)
        if p is None or row is None or p.state is not PState.BOOKED:
            self.timeline.release(slot.key)
            return
        job = Job(slot.job_id, slot.capability, json.loads(row["params"]), row["product"])
        now = self.agent.now()
        down_until = self.asset.available_from(now)
        fresh = self.asset.job_status(job.job_id).state == "not_started"
        if self.breakdown_policy == "inform_failure" and down_until > now and fresh:
            # Broken down when the step should start: hand it back for bidding instead of waiting.
            self.timeline.release(slot.key)
            self._save(slot.key, {**row, "state": "failed"}, keep=False)
            self.orders.pop(slot.key, None)
            text = f"{self.asset.name} is down until {down_until:g}; the step was not started"
            await self.provider.complete_or_fail(p, p.fail("breakdown", text, self.agent.now_ms()))
            self._status()
            return
        await self._begin(slot, job, fresh)
        row = self.orders.get(slot.key, row)
        # The asset's own start is the truth: a step resumed after a takeover started before now.
        status = self.asset.job_status(job.job_id)
        began = status.record.start if status.state != "not_started" and status.record else now
        self._save(slot.key, {**row, "state": "running", "started": began})
        self._status(current=job.job_id, product=row["product"])
        record = await self.asset.execute(job, self.agent.clock, previous_capability=self._previous())
        self.executed += 1
        self.busy_time += record.end - record.start
        self.timeline.release(slot.key)
        row = self.orders.get(slot.key, row)
        times = {"started": record.start, "finished": record.end}  # as the asset logged them
        if record.outcome != "done":
            reason = record.reason or "the asset reported a failure"
            self._save(slot.key, {**row, "state": "failed", **times}, keep=False)
            self.orders.pop(slot.key, None)
            await self.provider.complete_or_fail(p, p.fail("execution", reason, self.agent.now_ms()))
        elif (refusal := await self._document(row, record)) is not None:
            # The product refused the record for good (the award no longer stands, or it was
            # never ours): the step is not documented, so it is not done; the requester hears so.
            self.agent.note(Note("documentation-refused", f"{row['product']}/{row['step']}: {refusal}"))
            self._save(slot.key, {**row, "state": "failed", **times}, keep=False)
            self.orders.pop(slot.key, None)
            text = f"the product refused the step's documentation: {refusal}"
            await self.provider.complete_or_fail(
                p, p.fail("documentation-refused", text, self.agent.now_ms())
            )
        else:
            self._save(slot.key, {**row, "state": "done", **times}, keep=False)
            self.orders.pop(slot.key, None)
            result = StepResult(
                resource=self.agent.name,
                started=record.start,
                finished=record.end,
                location=self.asset.location,
                breakdown_delay=record.breakdown_delay,
            )
            await self.provider.complete_or_fail(p, p.complete(result, self.agent.now_ms()))
        self._status()

    def _previous(self) -> str | None:
        return self.asset.last_capability

    async def _document(self, row: dict, record: ExecutionRecord) -> str | None:
        """Document the step in the product's AAS, retrying until it is there; the refusal if refused.

        The product's process may be down (crashed, restarting): the step is done physically,
        so we keep trying (the write is idempotent), and only then tell the product. A final
        refusal (401, 403, 409: we may not write this record) ends the retries: retrying it
        forever kept the work order running and the machine's queue stalled behind it.
        """
        delay = 0.05
        while True:
            try:
                if await self._document_once(row, record):
                    return None
            except asyncio.CancelledError:
                raise
            except (HttpError, WriteRejected) as exc:
                if exc.status in FINAL_REFUSALS:
                    return f"{exc.status} {exc.text}"
                log.info("%s: documenting %s/%s failed (%s); retrying", self.agent.name, row["product"],
                         row["step"], exc)  # fmt: skip
            except Exception as exc:
                log.info(
                    "%s: documenting %s/%s failed (%s); retrying",
                    self.agent.name,
                    row["product"],
                    row["step"],
                    exc,
                )
            self.agent.node.directory.forget(row["product_aas"])  # its endpoint may have moved
            with self.agent.clock.waiting():  # a virtual clock may move on meanwhile (e.g. to the restart)
                await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _document_once(self, row: dict, record: ExecutionRecord) -> bool:
        """PATCH the step's record in the product's ProcessDocumentation: who did it, when, outcome."""
        product = row["product"]
        entry = await self.agent.node.directory.by_id(row["product_aas"])
        if entry is None or entry.base_url is None:
            return False
        body = docjson.completion(row["step"], record.start, record.end, self.agent.name)
        body = record_chain.sign_completion(self.agent.node.signing_secret, product, row["step"], body)
        doc_id = submodel_id(product, "ProcessDocumentation", self.agent.node.ns)
        path = build.step_id_short(row["step"])
        node = self.agent.node
        if entry.base_url == node.base_url and node.store.owner_of(doc_id):
            # The product lives in this process: hand the write to its owner exactly as the
            # AAS server's PATCH route would, without the HTTP round trip.
            owner = node.store.owner_of(doc_id)
            op = WriteRequest(WriteKind.PATCH, doc_id, path, None, owner, body, caller=self.agent.name)
            await node.store.submit(op)
            return True
        await node.aas_client(entry.base_url, self.agent.name).patch_element(doc_id, path, body)
        return True

    def _status(self, current: str | None = None, product: str | None = None) -> None:
        sm_id = submodel_id(self.agent.name, "Status", self.agent.node.ns)
        store = self.agent.node.store
        sm = store.get_submodel(sm_id)
        if sm is None:
            return
        queue = sum(1 for r in self.orders.values() if r["state"] in ("booked", "running"))
        build.update_status(
            sm,
            state="busy" if current else ("waiting" if queue else "idle"),
            queue_length=queue,
            current_step=current or "",
            current_product=product or "",
            updated_at=self.agent.now(),
        )
        store.changed(sm_id)

    def on_crash(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()  # the asset's log keeps "started": the restarted agent resumes the step

    # --- recovery ---------------------------------------------------------------------------------

    async def recover(self) -> None:
        rows = self.agent.node.state.open_work_orders(self.agent.name)
        # Running first, then in the order of the promised starts: the queue as it was promised.
        rows = sorted(rows, key=lambda r: (r.state != "running", r.start, r.cfp_id))
        for r in rows:
            row = r.model_dump()
            self.orders[row["cfp_id"]] = row
            slot = Slot(
                row["cfp_id"],
                f"{row['product']}/{row['step']}",
                row["capability"],
                row["ready"],
                row["start"],
                row["end"],
                row["setup"],
                booked=row["state"] != "held",
                duration=row["duration"],
                setup_change=self._setup_change(row),
                rank=(row["priority"],),  # a recovered booking keeps its class
            )
            self.timeline.hold(slot, len(self.timeline.order))
            if row["state"] != "held":
                self.asset.reserve(
                    Job(slot.job_id, slot.capability, json.loads(row["params"]), row["product"])
                )

    def _setup_change(self, row: dict) -> float:
        job = Job(
            f"{row['product']}/{row['step']}", row["capability"], json.loads(row["params"]), row["product"]
        )
        try:
            estimate = self.asset.estimate(job, previous_capability=None)
        except Exception:
            estimate = None
        return estimate.setup if estimate is not None else row["setup"]

    async def on_start(self) -> None:
        """Work orders that were running resume (the asset knows how far they got); then the queue goes on."""
        self._status()
        self.schedule_dispatch()
