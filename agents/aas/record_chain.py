"""Signing, sealing and checking a product's step records (AAS JSON), for protocol/signing.py's scheme.

The executing resource adds ``Signature`` and ``SignerKey`` to the completion it writes
(:func:`sign_completion`); the product, once it has accepted that write, adds ``Product``,
``PreviousHash``, ``Seal`` and ``SealKey`` (:func:`seal_record`). :func:`check_records` checks a
whole documentation offline and names the first broken link.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from protocol import signing

from .build import step_id_short
from .docjson import child_text, prop

Json = dict[str, Any]

__all__ = [
    "BrokenLink",
    "check_records",
    "execution_of",
    "seal_record",
    "sign_completion",
    "signature_problem",
]


@dataclass(frozen=True)
class BrokenLink:
    """The first place a product's documentation does not verify: which product, which step, what."""

    product: str
    step: int | None
    what: str

    def __str__(self) -> str:
        where = f"{self.product} step {self.step}" if self.step is not None else self.product
        return f"{where}: {self.what}"


def execution_of(product: str, step: int, record: Json) -> dict[str, Any]:
    return signing.execution_payload(
        product,
        step,
        child_text(record, "Resource"),
        child_text(record, "Started"),
        child_text(record, "Finished"),
        child_text(record, "Outcome"),
    )


def _with(record: Json, children: list[Json]) -> Json:
    names = {c["idShort"] for c in children}
    out = dict(record)
    out["value"] = [c for c in record.get("value") or () if c.get("idShort") not in names] + children
    return out


def sign_completion(secret: str, product: str, step: int, body: Json) -> Json:
    """``body`` (a resource's completion of ``step``) with its resource's signature and key."""
    resource = child_text(body, "Resource") or ""
    signature = signing.sign(secret, resource, execution_of(product, step, body))
    return _with(
        body,
        [
            prop("Signature", signature, "xs:string"),
            prop("SignerKey", signing.public_key_text(secret, resource), "xs:string"),
        ],
    )


def signature_problem(product: str, step: int, record: Json, expected_key: str | None) -> str | None:
    """Why ``record``'s resource signature does not hold (None: it does).

    ``expected_key``: the signer's public key as the checker knows it (None: take the record's).
    """
    signature, key = child_text(record, "Signature"), child_text(record, "SignerKey")
    if not signature or not key:
        return "the completed record carries no resource signature"
    if expected_key is not None and key != expected_key:
        return f"signed with a key that is not {child_text(record, 'Resource')}'s"
    why = signing.verify_signature(key, signature, execution_of(product, step, record))
    return None if why is None else f"resource signature: {why}"


def _link(product: str, step: int, record: Json, previous: str) -> dict[str, Any]:
    return signing.link_payload(
        product,
        step,
        previous,
        child_text(record, "Signature") or "",
        child_text(record, "Resource"),
        child_text(record, "SignerKey") or "",
    )


def link_hash_of(product: str, step: int, record: Json) -> str:
    """The hash the next sealed record names as its PreviousHash."""
    return signing.link_hash(_link(product, step, record, child_text(record, "PreviousHash") or ""))


def seal_record(secret: str, product: str, step: int, record: Json, previous: str) -> Json:
    """``record`` (signed by its resource) placed in the chain after ``previous`` and sealed by the product."""
    seal = signing.sign(secret, product, _link(product, step, record, previous))
    return _with(
        record,
        [
            prop("Product", product, "xs:string"),
            prop("PreviousHash", previous, "xs:string"),
            prop("Seal", seal, "xs:string"),
            prop("SealKey", signing.public_key_text(secret, product), "xs:string"),
        ],
    )


def previous_hash(product: str, records: Mapping[int, Json], step: int) -> str:
    """The PreviousHash for ``step``: the link hash of the last sealed record before it."""
    sealed = [s for s in records if s < step and child_text(records[s], "Seal")]
    if not sealed:
        return signing.GENESIS
    last = max(sealed)
    return link_hash_of(product, last, records[last])


def check_records(
    records: Mapping[int, Json], *, keys: Mapping[str, set[str]] | None = None, product: str | None = None
) -> BrokenLink | None:
    """The first broken link of one product's step records (None: every signature and link holds).

    ``records``: step index -> StepNNN collection as AAS JSON. Every completed record must carry
    its resource's signature and the product's seal; the sealed records, in step order, form the
    chain. ``keys``: agent -> public keys known for it (e.g. the run's keys.json); a record signed
    with another key is refused. ``product``: the name expected (default: the records' own).
    """
    names = {child_text(r, "Product") for r in records.values() if child_text(r, "Product")}
    name = product or (sorted(names)[0] if names else "?")
    previous = signing.GENESIS
    seal_key = None
    for step in sorted(records):
        record = records[step]
        if record.get("idShort") != step_id_short(step):
            return BrokenLink(name, step, f"the record is named {record.get('idShort')!r}")
        outcome = child_text(record, "Outcome")
        sealed = child_text(record, "Seal") is not None
        if outcome != "completed" and not sealed:
            continue
        if outcome != "completed":
            return BrokenLink(name, step, f"a sealed record says {outcome!r}, not completed")
        if not sealed:
            return BrokenLink(name, step, "the completed record is not sealed by its product")
        if child_text(record, "Product") != name:
            return BrokenLink(name, step, f"the record names product {child_text(record, 'Product')!r}")
        if str(child_text(record, "StepIndex")) != str(step):
            return BrokenLink(name, step, f"the record says it is step {child_text(record, 'StepIndex')}")
        resource = child_text(record, "Resource") or ""
        if keys is not None and child_text(record, "SignerKey") not in keys.get(resource, set()):
            return BrokenLink(name, step, f"signed with a key that is not {resource}'s")
        why = signature_problem(name, step, record, None)
        if why is not None:
            return BrokenLink(name, step, why)
        if child_text(record, "PreviousHash") != previous:
            return BrokenLink(
                name, step, "the chain is broken: PreviousHash is not the hash of the previous sealed step"
            )
        key = child_text(record, "SealKey") or ""
        if seal_key is not None and key != seal_key:
            return BrokenLink(name, step, "sealed with another key than the product's other steps")
        seal_key = key
        if keys is not None and key not in keys.get(name, set()):
            return BrokenLink(name, step, f"sealed with a key that is not {name}'s")
        link = _link(name, step, record, previous)
        why = signing.verify_signature(key, child_text(record, "Seal") or "", link)
        if why is not None:
            return BrokenLink(name, step, f"product seal: {why}")
        previous = signing.link_hash(link)
    return None
