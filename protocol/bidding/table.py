"""The shape of a bidding transition table, shared by both machines (h11 `_state.py` style).

Each machine's `TABLE` maps (state, event) to a `Transition`: the handler that runs and the
states it may leave the machine in. The dispatch checks the state after the handler, so a
handler that moves somewhere its entry does not list fails loudly (the property tests drive
every reachable pair), and the table, not the handlers' bodies, is where a reader and
docs/protocol.md see where each transition goes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


@dataclass(frozen=True, slots=True)
class Transition:
    """What (state, event) does: run `handler`, ending in one of `targets`."""

    handler: str
    targets: frozenset[StrEnum]


def to(handler: str, *targets: StrEnum) -> Transition:
    """A table entry: `handler`, allowed to end in any of `targets` (list the state itself for a stay)."""
    return Transition(handler, frozenset(targets))


class TransitionError(RuntimeError):
    """A handler left its machine in a state its table entry does not allow: a bug in the machine."""


def dispatch(machine: Any, transition: Transition, event: str, *args: Any, **kw: Any) -> list[Any]:
    """Run `transition`'s handler on `machine` and check where it went."""
    before = machine.state
    effects = getattr(machine, transition.handler)(*args, **kw)
    if machine.state not in transition.targets:
        allowed = ", ".join(sorted(transition.targets))
        raise TransitionError(
            f"{type(machine).__name__}.{transition.handler}: {before} --{event}--> {machine.state};"
            f" the table allows {allowed}"
        )
    return effects
