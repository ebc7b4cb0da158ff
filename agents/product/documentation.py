"""The product's ProcessDocumentation: written by the product (bidding) and by resources (execution).

Both writers merge into the step's record child by child, and a finished
outcome is never overwritten by an earlier-phase one (a resource may report
completion before the product has recorded the booking, when a step takes no
time). Every change is mirrored into the run database so a restarted product
rebuilds the same submodel.
"""

from __future__ import annotations

import json

from basyx.aas import model
from sqlmodel import select

from agents.aas import build
from agents.aas.io import element_from_json, to_json
from agents.persistence.database import Database
from agents.persistence.journal import Journal
from agents.persistence.tables import DocumentationRecord

FINAL = ("completed", "failed")


def outcome_of(record: model.SubmodelElementCollection | None) -> str | None:
    if record is None:
        return None
    value = build.element_value(build.child(record, "Outcome"))
    return str(value) if value is not None else None


def merge_record(
    doc: model.Submodel, element: model.SubmodelElementCollection
) -> model.SubmodelElementCollection:
    """Merge `element` (a StepNNN collection) into the documentation; returns the merged record."""
    existing = build.child(doc, element.id_short)
    if not isinstance(existing, model.SubmodelElementCollection):
        build.replace_child(doc, element)
        return element
    final = outcome_of(existing) in FINAL
    for item in list(element.value):
        if item.id_short == "Outcome" and final:
            continue
        element.value.remove(item)  # an element has one parent: move it, no copy needed
        build.replace_child(existing, item)
    return existing


def mirror(
    journal: Journal, product: str, step: int, record: model.SubmodelElementCollection, author: str
) -> None:
    journal.put(
        DocumentationRecord,
        {
            "product": product,
            "step": step,
            "part": "record",
            "author": author,
            "element": to_json(record),
            "writes": 1,
        },
    )


def restore(db: Database, product: str, doc: model.Submodel) -> int:
    with db.session() as s:
        rows = s.exec(select(DocumentationRecord).where(DocumentationRecord.product == product)).all()
    for row in rows:
        build.replace_child(doc, element_from_json(json.loads(row.element)))
    return len(rows)
