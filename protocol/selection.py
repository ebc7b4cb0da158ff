"""Choosing among proposals by the product's priority.

The reference platform's rule: top-priority instances as soon as possible,
lowest-priority ones as inexpensively as possible. Between the two ends we blend
the two criteria linearly, each normalised over the offers at hand:

    w = (priority - 1) / (levels - 1)            # 0 for priority 1 (top), 1 for the lowest
    score = (1 - w) * norm(completion) + w * norm(price)     # lower is better
    norm(x) = (x - min) / (max - min), or 0 when all offers agree

An offer that finishes after the step's latest on-time end (the product's due date less the
work after this step) ranks behind every offer that keeps the product on time: a price or a
blend is no reason to make a product late. Ties break by earlier completion, then lower price,
then provider id, so the same offers always give the same winner. Researchers plug in their own policy by
implementing `SelectionPolicy.rank` and naming it as ``module:Class`` (see `make_policy`);
a scenario chooses the policy per priority (``bidding.selection``), and the product keeps
the choice in its record, so a restarted product ranks as it did before.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

from protocol.elements import PRIORITY_LEVELS, Bid


@dataclass(frozen=True, slots=True)
class Offer:
    """A proposal as the requester sees it."""

    proposal_id: str
    provider: str  # AAS id of the bidder
    bid: Bid
    #: When the step must end for the product to meet its due date (inf: no due date); the
    #: requester sets it from its call (`StepCall.latest_end`).
    latest_end: float = float("inf")

    @property
    def late(self) -> bool:
        """Does this offer make the product late?"""
        return self.bid.completion > self.latest_end + 1e-9


@dataclass(frozen=True, slots=True)
class Ranked:
    offer: Offer
    score: float
    reason: str  # a short human-readable account of the score


class SelectionPolicy(Protocol):
    name: str

    def rank(self, offers: list[Offer], priority: int) -> list[Ranked]:
        """Return the offers best first; the first one wins."""
        ...


def _norm(values: list[float]) -> list[float]:
    lo, hi = min(values), max(values)
    span = hi - lo
    return [0.0 if span <= 0 else (v - lo) / span for v in values]


def price_weight(priority: int, levels: int = PRIORITY_LEVELS) -> float:
    if not 1 <= priority <= levels:
        raise ValueError(f"priority {priority} outside 1..{levels}")
    return (priority - 1) / (levels - 1)


@dataclass(frozen=True)
class PriorityWeighted:
    """The default policy described in the module docstring."""

    levels: int = PRIORITY_LEVELS
    name: str = "priority-weighted"

    def rank(self, offers: list[Offer], priority: int) -> list[Ranked]:
        if not offers:
            return []
        w = price_weight(min(max(priority, 1), self.levels), self.levels)
        t_norm = _norm([o.bid.completion for o in offers])
        p_norm = _norm([o.bid.price for o in offers])
        on_time = any(not o.late for o in offers)
        scored = []
        for o, t, p in zip(offers, t_norm, p_norm, strict=True):
            score = (1 - w) * t + w * p
            reason = (
                f"priority {priority}: score {score:.4f} = {1 - w:.2f}*completion({o.bid.completion:g}→{t:.3f})"
                f" + {w:.2f}*price({o.bid.price:g}→{p:.3f})"
            )
            if on_time and o.late:
                reason += f"; late (ends after {o.latest_end:g}): behind every on-time offer"
            scored.append(Ranked(o, score, reason))
        scored.sort(
            key=lambda r: (
                on_time and r.offer.late,
                r.score,
                r.offer.bid.completion,
                r.offer.bid.price,
                r.offer.provider,
            )
        )
        return scored


@dataclass(frozen=True)
class EarliestCompletion:
    """Always the earliest completion, whatever the priority (a baseline for studies)."""

    name: str = "earliest-completion"

    def rank(self, offers: list[Offer], priority: int) -> list[Ranked]:
        ordered = sorted(offers, key=lambda o: (o.bid.completion, o.bid.price, o.provider))
        return [Ranked(o, o.bid.completion, f"completion {o.bid.completion:g}") for o in ordered]


@dataclass(frozen=True)
class Cheapest:
    """Always the lowest price, whatever the priority (a baseline for studies)."""

    name: str = "cheapest"

    def rank(self, offers: list[Offer], priority: int) -> list[Ranked]:
        ordered = sorted(offers, key=lambda o: (o.bid.price, o.bid.completion, o.provider))
        return [Ranked(o, o.bid.price, f"price {o.bid.price:g}") for o in ordered]


POLICIES: dict[str, type] = {
    "priority-weighted": PriorityWeighted,
    "earliest-completion": EarliestCompletion,
    "cheapest": Cheapest,
}


DEFAULT_POLICY = "priority-weighted"


class PolicyError(ValueError):
    """A selection policy that cannot be made: unknown name, module or class, or no ``rank``."""


def make_policy(spec: str) -> SelectionPolicy:
    """The policy a spec names: a built-in name (`POLICIES`) or ``module:Class`` for a class
    importable on the path, made with no arguments and offering ``rank(offers, priority)``.

    Scenarios check the same spec when they are validated (``scenarios.schema.Selection``);
    here it is made, so what a scenario cannot know (a constructor that fails) is refused here.
    """
    if spec in POLICIES:
        return POLICIES[spec]()
    if ":" not in spec:
        raise PolicyError(
            f"unknown selection policy {spec!r}; known: {', '.join(sorted(POLICIES))}, or module:Class"
        )
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise PolicyError(f"selection policy {spec!r}: write module:Class, e.g. mypackage.policies:Fastest")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PolicyError(f"selection policy {spec!r}: cannot import module {module_name!r}: {exc}") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise PolicyError(f"selection policy {spec!r}: module {module_name!r} has no class {class_name!r}")
    try:
        policy = cls()
    except Exception as exc:  # a researcher's constructor: report it, whatever it raised
        raise PolicyError(f"selection policy {spec!r}: {class_name}() failed: {exc}") from None
    if not callable(getattr(policy, "rank", None)):
        raise PolicyError(f"selection policy {spec!r}: {class_name} has no rank(offers, priority) method")
    return policy


def policy_name(policy: SelectionPolicy) -> str:
    """How records name a policy: its ``name``, else its class as ``module:Class``."""
    name = getattr(policy, "name", None)
    return (
        name if isinstance(name, str) and name else f"{type(policy).__module__}:{type(policy).__qualname__}"
    )
