"""Is the negotiation log complete? Checked against the journal's outbox, its gaps filled and marked.

Why: the recorder writes what the broker delivered to it. A broker killed with SIGKILL loses the
QoS 1 messages it had accepted but not yet passed on (mosquitto saves its store only now and
then), and an observer started late never saw what went before; either way messages.jsonl would
be silently short of messages that did reach their receivers. Every frame an agent sends is
written to its outbox before it is published, and the broker's acknowledgement moves the agent's
published watermark, so the journal knows what was sent and the log can be checked against it.

- :func:`summarize` is the one definition of the figures (used by the launcher, `twinbid stats`
  and `twinbid observe`): ``sent`` (frames the broker acknowledged), ``recorded`` (of those, in the
  log as delivered), ``reconciled`` (filled in from the outbox), ``missing`` (in neither) and
  ``complete``. Frames an agent journaled but the broker never acknowledged (``unacknowledged``)
  may never have left the agent; they are counted, not filled in.
- :func:`reconcile` appends every missing frame to the log as it stands in the outbox, marked
  ``"reconciled": true`` with its ``sent_ms`` and no ``received_ms`` (nobody saw it delivered).

Progress events (``i40/{ns}/events/...``) are journaled too (``tb_event``, committed before they
are published): they are checked and filled in the same way, matched by agent, kind, product,
step and simulated time (they carry no message id), and summarized apart under ``events``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from sqlmodel import select

from agents.persistence.database import Database
from agents.persistence.tables import AgentRecord, EventRecord, OutboxRecord
from protocol.topics import events_topic

__all__ = ["LogContents", "SentFrame", "event_key", "read_log", "reconcile", "sent_frames", "summarize"]


@dataclass(frozen=True)
class SentFrame:
    """One outbox row, as far as completeness is concerned (its payload is read only for a gap)."""

    agent: str
    message_id: str
    acknowledged: bool  # the broker acknowledged it (published flag or the agent's watermark)
    created_wall_ms: int


def sent_frames(db: Database, *, until_ms: int | None = None) -> list[SentFrame]:
    """Every frame the agents journaled (created up to ``until_ms``), one per message id."""
    o = OutboxRecord
    with db.session() as s:
        marks = {a.name: a.published_seq for a in s.exec(select(AgentRecord)).all()}
        query = select(o.agent, o.message_id, o.seq, o.published, o.created_wall_ms)
        if until_ms is not None:
            query = query.where(o.created_wall_ms <= until_ms)
        rows = s.exec(query.order_by(o.created_wall_ms, o.agent, o.seq)).all()
    out: dict[str, SentFrame] = {}
    for agent, mid, seq, published, created in rows:
        acked = bool(published) or seq <= (marks.get(agent) or 0)
        if mid in out and not acked:
            continue
        out[mid] = SentFrame(agent, mid, acked, int(created))
    return list(out.values())


def _outbox_rows(db: Database, frames: list[SentFrame]) -> list[OutboxRecord]:
    """The full outbox rows of ``frames`` (in their order), read in bounded batches."""
    rows: dict[tuple[str, str], OutboxRecord] = {}
    with db.session() as s:
        for i in range(0, len(frames), 500):
            ids = [f.message_id for f in frames[i : i + 500]]
            for r in s.exec(select(OutboxRecord).where(OutboxRecord.message_id.in_(ids))).all():
                rows[(r.agent, r.message_id)] = r
    return [rows[(f.agent, f.message_id)] for f in frames if (f.agent, f.message_id) in rows]


def event_key(agent: Any, kind: Any, product: Any, step: Any, sim: Any) -> tuple[Any, ...]:
    """What identifies a progress event (it has no message id), the same from the journal, a
    recorded line or a table row (NaN and None alike)."""

    def absent(v: Any) -> bool:
        try:
            return v is None or bool(v != v)  # None or NaN
        except TypeError:  # pandas' NA, which is neither equal nor unequal to itself
            return True

    return (
        str(agent),
        str(kind),
        None if absent(product) else str(product),
        None if absent(step) else int(step),
        None if absent(sim) else float(sim),
    )


@dataclass
class LogContents:
    """What a log holds: frames by message id and events by :func:`event_key`, as delivered and
    as filled in, and the first and last receive time (ms) of the delivered lines."""

    frames: Counter[str] = field(default_factory=Counter)
    filled_frames: Counter[str] = field(default_factory=Counter)
    events: Counter[tuple[Any, ...]] = field(default_factory=Counter)
    filled_events: Counter[tuple[Any, ...]] = field(default_factory=Counter)
    span: tuple[float, float] | None = None


def read_log(path: Path) -> LogContents:
    """Read a recorder's JSON Lines file (a torn last line of a live recording is left out)."""
    out = LogContents()
    first = last = None
    if not path.exists():
        return out
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            message = rec.get("message") if isinstance(rec, dict) else None
            if not isinstance(message, dict):
                continue
            filled = bool(rec.get("reconciled"))
            frame = message.get("frame")
            mid = frame.get("messageId") if isinstance(frame, dict) else None
            if isinstance(mid, str):
                (out.filled_frames if filled else out.frames)[mid] += 1
            elif "event" in message:
                key = event_key(message.get("agent"), message["event"], message.get("product"),
                                message.get("step"), message.get("sim"))  # fmt: skip
                (out.filled_events if filled else out.events)[key] += 1
            ms = rec.get("received_ms")
            if not filled and isinstance(ms, int | float):
                first = ms if first is None else min(first, ms)
                last = ms if last is None else max(last, ms)
    out.span = (first, last) if first is not None else None
    return out


