"""Issue 11's reference negotiation workload, defined once for twinbid's scenario and the bare net.

20 resources and 20 capabilities; capability c is offered by the k resources (c + j) mod 20 for
j < k; product p's step s needs capability (7p + 3s) mod 20; each product runs 10 steps. The cost
rates are ours (the issue leaves them open): 1 + (7r + c) mod 5.
"""

from __future__ import annotations

N_RES = 20
STEPS = 10
ALONE = (10, 1, 1)  # k, processes, products: one product negotiating alone with 10 bidders


def offerers(c: int, k: int) -> list[int]:
    """The resources offering capability c."""
    return sorted({(c + j) % N_RES for j in range(k)})


def offered_by(r: int, k: int) -> list[int]:
    """The capabilities resource r offers."""
    return [c for c in range(N_RES) if r in offerers(c, k)]


def capability(p: int, s: int) -> int:
    """The capability step s of product p needs."""
    return (7 * p + 3 * s) % N_RES


def cost_rate(r: int, c: int) -> int:
    return 1 + (r * 7 + c) % 5
