"""The manufacturing driver: decides the next step from the product's own documentation.

Like the reference platform's MDS, it reads which plan steps the process
documentation shows as completed, calls for proposals for the first one that is
not, and hands control to the bidding requester; when every step is documented
as completed it adds the Digital Nameplate and ends. Because the decision reads
only the documentation, a restarted product continues at the right step.

The product decides its own progress: a record counts only when it agrees with
the step's award (the Resource it names is the resource the step was awarded
to), and an inform counts only when it agrees with the award and the record
(same resource, same times). Only the awardee can write the record at all
(agents/product/agent.py); a contradiction is noted (``contradictory-record``)
and never acted on.
"""

from __future__ import annotations

import datetime as dt

from agents.aas import build, docjson
from agents.aas.ids import submodel_id
from agents.bidding.requester_role import BiddingRequester
from agents.persistence.tables import ProductRecord, StepRecord
from agents.product import documentation
from agents.product.notifier import Notifier
from agents.product.order import PlannedStep, ProductOrder
from agents.runtime.role import Role
from protocol.bidding.effects import (
    Awarded,
    CallIssued,
    Completed,
    Effect,
    Failed,
    Note,
    Reawarded,
    Rebid,
    Scheduled,
)
from protocol.bidding.requester import Requester, RState
from protocol.elements import StepCall, StepResult
from protocol.selection import policy_name


