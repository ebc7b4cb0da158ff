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

#: What the executing resource may write into a step's record: its execution, nothing of the
#: bidding (call, bids, winner, reason), which the product documents itself.
#: Its signature and public key (protocol/signing.py) come with it.
EXECUTION_FIELDS = frozenset({"Started", "Finished", "Resource", "Outcome", "Signature", "SignerKey"})

Record = dict[str, Any]


class Refused(Exception):
    """A write of a step record that its author may not make: ``status`` 401, 403 or 409."""

    def __init__(self, text: str, status: int) -> None:
        super().__init__(text)
        self.text = text
        self.status = status


def check_execution_write(
    step: int, caller: str | None, update: Record, awardee: str | None, existing: Record | None
) -> bool:
    """May ``caller`` merge ``update`` into step ``step``'s record? False: it is already there.

    ``awardee`` is the resource whose award of the step stands (awarded and not yet done, failed or
    re-awarded), None when none does. Only that resource writes, only :data:`EXECUTION_FIELDS`,
    naming itself as the Resource and ``completed`` as the Outcome; a finished record is final, and
    the same write again (a retry after a lost answer) is answered as done without a change.
    """
    if caller is None:
        raise Refused("documenting a step needs an agent's bearer token", 401)
    children = {c.get("idShort"): c for c in update.get("value") or () if isinstance(c, dict)}
    if outcome_of(existing) in FINAL:
        if _same_children(existing, children):
            return False
        raise Refused(
            f"step {step} is already documented as {outcome_of(existing)} by "
            f"{docjson.child_text(existing, 'Resource')}; its record is final",
            409,
        )
    if awardee is None or caller != awardee:
        held = f"awarded to {awardee}" if awardee else "not awarded to anyone now"
        raise Refused(f"step {step} is {held}; {caller} may not document it", 403)
    extra = sorted(str(n) for n in children if n not in EXECUTION_FIELDS)
    if extra:
        raise Refused(
            f"a resource documents only its execution ({', '.join(sorted(EXECUTION_FIELDS))}), "
            f"not {', '.join(extra)}",
            403,
        )
    resource = docjson.child_text(update, "Resource")
    if resource is not None and resource != caller:
        raise Refused(f"{caller} may not document step {step} as executed by {resource}", 403)
    outcome = docjson.child_text(update, "Outcome")
    if outcome is not None and outcome != "completed":
        raise Refused(f"a resource documents a step as completed, not {outcome!r}", 403)
    return True


def _same_children(existing: Record | None, children: dict[Any, Record]) -> bool:
    mine = {c.get("idShort"): c for c in (existing or {}).get("value") or ()}
    return all(name in mine and mine[name].get("value") == c.get("value") for name, c in children.items())


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
