"""`twinbid verify`: check the signatures and hash chain of products' documentation, offline.

An AASX on its own carries what is needed: each completed step record holds its resource's
public key and signature and its product's seal (agents/aas/record_chain.py); the process plan
says which steps there are. A run's output folder adds ``keys.json``, the public keys the run
issued, so a record signed with any other key (a forger's) is refused as well.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from basyx.aas import model

from agents.aas import build
from agents.aas.docjson import child_text
from agents.aas.io import AasReadError, read_aasx, to_jsonable
from agents.aas.record_chain import BrokenLink, check_records
from protocol.signing import KEYS_FILE, read_keys

__all__ = ["verify_aasx", "verify_folder"]


def _records(doc: model.Submodel) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for element in doc.submodel_element:
        name = element.id_short or ""
        if isinstance(element, model.SubmodelElementCollection) and name.startswith("Step"):
            try:
                out[int(name.removeprefix("Step"))] = to_jsonable(element)
            except ValueError:
                continue
    return out


def verify_aasx(path: Path, keys: Mapping[str, set[str]] | None = None) -> list[str]:
    """Problems of one product AASX (empty: it verifies): the first broken link of each product in it."""
    try:
        result = read_aasx(path, require_shell=False)
    except AasReadError as exc:
        return [f"{path}: {exc}"]
    docs = [o for o in result.submodels if o.id_short == "ProcessDocumentation"]
    if not docs:
        return [f"{path}: no ProcessDocumentation submodel"]
    plans = {o.id: o for o in result.submodels if o.id_short == "ProcessPlan"}
    finished = any(o.id_short == "Nameplate" for o in result.submodels)
    problems: list[str] = []
    for doc in docs:
        records = _records(doc)
        broken = check_records(records, keys=keys)
        if broken is None:
            broken = _plan_gap(doc, records, plans, finished)
        if broken is not None:
            problems.append(f"{path.name}: {broken}")
    return problems


def _plan_gap(
    doc: model.Submodel,
    records: Mapping[int, dict[str, Any]],
    plans: Mapping[str, model.Submodel],
    finished: bool,
) -> BrokenLink | None:
    """A step of the plan without its completed record (a record removed).

    Before a documented step every plan step has a record; once the product is finished (its
    Nameplate is written on completion) every plan step has a completed one, so the chain's last
    link cannot be cut off either.
    """
    plan = plans.get(doc.id.removesuffix("/ProcessDocumentation") + "/ProcessPlan")
    if plan is None:
        return None
    product = next(
        (
            c.get("value")
            for r in records.values()
            for c in r.get("value") or ()
            if c.get("idShort") == "Product"
        ),
        "?",
    )
    last = max(records, default=0)
    for step in sorted(s.index for s in build.read_process_plan(plan)):
        if step < last and step not in records:
            return BrokenLink(str(product), step, "the plan's step has no record, a later step has one")
        if finished and child_text(records.get(step), "Outcome") != "completed":
            return BrokenLink(
                str(product), step, "the product is finished but this step has no completed record"
            )
    return None


def _aasx_files(folder: Path) -> Iterator[Path]:
    yield from sorted((folder / "aas").glob("*.aasx"))


def verify_folder(folder: Path) -> tuple[int, list[str]]:
    """(how many AASX files were checked, their problems) for a run's output folder."""
    keys = read_keys(folder)
    files = list(_aasx_files(folder))
    problems: list[str] = []
    if keys is None:
        problems.append(f"{folder}: no {KEYS_FILE} (the run's public keys)")
    for path in files:
        problems.extend(verify_aasx(path, keys))
    return len(files), problems
