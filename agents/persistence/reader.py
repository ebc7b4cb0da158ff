"""What an agent reads back from the run database when it starts, one place for all of it.

A process taking over a crashed share starts dozens of agents at once, and each used
to open six sessions of its own (its record, steps, documentation, conversations, work
orders, unsent messages): about half of the takeover time. :meth:`StateReader.preload`
reads the rows of many agents in one query per table; each agent then takes its own
rows from memory, once. An agent that was not preloaded is preloaded alone at its first
read (one session instead of six); what it did not take is forgotten once it started.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from sqlmodel import func, select

from agents.persistence.database import Database
from agents.persistence.tables import (
    AgentRecord,
    ConversationRecord,
    DocumentationRecord,
    OutboxRecord,
    ProductRecord,
    StepRecord,
    WorkOrderRecord,
)

OPEN_WORK = ("held", "booked", "running")
_CHUNK = 500  # names per IN (...) list


class StateReader:
    def __init__(self, db: Database) -> None:
        self.db = db
        # agent name -> (kind, key) -> rows; per agent, so that forgetting one is not a scan of all
        self._cache: dict[str, dict[tuple[str, str], Any]] = {}

    # --- bulk ----------------------------------------------------------------------------------------

    def preload(self, names: Iterable[str]) -> None:
        """Read every row the agents ``names`` will ask for at start, in one query per table."""
        names = sorted(set(names))
        found: dict[tuple[str, str], Any] = {}
        with self.db.session() as s:
            for chunk in (names[i : i + _CHUNK] for i in range(0, len(names), _CHUNK)):
                for r in s.exec(select(AgentRecord).where(AgentRecord.name.in_(chunk))):  # type: ignore[attr-defined]
                    found[("agent", r.name)] = r
                for r in s.exec(select(ProductRecord).where(ProductRecord.product.in_(chunk))):  # type: ignore[attr-defined]
                    found[("product", r.product)] = r
                self._group(found, "steps", s.exec(select(StepRecord).where(StepRecord.product.in_(chunk))), lambda r: r.product)  # type: ignore[attr-defined]  # fmt: skip
                self._group(found, "docs", s.exec(select(DocumentationRecord).where(DocumentationRecord.product.in_(chunk))), lambda r: r.product)  # type: ignore[attr-defined]  # fmt: skip
                self._group(found, "conversations", s.exec(select(ConversationRecord).where(ConversationRecord.agent.in_(chunk))), lambda r: f"{r.agent}\0{r.role}")  # type: ignore[attr-defined]  # fmt: skip
                self._group(found, "work", s.exec(select(WorkOrderRecord).where(WorkOrderRecord.resource.in_(chunk), WorkOrderRecord.state.in_(OPEN_WORK))), lambda r: r.resource)  # type: ignore[attr-defined]  # fmt: skip
                # not acknowledged: above the agent's watermark (v3), and not flagged (rows of v2)
                unsent = (
                    select(OutboxRecord)
                    .join(AgentRecord, AgentRecord.name == OutboxRecord.agent, isouter=True)  # type: ignore[arg-type]
                    .where(
                        OutboxRecord.agent.in_(chunk),  # type: ignore[attr-defined]
                        OutboxRecord.published == False,  # noqa: E712
                        OutboxRecord.seq > func.coalesce(AgentRecord.published_seq, 0),
                    )
                    .order_by(OutboxRecord.seq)
                )
                self._group(found, "unsent", s.exec(unsent), lambda r: r.agent)
                for agent, seq in s.exec(select(OutboxRecord.agent, func.max(OutboxRecord.seq)).where(OutboxRecord.agent.in_(chunk)).group_by(OutboxRecord.agent)):  # type: ignore[attr-defined]  # fmt: skip
                    found[("last_seq", agent)] = seq
        for name in names:  # what was not found is known to be absent: no query later
            for kind, default in (("agent", None), ("product", None), ("steps", []), ("docs", []), ("work", []), ("unsent", []), ("last_seq", 0)):  # fmt: skip
                found.setdefault((kind, name), default)
            for role in ("requester", "provider"):
                found.setdefault(("conversations", f"{name}\0{role}"), [])
        for (kind, key), value in found.items():
            self._cache.setdefault(key.split("\0", 1)[0], {})[(kind, key)] = value

    @staticmethod
    def _group(found: dict, kind: str, rows: Iterable[Any], key: Callable[[Any], str]) -> None:
        grouped: dict[str, list] = defaultdict(list)
        for r in rows:
            grouped[key(r)].append(r)
        for name, items in grouped.items():
            found[(kind, name)] = items

    def _read(self, kind: str, name: str) -> Any:
        """The rows of one kind for one agent, taken from the preload (read now if not there)."""
        agent = name.split("\0", 1)[0]
        rows = self._cache.get(agent)
        if rows is None or (kind, name) not in rows:
            self.preload([agent])
            rows = self._cache[agent]
        return rows.pop((kind, name))

    def forget(self, name: str) -> None:
        """Drop what is left of an agent's preloaded rows once it has started: they were for that
        start (a later restart of the agent reads again)."""
        self._cache.pop(name, None)

    # --- per agent -------------------------------------------------------------------------------

    def agent(self, name: str) -> AgentRecord | None:
        return self._read("agent", name)

    def product(self, name: str) -> ProductRecord | None:
        return self._read("product", name)

    def steps(self, product: str) -> list[StepRecord]:
        return self._read("steps", product)

    def documentation(self, product: str) -> list[DocumentationRecord]:
        return self._read("docs", product)

    def conversations(self, agent: str, role: str) -> list[ConversationRecord]:
        return self._read("conversations", f"{agent}\0{role}")

    def open_work_orders(self, resource: str) -> list[WorkOrderRecord]:
        return self._read("work", resource)

    def unsent(self, agent: str) -> list[OutboxRecord]:
        """Outbox rows committed but not known to be published, in the order they were staged."""
        return self._read("unsent", agent)

    def last_seq(self, agent: str) -> int:
        return self._read("last_seq", agent)
