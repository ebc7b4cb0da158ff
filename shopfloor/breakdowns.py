"""Machine breakdowns: a seeded stream of failures over simulated time.

Why a stream over *calendar* (simulated) time rather than a draw per job: the failure instants then
depend only on the seed and the asset, not on which jobs ran or in what order, so a run is
reproducible and two schedules of the same scenario face the same failures. The machine fails even
while idle; a failure is followed by a repair, and the next time-between-failures starts when the
repair ends. Times between failures are exponential with mean ``mtbf``, repair times exponential
with mean ``mttr``.

A job needs ``work`` units of up-time from its start. If the machine is down at the start, or fails
during the job, the job is extended by the (remaining) repair time: that extension is the job's
``breakdown_delay``. Estimates do not include breakdowns -- a planner does not know the future --
but :meth:`Breakdowns.down_until` tells a bidder whether the machine is under repair right now.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .durations import job_rng

__all__ = ["Breakdown", "Breakdowns"]


@dataclass(frozen=True)
class Breakdown:
    at: float
    repair: float

    @property
    def until(self) -> float:
        return self.at + self.repair


class Breakdowns:
    """Failures of one asset; ``mtbf``/``mttr`` in simulated time units, deterministic for a seed."""

    def __init__(self, mtbf: float, mttr: float, *, seed: object = 0, asset: str = "") -> None:
        if not (mtbf > 0 and math.isfinite(mtbf)):
            raise ValueError(f"mtbf must be a finite number > 0, got {mtbf!r}")
        if not (mttr >= 0 and math.isfinite(mttr)):
            raise ValueError(f"mttr must be a finite number >= 0, got {mttr!r}")
        self.mtbf = float(mtbf)
        self.mttr = float(mttr)
        self._rng = job_rng(seed, asset, "breakdowns")
        self._events: list[Breakdown] = []
        self._horizon = 0.0  # time from which the next failure gap is counted

    def _extend_to(self, t: float) -> None:
        while not self._events or self._events[-1].at <= t:
            at = self._horizon + self._rng.expovariate(1.0 / self.mtbf)
            repair = self._rng.expovariate(1.0 / self.mttr) if self.mttr > 0 else 0.0
            self._events.append(Breakdown(at, repair))
            self._horizon = at + repair

    def events_until(self, t: float) -> list[Breakdown]:
        """All failures that begin at or before ``t`` (the stream starts at simulated time 0)."""
        self._extend_to(t)
        return [b for b in self._events if b.at <= t]

    def down_until(self, t: float) -> float | None:
        """If the machine is under repair at ``t``, the end of that repair, else None."""
        self._extend_to(t)
        for b in self._events:
            if b.at > t:
                break
            if b.at <= t < b.until:
                return b.until
        return None

    def finish(self, start: float, work: float) -> tuple[float, float, list[Breakdown]]:
        """When a job of ``work`` up-time units started at ``start`` ends.

        Returns ``(end, breakdown_delay, breakdowns hit)`` with ``end = start + work + delay``.
        """
        t = start
        remaining = max(0.0, work)
        hit: list[Breakdown] = []
        i = 0
        while True:
            self._extend_to(t + remaining)
            while i < len(self._events) and self._events[i].until <= t:
                i += 1
            if i >= len(self._events):  # cannot happen: _extend_to leaves a failure beyond t+remaining
                t += remaining
                break
            b = self._events[i]
            if b.at <= t:  # down at t: wait for the repair
                hit.append(b)
                t = b.until
                i += 1
                continue
            if b.at < t + remaining:  # fails during the job
                hit.append(b)
                remaining -= b.at - t
                t = b.until
                i += 1
                continue
            t += remaining
            break
        if not hit:
            return start + remaining, 0.0, []
        return t, max(0.0, t - start - max(0.0, work)), hit