def summarize(
    sent: Iterable[tuple[Hashable, bool, float]],
    delivered: Counter[Any],
    reconciled: Counter[Any],
    recording_started_ms: float | None = None,
) -> dict[str, Any]:
    """The completeness figures of a log. ``sent``: (key, acknowledged, created wall ms), once per
    message sent; ``delivered``/``reconciled``: how often the log holds each key either way.

    With ``recording_started_ms`` (an observer's start) the missing messages sent before it are
    counted apart (``missing_before_start``): the recording began late."""
    delivered, reconciled = Counter(delivered), Counter(reconciled)
    n_sent = n_recorded = n_reconciled = unacked = before = 0
    missing: list[float] = []
    for key, acked, created_ms in sent:
        if not acked:
            unacked += delivered[key] == 0
            continue
        n_sent += 1
        if delivered[key] > 0:
            delivered[key] -= 1
            n_recorded += 1
        elif reconciled[key] > 0:
            reconciled[key] -= 1
            n_reconciled += 1
        else:
            missing.append(created_ms)
            if recording_started_ms is not None and created_ms < recording_started_ms:
                before += 1
    summary: dict[str, Any] = {
        "sent": n_sent,
        "recorded": n_recorded,
        "reconciled": n_reconciled,
        "missing": len(missing),
        "unacknowledged": unacked,
        "complete": not missing,
        "first_missing_ms": min(missing) if missing else None,
        "last_missing_ms": max(missing) if missing else None,
    }
    if recording_started_ms is not None:
        summary["missing_before_start"] = before
    return summary


def combined(frames: dict[str, Any], events: dict[str, Any]) -> dict[str, Any]:
    """The frames' summary with the events' beside it; complete only if both are."""
    events = {k: v for k, v in events.items() if k != "unacknowledged"}
    return {**frames, "complete": frames["complete"] and events["complete"], "events": events}


def journaled_events(db: Database, *, until_ms: int | None = None) -> list[EventRecord]:
    with db.session() as s:
        query = select(EventRecord)
        if until_ms is not None:
            query = query.where(EventRecord.wall_ms <= until_ms)
        return list(s.exec(query.order_by(EventRecord.wall_ms, EventRecord.id)).all())


def _event_sent(rows: Iterable[EventRecord]) -> list[tuple[Hashable, bool, float]]:
    return [(event_key(e.agent, e.kind, e.product, e.step, e.sim), True, float(e.wall_ms)) for e in rows]


def completeness(
    db: Database, path: Path, *, until_ms: int | None = None, recording_started_ms: float | None = None
) -> dict[str, Any]:
    """The log at ``path`` checked against the journal (nothing written)."""
    log = read_log(path)
    frames = sent_frames(db, until_ms=until_ms)
    events = journaled_events(db, until_ms=until_ms)
    return combined(
        summarize(((f.message_id, f.acknowledged, f.created_wall_ms) for f in frames),
                  log.frames, log.filled_frames, recording_started_ms),
        summarize(_event_sent(events), log.events, log.filled_events, recording_started_ms),
    )  # fmt: skip


def reconcile(db: Database, path: Path, ns: str) -> dict[str, Any]:
    """Append every acknowledged frame and every journaled event the log lacks, marked
    ``"reconciled": true``; the summary after filling (``reconciled``: lines filled in, now or
    before). ``ns``: the plant namespace (an event's topic)."""
    log = read_log(path)
    frames = sent_frames(db)
    have = log.frames + log.filled_frames
    gaps = [f for f in frames if f.acknowledged and have[f.message_id] == 0]
    events = journaled_events(db)
    have_events = log.events + log.filled_events
    event_gaps = []
    for e in events:
        key = event_key(e.agent, e.kind, e.product, e.step, e.sim)
        if have_events[key] > 0:
            have_events[key] -= 1
        else:
            event_gaps.append(e)
    lines: list[dict[str, Any]] = []
    for row in _outbox_rows(db, gaps):
        try:
            message: Any = orjson.loads(row.payload)
        except orjson.JSONDecodeError:
            message = row.payload
        lines.append(
            {"sent_ms": row.created_wall_ms, "topic": row.topic, "type": row.type, "message": message}
        )
        log.filled_frames[row.message_id] += 1
    for e in event_gaps:  # the body Agent.event publishes
        body = {"event": e.kind, "agent": e.agent, "product": e.product, "step": e.step, "sim": e.sim,
                **orjson.loads(e.data or "{}")}  # fmt: skip
        lines.append(
            {"sent_ms": e.wall_ms, "topic": events_topic(ns, e.agent), "type": None, "message": body}
        )
        log.filled_events[event_key(e.agent, e.kind, e.product, e.step, e.sim)] += 1
    if lines:
        with path.open("ab") as f:
            for line in sorted(lines, key=lambda x: x["sent_ms"]):
                f.write(orjson.dumps({"received_ms": None, **line, "reconciled": True}) + b"\n")
    return combined(
        summarize(((f.message_id, f.acknowledged, f.created_wall_ms) for f in frames),
                  log.frames, log.filled_frames),
        summarize(_event_sent(events), log.events, log.filled_events),
    )  # fmt: skip
