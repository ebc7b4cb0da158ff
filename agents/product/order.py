"""What a product twin is asked to make: the order and its process plan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PlannedStep:
    index: int  # 1-based, as in the ProcessPlan submodel
    capability: str
    alternatives: tuple[str, ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)
    nominal: float = 0.0  # nominal work, for the remaining-work figure in calls


@dataclass(frozen=True)
class ProductOrder:
    name: str  # the product instance's short name
    product_type: str
    priority: int
    release: float
    steps: tuple[PlannedStep, ...]
    location: str = ""
    due: float | None = None
    vendor: str | None = None
    notify_url: str | None = None
    customization: dict[str, Any] = field(default_factory=dict)
    aas_id: str | None = None  # given by the vendor's shell; derived from the name otherwise
    #: The selection policy (protocol.selection.make_policy spec) this product ranks offers with.
    selection: str = "priority-weighted"

    def remaining_work(self, from_index: int) -> float:
        return sum(s.nominal for s in self.steps if s.index >= from_index)