class ManufacturingDriver(Role):
    def __init__(self, order: ProductOrder, record: dict, docs: documentation.Documentation) -> None:
        self.order = order
        self.record = record  # the ProductRecord row (status, location)
        self.steps: dict[int, dict] = {}  # StepRecord rows by index
        self.docs = docs  # the ProcessDocumentation's records
        self._opening: set[int] = set()  # steps whose call is being prepared (see advance)

    # --- helpers ----------------------------------------------------------------------------------

    @property
    def requester(self) -> BiddingRequester:
        return self.agent.role(BiddingRequester)

    @property
    def notifier(self) -> Notifier:
        return self.agent.role(Notifier)

    def next_step(self) -> PlannedStep | None:
        """The first plan step not completed (documented so, in agreement with its award)."""
        for s in self.order.steps:
            if not self.step_completed(s.index):
                return s
        return None

    def plan_steps(self) -> set[int]:
        return {s.index for s in self.order.steps}

    def _open_procedure(self, step: int) -> Requester | None:
        agent = getattr(self, "agent", None)  # (a write may come before the roles are bound)
        role = next((x for x in agent.roles if isinstance(x, BiddingRequester)), None) if agent else None
        return role.open_for_step(step) if role is not None else None

    def awardee(self, step: int) -> str | None:
        """The resource whose award of ``step`` stands now (None: none does).

        The open procedure decides when there is one (awarding or confirmed: a resource documents
        after it confirmed, which the product may not have read yet); otherwise, e.g. in the
        moment after a restart before the procedures are resumed, the step's row does.
        """
        r = self._open_procedure(step)
        if r is not None:
            if r.state in (RState.AWARDING, RState.CONFIRMED) and r.winner is not None:
                return r.winner.bid.resource
            return None
        row = self.steps.get(step) or {}
        return row.get("resource") if row.get("status") in ("negotiating", "scheduled") else None

    def _awarded_to(self, step: int) -> str | None:
        """The resource the step was last awarded to (the open procedure's winner, else its row's)."""
        r = self._open_procedure(step)
        if r is not None and r.winner is not None:
            return r.winner.bid.resource
        return self.steps.get(step, {}).get("resource")

    def _save_product(self, **changes: object) -> None:
        self.record.update(changes)
        self.agent.node.journal.put(ProductRecord, self.record)

    def _save_step(self, step: int, **changes: object) -> None:
        row = self.steps.get(step)
        if row is None:
            plan = next(s for s in self.order.steps if s.index == step)
            row = {"product": self.agent.name, "step": step, "capability": plan.capability, "status": "pending",
                   "conversation_id": None, "resource": None, "rounds": 0, "cfp_sim": None,
                   "scheduled_start": None, "scheduled_end": None, "started": None, "finished": None,
                   "price": None, "reason": ""}  # fmt: skip
            self.steps[step] = row
        row.update(changes)
        self.agent.node.journal.put(StepRecord, row)

    def step_completed(self, step: int) -> bool:
        """The record says completed and names the resource the step was awarded to."""
        if self.docs.outcome(step) != "completed":
            return False
        if self.steps.get(step, {}).get("status") == "done":
            return True
        awarded = self._awarded_to(step)
        return awarded is not None and docjson.child_text(self.docs.records[step], "Resource") == awarded

    def _disagreement(self, step: int, r: Requester, result: StepResult) -> str | None:
        """Why an inform of ``step`` does not agree with its award and record (None: it agrees)."""
        awarded = r.winner.bid.resource if r.winner is not None else self._awarded_to(step)
        if result.resource != awarded:
            return f"the inform names {result.resource}, the step was awarded to {awarded}"
        record = self.docs.records.get(step)
        if self.docs.outcome(step) != "completed":
            return f"the record of step {step} does not say completed ({self.docs.outcome(step)})"
        documented = docjson.child_text(record, "Resource")
        if documented != result.resource:
            return f"the record names {documented}, the inform {result.resource}"
        for name, told in (("Started", result.started), ("Finished", result.finished)):
            written = _number(docjson.child_text(record, name))
            if written is not None and abs(written - told) > 1e-6 * max(1.0, abs(told)):
                return f"the record's {name} is {written:g}, the inform's {told:g}"
        return None

    def _settle_documented(self) -> None:
        """Step rows follow the documentation: a step the resource documented as completed is done,
        even if its inform never arrived (lost with a crash; the product went on from its AAS)."""
        for s in self.order.steps:
            if self.steps.get(s.index, {}).get("status") == "done" or not self.step_completed(s.index):
                continue  # (a record counts only when it names the resource awarded the step)
            record = self.docs.records[s.index]
            self._save_step(
                s.index,
                status="done",
                started=_number(docjson.child_text(record, "Started")),
                finished=_number(docjson.child_text(record, "Finished")),
                resource=docjson.child_text(record, "Resource"),
            )

    def _document(self, step: int, **fields: object) -> None:
        plan = next(s for s in self.order.steps if s.index == step)
        record = build.StepRecord(index=step, capability=plan.capability, **fields)  # type: ignore[arg-type]
        self.docs.merge(step, docjson.step_record(record), self.agent.name)

    # --- lifecycle --------------------------------------------------------------------------------

    async def on_start(self) -> None:
        if self.record["status"] in ("completed", "failed"):
            if self.record["status"] == "completed":  # restarted after its end: the AAS as it was
                self._put_nameplate(self.record.get("completed_sim") or self.agent.now())
            self.agent.finish()
            return
        if self.record["status"] == "new":
            self._save_product(status="accepted", accepted_sim=self.agent.now())
            self.notifier.notify("manufacturing-accepted", priority=self.order.priority)
        await self.advance()

    async def advance(self) -> None:
        """Start the next step if none is under way (idempotent: safe to call again)."""
        if self.agent.finished:
            return
        self._settle_documented()
        for r in [r for r in self.requester.machines.values() if not r.done]:
            if self.step_completed(r.call.step):  # resumed open beside it, or its deadline came first
                await self.requester.settle(r)
        step = self.next_step()
        if step is None:
            return await self._complete()
        if self.requester.open_for_step(step.index) is not None or step.index in self._opening:
            return None
        release = max(self.order.release, self.record.get("ready_at") or 0.0)
        if release > self.agent.now():
            self.agent.set_timer("release", release, self.advance)
            return None
        self._save_product(status="running")
        call = StepCall(
            product=self.agent.name,
            step=step.index,
            capability=step.capability,
            location=self.record["location"],
            release=max(release, self.agent.now()),
            priority=self.order.priority,
            due=self.order.due,
            remaining_work=self.order.remaining_work(step.index),
            alternatives=" ".join(step.alternatives),
            parameters=dict(step.parameters),
        )
        self._save_step(step.index, status="negotiating", cfp_sim=self.agent.now())
        # Two triggers may meet here (a restart's on_start and a replayed inform of the previous
        # step): the call waits for the registry before its conversation exists, and without
        # this mark both would open one, and two resources would execute the step.
        self._opening.add(step.index)
        try:
            r = await self.requester.request(call)
        finally:
            self._opening.discard(step.index)
        self._save_step(step.index, conversation_id=r.conversation_id)
        return None

    async def _complete(self) -> None:
        self._put_nameplate(self.agent.now())
        self._save_product(status="completed", completed_sim=self.agent.now())
        self.notifier.notify("manufacturing-completed", flow_time=self.agent.now() - self.order.release)
        self.agent.finish()

    def _put_nameplate(self, completed: float) -> None:
        """The Digital Nameplate of the finished product, dated by the plant's clock (idempotent:
        a product restarted after its end rebuilds the same one, its stored shell predates it)."""
        ns = self.agent.node.ns
        made = dt.datetime.fromtimestamp(self.agent.clock.epoch_ms(completed) / 1000, dt.UTC)
        sm = build.nameplate(
            submodel_id(self.agent.name, "Nameplate", ns),
            manufacturer_name="twinbid plant " + ns,
            product_designation=self.order.product_type,
            uri_of_product=self.agent.aas_id,
            order_code=self.agent.name,
            address=build.Address(street="Factory Road 1", zipcode="00000", city="Plant", national_code="DE"),
            serial_number=self.agent.name,
            year_of_construction=str(made.year),
            date_of_manufacture=made.date(),
            product_type=self.order.product_type,
        )
        store = self.agent.node.store
        if store.get_submodel(sm.id) is None:
            store.put_submodel(sm, owner=self.agent.name)
            shell = store.get_shell(self.agent.aas_id)
            build.link(shell, sm)
            store.changed(shell.id)

    # --- bidding outcomes -------------------------------------------------------------------------

    async def on_outcome(self, r: Requester, outcome: Effect) -> None:
        step = r.call.step
        if not isinstance(outcome, Completed) and (
            self.steps.get(step, {}).get("status") == "done" or self.docs.outcome(step) == "completed"
        ):
            # The step is done (its documentation says so) and stays done: a late re-confirmation
            # from a restarted resource, answering the status query of a restarted product, once
            # turned the step row back to 'scheduled' and the record's outcome with it (chaos soak).
            # Counted, not noted: with steps that take no time the resource documents the finish
            # before the product has read its informConfirm, the usual order, not a fault.
            self.agent.counters["after-done"] += 1
            return
        match outcome:
            case CallIssued():
                self._save_step(step, rounds=outcome.round)
            case Awarded():
                bids = [
                    build.BidRecord(
                        resource=x.offer.bid.resource,
                        start=x.offer.bid.earliest_start,
                        completion=x.offer.bid.completion,
                        price=x.offer.bid.price,
                        score=x.score,
                        proposal_id=x.offer.proposal_id,
                        reason=x.reason,
                    )
                    for x in outcome.ranking
                ]
                winner = outcome.winner.bid
                self._document(
                    step,
                    call_for_proposal_id=r.cfp_id,
                    bids=bids,
                    winner=winner.resource,
                    reason=outcome.ranking[0].reason,
                    policy=policy_name(r.policy),
                    outcome="negotiating",
                    # Durable with the acceptance (same commit): with steps that take no time the
                    # resource documents the finish before the product reads its confirmation, which
                    # is then not documented; a crash in between lost the bids and the winner, and
                    # the restarted product's record held only the resource's part (chaos soak).
                )
                self._save_step(step, resource=winner.resource, price=winner.price)
            case Reawarded():
                # The bids documented with the first award stay; the winner and the reason change.
                winner = outcome.winner.offer.bid
                reason = f"{outcome.reason}; runner-up: {outcome.winner.reason}"
                self._document(step, winner=winner.resource, reason=reason, outcome="negotiating")
                self._save_step(step, resource=winner.resource, price=winner.price)
                self.notifier.notify(
                    "step-reawarded", step=step, resource=winner.resource, reason=outcome.reason
                )
            case Scheduled():
                b = outcome.booking
                self._document(
                    step,
                    resource=b.resource,
                    scheduled_start=b.start,
                    scheduled_end=b.completion,
                    outcome="scheduled",
                )
                self._save_step(
                    step,
                    status="scheduled",
                    resource=b.resource,
                    scheduled_start=b.start,
                    scheduled_end=b.completion,
                )
                r.expect_completion(self.agent.clock.epoch_ms(b.completion))
                self.notifier.notify(
                    "step-scheduled", step=step, resource=b.resource, start=b.start, end=b.completion
                )
            case Completed():
                res = outcome.result
                problem = self._disagreement(step, r, res)
                if problem is not None:
                    self.agent.note(
                        Note("contradictory-record", f"step {step}: {problem}; not counted as done")
                    )
                    return
                self._save_step(
                    step, status="done", started=res.started, finished=res.finished, resource=res.resource
                )
                self._save_product(location=res.location, ready_at=res.finished)
                self.notifier.notify(
                    "step-completed", step=step, resource=res.resource, finished=res.finished
                )
                await self.advance()
            case Rebid():
                self.notifier.notify("step-rebid", step=step, reason=outcome.reason)
            case Failed():
                self._document(step, outcome="failed", outcome_text=outcome.reason)
                self._save_step(step, status="failed", reason=outcome.reason)
                self._save_product(
                    status="failed", reason=f"step {step}: {outcome.reason}", completed_sim=self.agent.now()
                )
                self.notifier.notify("step-failed", step=step, reason=outcome.reason)
                self.notifier.notify("manufacturing-failed", reason=outcome.reason)
                self.agent.finish()


def _number(text: str | None) -> float | None:
    """A documented time in simulated units (xs:double); None if absent or a calendar time."""
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None
