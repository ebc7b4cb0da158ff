"""A resource's commitments in simulated time: its queue of tentative holds and booked work.

The queue is an *order*; every time in it follows from packing that order behind what the
machine is doing now (each job starts when its predecessor ends and its product is there, with a
setup when the capability changes). Bids are computed by packing the queue with the newcomer in
the place it would really take, so an offer is what the resource will do given what it knows.

Where a newcomer goes (:meth:`Timeline.place`):

* ahead of a queued job only if that job may be *overtaken*: it is booked (an open offer is
  binding and never delayed by a later one: letting a more urgent caller overtake open offers
  too doubled the re-confirmations and the makespan of chaos.yaml on a wall clock) and either of
  a less urgent *class* (a larger priority number, ``rank[0]``) — the priority service: a
  product is never queued behind a less urgent booking that has not started — or of the same
  class, not *firm*, and less urgent by the
  queue's rank (smaller ``rank`` first) — a *firm* booking only to a newcomer of its class whose
step is due earlier (``due``). A booking is firm when its product chose it among
  alternatives on the strength of the promised times (see ``BiddingProvider``); a product with
  only this resource to go to loses no choice when it is re-queued. Firmness protects a booking
  from its own class only: a promise to a less urgent product never outweighs a more urgent one;
* among the places that rule allows, the one that adds the least setup time, but never behind
  a booking of a less urgent class (saving a setup is no reason to make an urgent product wait);
* anywhere earlier where it fits into idle time without moving anyone (gap filling).

Overtaking delays the overtaken bookings: whoever changes the queue calls :meth:`repack`, which
returns the bookings whose times moved, and the resource re-confirms those with their products.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Slot:
    key: str  # the call (cfp) id the offer answered
    job_id: str
    capability: str
    ready: float  # the product can be here from then on
    start: float  # the promised start (the offer's, then the latest confirmed)
    end: float  # the promised end
    setup: float
    booked: bool = False
    duration: float = -1.0  # work time without setup; -1: derive from the promised times
    setup_change: float = -1.0  # setup needed after a job of another capability; -1: `setup`
    rank: tuple = ()  # queue order: a smaller rank is more urgent
    firm: bool = True  # no newcomer may be queued ahead of it (delaying it)
    started: bool = False
    ahead: frozenset = frozenset()  # the steps queued or running before it when its times were promised
    due: float = float("inf")  # when the step must end for its product to be on time; inf: no due date

    def __post_init__(self) -> None:
        if self.duration < 0:
            self.duration = max(0.0, self.end - self.start - self.setup)
        if self.setup_change < 0:
            self.setup_change = self.setup


Times = tuple[float, float, float]  # start, end, setup


def pack(seq: list[Slot], base: float, previous: str | None) -> list[Times]:
    """The times of `seq` run in that order from `base`, after a job of capability `previous`."""
    t, out = base, []
    for s in seq:
        setup = 0.0 if s.capability == previous else s.setup_change
        start = max(t, s.ready)
        t = start + setup + s.duration
        out.append((start, t, setup))
        previous = s.capability
    return out


def priority_class(slot: Slot) -> float:
    """The slot's class: its product's priority number (1 most urgent); no rank: least urgent."""
    return slot.rank[0] if slot.rank else float("inf")


def overtakes(new: Slot, queued: Slot) -> bool:
    """May `new` be queued ahead of `queued` (delaying it)? See the module docstring."""
    if not queued.booked or queued.started:
        return False
    if priority_class(new) < priority_class(queued):
        return True
    if priority_class(new) > priority_class(queued):
        return False
    if queued.firm:  # yields only to a newcomer of its class whose step is due earlier
        return new.due < queued.due
    return new.rank < queued.rank


def moved_from(start: float, end: float, new_start: float, new_end: float, tolerance: float) -> bool:
    """Do (new_start, new_end) differ from the promised (start, end): earlier at all, or later by
    more than `tolerance`?"""
    eps = 1e-9
    if new_start < start - eps or new_end < end - eps:
        return True
    return new_start > start + tolerance or new_end > end + tolerance


class Timeline:
    def __init__(self) -> None:
        self.slots: dict[str, Slot] = {}
        self.order: list[str] = []  # the keys of the slots not started yet, in queue order

    # --- the queue ---------------------------------------------------------------------------------

    def pending(self) -> list[Slot]:
        return [self.slots[k] for k in self.order]

    def place(self, new: Slot, base: float, previous: str | None) -> tuple[int, Times]:
        """Where `new` would go in the queue and its times there (nothing changes yet)."""
        queue = self.pending()
        now_times = pack(queue, base, previous)
        allowed = 0  # the newcomer goes at or after this index by rank
        for i, s in enumerate(queue):
            if not overtakes(new, s):
                allowed = i + 1
        # Idle time before `allowed` that takes the newcomer without moving anyone.
        for i in range(allowed):
            trial = pack([*queue[:i], new, *queue[i:]], base, previous)
            if trial[:i] + trial[i + 1 :] == now_times:
                return i, trial[i]
        best: tuple[float, int, Times] | None = None
        for i in range(allowed, len(queue) + 1):
            trial = pack([*queue[:i], new, *queue[i:]], base, previous)
            setups = sum(x[2] for x in trial)
            if best is None or setups < best[0]:
                best = (setups, i, trial[i])
            if i < len(queue) and priority_class(new) < priority_class(queue[i]):
                break  # not behind a less urgent class
        assert best is not None
        return best[1], best[2]

    def hold(self, slot: Slot, index: int | None = None) -> None:
        """Queue `slot` at `index` (its place from `place`); None: in order of its promised start."""
        self.slots[slot.key] = slot
        if slot.key in self.order:
            self.order.remove(slot.key)
        if slot.started:
            return
        if index is None:
            index = len(self.order)
            for i, k in enumerate(self.order):
                other = self.slots[k]
                if (slot.start, slot.key) < (other.start, other.key):
                    index = i
                    break
        self.order.insert(index, slot.key)

    def book(self, key: str) -> Slot | None:
        slot = self.slots.get(key)
        if slot:
            slot.booked = True
        return slot

    def release(self, key: str) -> Slot | None:
        if key in self.order:
            self.order.remove(key)
        return self.slots.pop(key, None)

    def start(self, key: str, start: float, end: float, setup: float) -> Slot:
        """The machine begins `key` now: it leaves the queue with its real times."""
        slot = self.slots[key]
        if key in self.order:
            self.order.remove(key)
        slot.started = True
        slot.start, slot.end, slot.setup = start, end, setup
        return slot

    def next_booked(self) -> Slot | None:
        """The booked job the machine does next (open offers are skipped: they may still be rejected)."""
        return next((s for s in self.pending() if s.booked), None)

    def held_for(self, slot: Slot, base: float, previous: str | None) -> Slot | None:
        """An open offer of a more urgent class that starting `slot` at `base` would delay, if any.

        Such an offer is a tentative hold: the machine waits for its answer (an acceptance, a
        rejection or its expiry) rather than start less urgent work in its time.
        """
        queue = self.pending()
        planned = dict(zip((s.key for s in queue), pack(queue, base, previous), strict=True))
        rest = [s for s in queue if s.key != slot.key]
        first = pack([slot, *rest], base, previous)
        for s, (start, _end, _setup) in zip(rest, first[1:], strict=True):
            if s.booked or priority_class(s) >= priority_class(slot):
                continue
            if start > planned[s.key][0] + 1e-9:
                return s
        return None

    def repack(
        self, base: float, previous: str | None, tolerance: float = 1e-9, running: str | None = None
    ) -> list[Slot]:
        """Recompute the queue's times; return the bookings whose promised times moved (now updated).

        A move *later* within `tolerance` with the same steps ahead is no move: on a wall clock
        the queue drifts by the milliseconds the agents themselves take, which is no news for a
        product. A move earlier, or any move after another step with work to do got ahead of it
        (`running`: the step the machine is doing), is always news.
        """
        moved = []
        queue = self.pending()
        for i, (s, (start, end, setup)) in enumerate(zip(queue, pack(queue, base, previous), strict=True)):
            if not s.booked:
                continue
            ahead = frozenset(q.key for q in queue[:i]) | ({running} if running else frozenset())
            newly = [self.slots[k] for k in ahead - s.ahead if k in self.slots]
            tol = tolerance if sum(q.duration + q.setup_change for q in newly) <= 1e-9 else 1e-9
            if moved_from(s.start, s.end, start, end, tol):
                s.start, s.end, s.setup, s.ahead = start, end, setup, ahead
                moved.append(s)
        return moved

    def ahead_of(self, index: int, running: str | None) -> frozenset:
        """The steps before position `index` of the queue, and the running one."""
        return frozenset(self.order[:index]) | ({running} if running else frozenset())

    # --- views -------------------------------------------------------------------------------------

    def booked(self) -> list[Slot]:
        return sorted((s for s in self.slots.values() if s.booked), key=lambda s: (s.start, s.key))

    def __len__(self) -> int:
        return len(self.slots)
