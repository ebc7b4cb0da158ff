"""The asset interface: what a resource agent needs from the physical (or simulated) equipment.

A resource agent (workstation, warehouse) never talks to its equipment except through
:class:`Asset`. The simulated assets in this package implement it; an adapter to real equipment
(OPC UA, a PLC, an MES) implements the same five things:

* ``capabilities()`` -- what it can do (short capability ids, e.g. ``"milling"``);
* ``estimate(job, previous_capability=...)`` -- an *honest* forecast: what ``execute()`` will take,
  barring breakdowns, or ``None`` if the job cannot be done now (warehouse full, item missing);
* ``execute(job, clock, previous_capability=...)`` -- do it, waiting on the clock, and return the
  :class:`ExecutionRecord`;
* ``job_status(job_id)`` -- the *physical truth* about a job (not started / started / finished, with
  the record), which must survive a crash of the agent process: a restarted agent asks the asset,
  not its own memory, whether a step ran;
* ``execute()`` must be idempotent per ``job_id``: a job that finished (outcome ``done``) is never
  executed again -- the existing record is returned. A job that was started but not finished when
  the agent process died is *resumed*. A job whose last attempt ``failed`` may be attempted again.

Optional hooks with safe defaults: ``reserve``/``release`` (hold capacity at booking time),
``available_from`` (earliest instant the equipment can start, e.g. after a running repair),
``describe`` (plain data for the resource's AAS), ``cost_rate``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

if TYPE_CHECKING:
    from .clock import Clock

__all__ = [
    "Asset",
    "Estimate",
    "ExecutionRecord",
    "Job",
    "JobState",
    "JobStatus",
]

JobState = Literal["not_started", "started", "finished"]


@dataclass(frozen=True)
class Job:
    """One manufacturing step as an asset sees it.

    ``job_id`` is unique per step (e.g. ``"<product>/<step>"``); it is the idempotency key of
    :meth:`Asset.execute`. ``params`` are the step's parameters (a warehouse reads ``item`` and
    ``quantity``). ``params`` does not take part in hashing.
    """

    job_id: str
    capability: str
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)
    product: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "capability": self.capability,
            "params": dict(self.params),
            "product": self.product,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Job:
        return cls(
            job_id=str(data["job_id"]),
            capability=str(data["capability"]),
            params=dict(data.get("params") or {}),
            product=str(data.get("product", "")),
        )


@dataclass(frozen=True)
class Estimate:
    """What :meth:`Asset.execute` will take, barring breakdowns (simulated time units)."""

    setup: float
    duration: float

    @property
    def total(self) -> float:
        return self.setup + self.duration


@dataclass
class ExecutionRecord:
    """What happened to one job on one asset.

    Times are in the simulated time units of the clock that executed (or resumed) the job;
    ``start_ms``/``end_ms`` are the same instants as calendar epoch milliseconds.
    ``end = start + setup + duration + breakdown_delay`` for a job that ran. ``outcome`` is
    ``"done"`` or ``"failed"`` (with ``reason``); ``"running"`` only appears in the record that
    :meth:`Asset.job_status` gives for a started job (then ``end`` is the planned end).
    """

    job_id: str
    capability: str
    start: float
    end: float
    setup: float
    duration: float
    breakdown_delay: float
    outcome: str
    product: str = ""
    asset: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    start_ms: int | None = None
    end_ms: int | None = None
    attempt: int = 1
    resumed: bool = False
    breakdowns: list[list[float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.outcome == "done"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExecutionRecord:
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in data.items() if k in names})


class JobStatus(NamedTuple):
    """``state`` is the physical truth; ``record`` is the finished record, the planned one for a
    started job (outcome ``"running"``), or None."""

    state: JobState
    record: ExecutionRecord | None = None


class Asset(ABC):
    """A shop-floor resource as its agent sees it. See the module docstring for the contract."""

    name: str
    location: str = ""
    #: price per simulated time unit (what the bidder charges for the asset's time)
    cost_rate: float = 0.0

    @abstractmethod
    def capabilities(self) -> frozenset[str]: ...

    @abstractmethod
    def estimate(self, job: Job, *, previous_capability: str | None) -> Estimate | None:
        """What :meth:`execute` will take for ``job`` if the job before it had
        ``previous_capability`` (None: no job before); None if the asset cannot do it now."""

    @abstractmethod
    async def execute(self, job: Job, clock: Clock, *, previous_capability: str | None) -> ExecutionRecord:
        """Do the job now, waiting on ``clock``; idempotent per ``job_id`` (see module docstring)."""

    @abstractmethod
    def job_status(self, job_id: str) -> JobStatus:
        """Physical truth about ``job_id``; survives a crash of the agent process."""

    # -- optional, with safe defaults ------------------------------------------------------
    def reserve(self, job: Job) -> bool:
        """Hold what ``job`` will need (capacity, an item) from booking until it starts.
        Idempotent per ``job_id``; False if it cannot be held. Default: nothing to hold."""
        return True

    def release(self, job: Job) -> None:
        """Give back what :meth:`reserve` held (idempotent)."""
        return None

    def available_from(self, t: float) -> float:
        """The earliest instant >= ``t`` at which the asset can start a job (e.g. after a repair)."""
        return t

    def describe(self) -> dict[str, Any]:
        """Plain data for the resource's AAS (capabilities, cost rate, location)."""
        return {
            "name": self.name,
            "location": self.location,
            "capabilities": sorted(self.capabilities()),
            "cost_rate": self.cost_rate,
        }
