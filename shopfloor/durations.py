"""Processing-time models, deterministic per job.

A scenario gives a duration as a plain value:

* a number                        -> fixed
* ``{"fixed": x}``                -> fixed
* ``{"uniform": [lo, hi]}``       -> uniform on [lo, hi]
* ``{"triangular": [lo, mode, hi]}``
* ``{"normal": [mean, sd]}``      -> normal, truncated to > 0 (re-drawn until positive)

Why "deterministic per job": the sample for a job is drawn from a random stream seeded by
``"{seed}:{asset}:{job_id}:{what}"``, not from a shared generator. So ``estimate()`` (at bidding
time) and ``execute()`` (later) agree exactly, the bid is honest, and no result depends on the order
in which jobs happen to be asked about or executed, nor on a process restart in between.
String seeds are hashed with SHA-512 by :class:`random.Random`, independent of ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DurationModel",
    "Fixed",
    "Normal",
    "Triangular",
    "Uniform",
    "job_rng",
    "parse_duration",
    "step_duration",
]


def step_duration(params: Mapping[str, Any] | None, capability: str) -> float | None:
    """The time a plan step fixes for itself on ``capability`` (``duration:<capability>``, else
    ``duration``), or None: a step's own duration wins over the resource's (job shops give one
    machine many job times, and a scenario may time a store step itself)."""
    params = params or {}
    override = params.get(f"duration:{capability}", params.get("duration"))
    if isinstance(override, int | float) and not isinstance(override, bool) and override >= 0:
        return float(override)
    return None


def job_rng(seed: object, *parts: object) -> random.Random:
    """A random stream that depends only on the seed and the given key parts."""
    return random.Random(":".join(str(p) for p in (seed, *parts)))


class DurationModel(ABC):
    """A distribution of non-negative durations (simulated time units)."""

    @abstractmethod
    def sample(self, rng: random.Random) -> float: ...

    @property
    @abstractmethod
    def mean(self) -> float: ...

    def sample_for(self, seed: object, *key: object) -> float:
        """The sample for one key (e.g. ``(asset, job_id, capability)``): same key, same value."""
        return self.sample(job_rng(seed, *key))

    @abstractmethod
    def to_config(self) -> Any:
        """The plain config value this model parses from (round-trips through :func:`parse_duration`)."""


def _num(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return value


@dataclass(frozen=True)
class Fixed(DurationModel):
    value: float

    def __post_init__(self) -> None:
        if _num(self.value, "fixed duration") < 0:
            raise ValueError(f"duration must be >= 0, got {self.value}")

    def sample(self, rng: random.Random) -> float:
        return float(self.value)

    def sample_for(self, seed: object, *key: object) -> float:
        return float(self.value)  # no random stream to seed (seeding one cost more than the bid)

    @property
    def mean(self) -> float:
        return float(self.value)

    def to_config(self) -> Any:
        return self.value


@dataclass(frozen=True)
class Uniform(DurationModel):
    lo: float
    hi: float

    def __post_init__(self) -> None:
        lo, hi = _num(self.lo, "uniform lo"), _num(self.hi, "uniform hi")
        if not 0 <= lo <= hi:
            raise ValueError(f"uniform needs 0 <= lo <= hi, got [{lo}, {hi}]")

    def sample(self, rng: random.Random) -> float:
        return rng.uniform(self.lo, self.hi)

    @property
    def mean(self) -> float:
        return (self.lo + self.hi) / 2

    def to_config(self) -> Any:
        return {"uniform": [self.lo, self.hi]}


@dataclass(frozen=True)
class Triangular(DurationModel):
    lo: float
    mode: float
    hi: float

    def __post_init__(self) -> None:
        lo, mode, hi = (_num(v, "triangular value") for v in (self.lo, self.mode, self.hi))
        if not 0 <= lo <= mode <= hi:
            raise ValueError(f"triangular needs 0 <= lo <= mode <= hi, got [{lo}, {mode}, {hi}]")

    def sample(self, rng: random.Random) -> float:
        return rng.triangular(self.lo, self.hi, self.mode)

    @property
    def mean(self) -> float:
        return (self.lo + self.mode + self.hi) / 3

    def to_config(self) -> Any:
        return {"triangular": [self.lo, self.mode, self.hi]}


@dataclass(frozen=True)
class Normal(DurationModel):
    """Normal(mean, sd) truncated to > 0: negative or zero draws are re-drawn (deterministically)."""

    mu: float
    sd: float

    def __post_init__(self) -> None:
        mu, sd = _num(self.mu, "normal mean"), _num(self.sd, "normal sd")
        if mu <= 0 or sd < 0:
            raise ValueError(f"normal needs mean > 0 and sd >= 0, got [{mu}, {sd}]")

    def sample(self, rng: random.Random) -> float:
        for _ in range(1000):
            x = rng.gauss(self.mu, self.sd)
            if x > 0:
                return x
        return float(self.mu)  # only reachable for absurd sd/mean ratios

    @property
    def mean(self) -> float:
        """The mean of the *untruncated* distribution (close enough unless sd is large vs. mean)."""
        return float(self.mu)

    def to_config(self) -> Any:
        return {"normal": [self.mu, self.sd]}


_ARITY = {"fixed": 1, "uniform": 2, "triangular": 3, "normal": 2}


def parse_duration(value: Any) -> DurationModel:
    """Parse a plain config value (see module docstring) into a :class:`DurationModel`."""
    if isinstance(value, DurationModel):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return Fixed(float(value))
    if isinstance(value, Mapping):
        if len(value) != 1:
            raise ValueError(
                f"a duration mapping must have exactly one key of {sorted(_ARITY)}, got {value!r}"
            )
        ((kind, args),) = value.items()
        kind = str(kind).lower()
        if kind not in _ARITY:
            raise ValueError(f"unknown duration model {kind!r}; expected one of {sorted(_ARITY)}")
        if isinstance(args, int | float) and not isinstance(args, bool):
            args = [args]
        if not isinstance(args, Sequence) or isinstance(args, str) or len(args) != _ARITY[kind]:
            raise ValueError(f"{kind} needs {_ARITY[kind]} number(s), got {args!r}")
        if kind == "fixed":
            return Fixed(_num(args[0], "fixed duration"))
        if kind == "uniform":
            return Uniform(*args)
        if kind == "triangular":
            return Triangular(*args)
        return Normal(*args)
    raise ValueError(f"cannot parse a duration from {value!r}")
