"""One versioned snapshot codec for both bidding machines.

A machine is persisted at every transition and restored after a crash, possibly by a newer
twinbid than the one that wrote it. Each machine declares its fields once (how a value becomes
JSON-able data and back, and what a field missing from an older snapshot defaults to); the
codec stamps the version and the machine's kind, and refuses loudly a snapshot of another kind
or of a version newer than it knows, instead of guessing at it.

Version 1 is every snapshot written before the stamp: it loads with the defaults for the
fields added since (a requester's reserve, status queries, deferrals and settled flag; a
provider's answer times).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: The format `dump` writes. Raise it when a field changes meaning; a new field with a default
#: needs only its `default`.
VERSION = 2


class SnapshotError(ValueError):
    """A snapshot this code cannot read: another machine's, or written by a newer version."""


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True, slots=True)
class Field:
    """How one attribute is written to and read from a snapshot."""

    dump: Callable[[Any], Any] = _same
    load: Callable[[Any], Any] = _same
    default: Callable[[], Any] | None = None  # for snapshots written before the field existed


def sorted_set(load: Callable[[Any], Any] = set) -> Field:
    """A set, written sorted so equal machines give equal snapshots."""
    return Field(dump=sorted, load=load)


@dataclass(frozen=True)
class Codec:
    """The snapshot format of one machine kind: its fields in order, each with its conversions."""

    kind: str
    fields: dict[str, Field] = field(default_factory=dict)

    def dump(self, machine: object) -> dict[str, Any]:
        data: dict[str, Any] = {"v": VERSION, "machine": self.kind}
        for name, f in self.fields.items():
            data[name] = f.dump(getattr(machine, name))
        return data

    def load(self, data: dict[str, Any]) -> dict[str, Any]:
        """The fields of `data` as the machine holds them; older versions filled with defaults."""
        version = data.get("v", 1)
        kind = data.get("machine", self.kind)
        if kind != self.kind:
            raise SnapshotError(f"a {kind} snapshot cannot restore a {self.kind}")
        if not isinstance(version, int) or not 1 <= version <= VERSION:
            raise SnapshotError(f"{self.kind} snapshot version {version!r}; this code reads 1 to {VERSION}")
        out: dict[str, Any] = {}
        for name, f in self.fields.items():
            if name in data:
                out[name] = f.load(data[name])
            elif f.default is not None:
                out[name] = f.default()
            else:
                raise SnapshotError(f"{self.kind} snapshot (version {version}) lacks {name!r}")
        return out
