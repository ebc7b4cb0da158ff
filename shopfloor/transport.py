"""Transport times between shop-floor locations (simulated time units).

A product twin adds the travel time from its current location to a resource's location when it
compares bids; a resource may add it to its earliest start. The table is plain data so scenarios can
give it as a list of ``[a, b, time]`` triples, a nested mapping ``{a: {b: time}}``, or (from Python)
a mapping with ``(a, b)`` keys.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["Distances"]


class Distances:
    """Travel times between locations.

    ``travel_time(a, a)`` is 0; a pair not in the table takes ``default``. With ``symmetric=True``
    (the default) an entry for ``(a, b)`` also serves ``(b, a)`` unless ``(b, a)`` is given too.
    """

    def __init__(
        self,
        table: Mapping[Any, Any] | Iterable[Any] | None = None,
        default: float = 0.0,
        symmetric: bool = True,
    ) -> None:
        self.default = self._time(default, "default")
        self.symmetric = bool(symmetric)
        self._table: dict[tuple[str, str], float] = {}
        for a, b, t in self._entries(table):
            self._table[(a, b)] = self._time(t, f"travel time {a}->{b}")

    @staticmethod
    def _time(value: Any, what: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{what} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
        return value

    @staticmethod
    def _entries(table: Any) -> Iterable[tuple[str, str, Any]]:
        if table is None:
            return
        if isinstance(table, Mapping):
            for key, value in table.items():
                if isinstance(key, tuple) and len(key) == 2:
                    yield str(key[0]), str(key[1]), value
                elif isinstance(value, Mapping):
                    for b, t in value.items():
                        yield str(key), str(b), t
                else:
                    raise ValueError(f"distance table key {key!r}: expected (a, b) or a nested mapping")
            return
        for entry in table:
            if isinstance(entry, Mapping):
                try:
                    yield str(entry["from"]), str(entry["to"]), entry["time"]
                except KeyError as exc:
                    raise ValueError(f"distance entry {entry!r} needs from, to and time") from exc
            else:
                a, b, t = entry
                yield str(a), str(b), t

    def travel_time(self, a: str, b: str) -> float:
        if a == b:
            return 0.0
        t = self._table.get((a, b))
        if t is None and self.symmetric:
            t = self._table.get((b, a))
        return self.default if t is None else t

    def locations(self) -> set[str]:
        return {x for pair in self._table for x in pair}

    def to_list(self) -> list[list[Any]]:
        """The table as ``[a, b, time]`` triples (parses back with ``Distances(...)``)."""
        return [[a, b, t] for (a, b), t in sorted(self._table.items())]

    def __repr__(self) -> str:
        return f"Distances({len(self._table)} entries, default={self.default}, symmetric={self.symmetric})"
