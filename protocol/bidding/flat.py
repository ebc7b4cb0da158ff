"""Dataclass records as plain dicts, for the bidding machines' snapshots.

A machine is snapshotted at every transition; ``dataclasses.asdict`` recurses and
deep-copies, and even ``dataclasses.fields`` is slow enough to show in a profile,
so the field names are looked up once per class.
"""

from __future__ import annotations

import dataclasses
from typing import Any

_FIELDS: dict[type, tuple[str, ...]] = {}


def field_names(cls: type) -> tuple[str, ...]:
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def flat(obj: Any) -> dict[str, Any]:
    """A flat dataclass (StepCall, Bid, a config) as a dict; its ``parameters`` mapping copied."""
    out = {name: getattr(obj, name) for name in field_names(type(obj))}
    if "parameters" in out:
        out["parameters"] = dict(out["parameters"])
    return out
