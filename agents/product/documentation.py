"""The product's ProcessDocumentation: written by the product (bidding) and by resources (execution).

Both writers merge into the step's record child by child, and a finished
outcome is never overwritten by an earlier-phase one (a resource may report
completion before the product has recorded the booking, when a step takes no
time). Every change is mirrored into the run database so a restarted product
rebuilds the same submodel.

Records are held as AAS JSON (agents/aas/docjson.py): documenting is on the
path of every negotiated step, and basyx objects cost milliseconds each. The
AAS store builds the objects only when someone reads the submodel as objects.
"""

from __future__ import annotations

from typing import Any

import orjson

from agents.aas import docjson
from agents.aas.build import step_id_short
from agents.aas.store import AasStore
from agents.persistence.journal import Journal
from agents.persistence.tables import DocumentationRecord

FINAL = ("completed", "failed")

Record = dict[str, Any]


def outcome_of(record: Record | None) -> str | None:
    return docjson.child_text(record, "Outcome")


def merge_record(existing: Record | None, update: Record) -> Record:
    """``update`` merged into ``existing`` (a new dict; neither is changed).

    A child replaces its namesake and moves last, as basyx's replace does; the Outcome of a
    finished record stays.
    """
    if existing is None:
        return update
    final = outcome_of(existing) in FINAL
    children = list(existing.get("value") or ())
    for item in update.get("value") or ():
        name = item["idShort"]
        if name == "Outcome" and final:
            continue
        children = [c for c in children if c["idShort"] != name]
        children.append(item)
    merged = dict(existing)
    merged["value"] = children
    return merged


class Documentation:
    """One product's step records, by step index, kept in step with its AAS store and the database."""

    def __init__(self, store: AasStore, journal: Journal, product: str, doc_id: str) -> None:
        self.store = store
        self.journal = journal
        self.product = product
        self.doc_id = doc_id
        self.records: dict[int, Record] = {}
        # Each record's Outcome, read once per change: the driver asks for every step's outcome
        # each time it moves on, which read every record again (quadratic in the plan's length).
        self._outcomes: dict[int, str | None] = {}

    def outcome(self, step: int) -> str | None:
        return self._outcomes.get(step)

    def merge(self, step: int, update: Record, author: str) -> Record:
        """Merge ``update`` (a StepNNN collection) into the step's record, and mirror it."""
        if update.get("idShort") != step_id_short(step):
            raise ValueError(
                f"a record for step {step} must be {step_id_short(step)}, not {update.get('idShort')!r}"
            )
        merged = merge_record(self.records.get(step), update)
        self.records[step] = merged
        self._outcomes[step] = outcome_of(merged)
        self.journal.put(
            DocumentationRecord,
            {
                "product": self.product,
                "step": step,
                "part": "record",
                "author": author,
                "element": orjson.dumps(merged).decode(),
                "writes": 1,
            },
        )
        self.store.put_element_json(self.doc_id, merged)
        return merged

    def restore(self, rows: list[DocumentationRecord]) -> int:
        """Reload the mirrored records (a restart); returns how many there were."""
        for row in rows:
            self.load(row.step, orjson.loads(row.element))
        return len(rows)

    def load(self, step: int, record: Record) -> None:
        self.records[step] = record
        self._outcomes[step] = outcome_of(record)
        self.store.put_element_json(self.doc_id, record)
