"""ProcessDocumentation step records written directly as AAS JSON.

Every negotiated step is documented two or three times (award, booking,
completion), each time a collection of a dozen properties. Building those as
basyx objects and serialising them for the database mirror cost about 7 ms per
step, more than the rest of a negotiation. Their shapes are fixed, so they are
written here as the very JSON basyx produces for :func:`build.step_record_element`
(tests/test_aas_build.py proves the equality) and become basyx objects only when
someone reads them as objects (the AAS server's element routes, AASX export).
"""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any

from basyx.aas.model.datatypes import xsd_repr

from protocol.elements import capability_semantic_id, reference_json, xsd_double

from .build import OUTCOMES, StepRecord, TimeValue, step_id_short
from .semantics import ProcessDocumentation as PD

Json = dict[str, Any]


def prop(id_short: str, text: str, value_type: str, semantic_id: str | None = None) -> Json:
    """A Property whose lexical value ``text`` is already in ``value_type``'s XSD form."""
    out: Json = {"idShort": id_short, "modelType": "Property"}
    if semantic_id:
        out["semanticId"] = reference_json(semantic_id)
    out["value"] = text
    out["valueType"] = value_type
    return out


def double(id_short: str, value: float, semantic_id: str | None = None) -> Json:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"non-finite number {value!r} refused: a price or time of inf/NaN is a bug upstream")
    return prop(id_short, xsd_double(value), "xs:double", semantic_id)


def time_prop(id_short: str, value: TimeValue, semantic_id: str | None = None) -> Json:
    """Aware ``datetime`` -> ``xs:dateTime``; simulated time units -> ``xs:double`` (as build.time_prop)."""
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
            raise ValueError(f"xs:dateTime values must be timezone-aware, got naive {value.isoformat()}")
        return prop(id_short, xsd_repr(value), "xs:dateTime", semantic_id)
    return double(id_short, value, semantic_id)


def smc(id_short: str, items: list[Json], semantic_id: str | None = None) -> Json:
    out: Json = {"idShort": id_short, "modelType": "SubmodelElementCollection"}
    if semantic_id:
        out["semanticId"] = reference_json(semantic_id)
    if items:
        out["value"] = items
    return out


def step_record(record: StepRecord) -> Json:
    """The ``StepNNN`` collection of a record, as ``to_json(build.step_record_element(record))``."""
    if record.outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}, got {record.outcome!r}")
    items = [
        prop("StepIndex", str(record.index), "xs:int", PD.STEP_INDEX),
        prop("RequiredCapability", capability_semantic_id(record.capability), "xs:anyURI", PD.CAPABILITY),
        prop("Outcome", record.outcome, "xs:string", PD.OUTCOME),
    ]
    if record.call_for_proposal_id:
        items.append(
            prop("CallForProposalId", record.call_for_proposal_id, "xs:string", PD.CALL_FOR_PROPOSAL_ID)
        )
    if record.bids:
        bids = []
        for i, bid in enumerate(record.bids, start=1):
            inner = [
                prop("Resource", bid.resource, "xs:string", PD.BID_RESOURCE),
                time_prop("Start", bid.start, PD.BID_START),
                time_prop("Completion", bid.completion, PD.BID_COMPLETION),
                double("Price", bid.price, PD.BID_PRICE),
            ]
            if bid.score is not None:
                inner.append(double("Score", bid.score, PD.BID_SCORE))
            if bid.proposal_id:
                inner.append(prop("ProposalId", bid.proposal_id, "xs:string"))
            if bid.reason:
                inner.append(prop("SelectionReason", bid.reason, "xs:string", PD.SELECTION_REASON))
            bids.append(smc(f"Bid{i:02d}", inner, PD.BID))
        items.append(smc("Bids", bids, PD.BIDS))
    for id_short, text, sem in (
        ("Winner", record.winner, PD.WINNER),
        ("SelectionReason", record.reason, PD.SELECTION_REASON),
        ("SelectionPolicy", record.policy, PD.SELECTION_POLICY),
        ("Resource", record.resource, PD.RESOURCE),
        ("OutcomeText", record.outcome_text, PD.OUTCOME_TEXT),
    ):
        if text:
            items.append(prop(id_short, text, "xs:string", sem))
    for id_short, value, sem in (
        ("ScheduledStart", record.scheduled_start, PD.SCHEDULED_START),
        ("ScheduledEnd", record.scheduled_end, PD.SCHEDULED_END),
        ("Started", record.started, PD.STARTED),
        ("Finished", record.finished, PD.FINISHED),
    ):
        if value is not None:
            items.append(time_prop(id_short, value, sem))
    if record.recorded_at is not None:
        items.append(time_prop("RecordedAt", record.recorded_at, PD.RECORDED_AT))
    return smc(step_id_short(record.index), items, PD.STEP_RECORD)


def completion(index: int, started: TimeValue, finished: TimeValue, resource: str) -> Json:
    """What a resource writes into a product's record when it has executed the step."""
    return smc(
        step_id_short(index),
        [
            time_prop("Started", started, PD.STARTED),
            time_prop("Finished", finished, PD.FINISHED),
            prop("Resource", resource, "xs:string", PD.RESOURCE),
            prop("Outcome", "completed", "xs:string", PD.OUTCOME),
        ],
    )


def child_text(collection: Json | None, id_short: str) -> str | None:
    """The lexical value of a Property child (None if absent)."""
    if collection is None:
        return None
    for item in collection.get("value") or ():
        if item.get("idShort") == id_short:
            value = item.get("value")
            return value if isinstance(value, str) else None
    return None
