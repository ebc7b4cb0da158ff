"""A resource's commitments in simulated time: tentative holds and booked work.

Bids are computed against this timeline, so an offer never promises a slot that
an earlier, still-binding offer already holds: concurrent calls cannot
double-book. A new job goes after the last commitment; it may be slotted into a
gap only where that changes nobody else's setup (no setup before it, none after).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Slot:
    key: str  # the call (cfp) id the offer answered
    job_id: str
    capability: str
    ready: float  # the product can be here from then on
    start: float
    end: float
    setup: float
    booked: bool = False


class Timeline:
    def __init__(self) -> None:
        self.slots: dict[str, Slot] = {}

    def last(self) -> Slot | None:
        return max(self.slots.values(), key=lambda s: (s.end, s.start), default=None)

    def append_start(self, ready: float) -> float:
        last = self.last()
        return max(ready, last.end) if last else ready

    def gap_start(self, ready: float, length: float) -> float | None:
        """Earliest start >= ready of a gap that fits `length` before an existing slot, else None."""
        t = ready
        for s in sorted(self.slots.values(), key=lambda s: s.start):
            if s.end <= t:
                continue
            if s.start - t >= length and s.setup == 0:
                return t
            t = max(t, s.end)
        return None

    def hold(self, slot: Slot) -> None:
        self.slots[slot.key] = slot

    def book(self, key: str) -> Slot | None:
        slot = self.slots.get(key)
        if slot:
            slot.booked = True
        return slot

    def release(self, key: str) -> Slot | None:
        return self.slots.pop(key, None)

    def booked(self) -> list[Slot]:
        return sorted((s for s in self.slots.values() if s.booked), key=lambda s: (s.start, s.key))

    def __len__(self) -> int:
        return len(self.slots)
