"""A researcher's own selection policy, named in scenarios as ``selection_policies:Slowest``
(pytest puts tests/ on the path)."""

from __future__ import annotations

from protocol.selection import Offer, Ranked


class Slowest:
    """The latest completion first: the opposite of what any built-in policy would choose."""

    name = "slowest"

    def rank(self, offers: list[Offer], priority: int) -> list[Ranked]:
        ordered = sorted(offers, key=lambda o: (-o.bid.completion, o.provider))
        return [
            Ranked(o, -o.bid.completion, f"completion {o.bid.completion:g}, latest first") for o in ordered
        ]


class NeedsArguments:
    """A class that cannot be made without arguments: refused when a product makes its policy."""

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def rank(self, offers: list[Offer], priority: int) -> list[Ranked]:
        return []
