"""A simulated workstation: capabilities with processing-time models, setup times, a cost rate,
and optional breakdowns (MTBF/MTTR).

Config (e.g. from a scenario file)::

    location: cell-a
    cost_rate: 2.5             # price per simulated time unit, used by the bidder
    setup: 5                   # default setup time (a duration config), applied on capability change
    capabilities:
      milling: {uniform: [20, 30]}
      drilling: {duration: 10, setup: 2}   # per-capability setup overrides the default
    mtbf: 3600                 # optional: mean time between failures ...
    mttr: 120                  # ... and mean time to repair (both exponential)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .asset import Estimate, Job
from .breakdowns import Breakdowns
from .durations import DurationModel, Fixed, parse_duration, step_duration
from .simulated import SimulatedAsset

__all__ = ["Workstation"]


_NO_SETUP = Fixed(0.0)


class Workstation(SimulatedAsset):
    """A machine that does one job at a time.

    Setup is applied when a job's capability differs from ``previous_capability`` (including when
    there is no previous job, ``None``: a machine is not set up for anything at first). Durations
    and setups are sampled per job (seeded by ``seed``, the asset name and the job id), so the
    estimate given at bidding time is exactly what ``execute()`` takes, barring breakdowns.
    """

    def __init__(
        self,
        name: str,
        capabilities: Mapping[str, Any],
        *,
        location: str = "",
        setup: Any = 0.0,
        cost_rate: float = 1.0,
        mtbf: float | None = None,
        mttr: float | None = None,
        seed: object = 0,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        if not capabilities:
            raise ValueError(f"workstation {name!r} needs at least one capability")
        default_setup = parse_duration(setup)
        self.durations: dict[str, DurationModel] = {}
        self.setups: dict[str, DurationModel] = {}
        for cap, spec in capabilities.items():
            if isinstance(spec, Mapping) and "duration" in spec:
                unknown = set(spec) - {"duration", "setup"}
                if unknown:
                    raise ValueError(f"{name}/{cap}: unknown keys {sorted(unknown)}")
                self.durations[cap] = parse_duration(spec["duration"])
                self.setups[cap] = parse_duration(spec.get("setup", default_setup))
            else:
                self.durations[cap] = parse_duration(spec)
                self.setups[cap] = default_setup
        if (mtbf is None) != (mttr is None):
            raise ValueError(f"workstation {name!r}: give both mtbf and mttr, or neither")
        breakdowns = (
            Breakdowns(float(mtbf), float(mttr), seed=seed, asset=name)
            if mtbf is not None and mttr is not None
            else None
        )
        self._caps = frozenset(self.durations)
        super().__init__(
            name,
            location=location,
            cost_rate=cost_rate,
            seed=seed,
            log_path=log_path,
            breakdowns=breakdowns,
            parallel=1,
        )

    @classmethod
    def from_config(
        cls,
        name: str,
        config: Mapping[str, Any],
        *,
        seed: object = 0,
        log_path: str | os.PathLike[str] | None = None,
    ) -> Workstation:
        known = {"location", "cost_rate", "setup", "capabilities", "mtbf", "mttr", "seed"}
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"workstation {name!r}: unknown config keys {sorted(unknown)}")
        return cls(
            name,
            config.get("capabilities") or {},
            location=str(config.get("location", "")),
            setup=config.get("setup", 0.0),
            cost_rate=float(config.get("cost_rate", 1.0)),
            mtbf=config.get("mtbf"),
            mttr=config.get("mttr"),
            seed=config.get("seed", seed),
            log_path=log_path,
        )

    def capabilities(self) -> frozenset[str]:
        return self._caps

    def setup_time(self, job: Job, previous_capability: str | None) -> float:
        if job.capability == previous_capability:
            return 0.0
        model = self.setups.get(job.capability, _NO_SETUP)
        return model.sample_for(self.seed, self.name, job.job_id, job.capability, "setup")

    def processing_time(self, job: Job) -> float:
        override = step_duration(job.params, job.capability)
        if override is not None:
            return override
        return self.durations[job.capability].sample_for(self.seed, self.name, job.job_id, job.capability)

    def _plan(self, job: Job, previous_capability: str | None) -> Estimate | None:
        if job.capability not in self._caps:
            return None
        return Estimate(setup=self.setup_time(job, previous_capability), duration=self.processing_time(job))

    def describe(self) -> dict[str, Any]:
        data = super().describe()
        data["durations"] = {cap: m.to_config() for cap, m in sorted(self.durations.items())}
        data["setups"] = {cap: m.to_config() for cap, m in sorted(self.setups.items())}
        return data
