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

Progress events (``i40/{ns}/events/...``) are not journaled: their gaps cannot be known, and the
summary says so.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from sqlmodel import select

from agents.persistence.database import Database
from agents.persistence.tables import AgentRecord, OutboxRecord

__all__ = ["SentFrame", "log_ids", "reconcile", "sent_frames", "summarize"]

EVENTS_NOTE = "progress events are not journaled: their gaps cannot be checked"


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


def log_ids(path: Path) -> tuple[set[str], set[str], tuple[float, float] | None]:
    """Message ids of the frames a log holds as delivered, those filled in by reconciliation, and
    the first and last receive time (ms) of the delivered lines (None for an empty log)."""
    delivered: set[str] = set()
    reconciled: set[str] = set()
    first = last = None
    if not path.exists():
        return delivered, reconciled, None
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break  # a torn last line of a live recording
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            message = rec.get("message") if isinstance(rec, dict) else None
            frame = message.get("frame") if isinstance(message, dict) else None
            mid = frame.get("messageId") if isinstance(frame, dict) else None
            if rec.get("reconciled"):
                if isinstance(mid, str):
                    reconciled.add(mid)
                continue
            if isinstance(mid, str):
                delivered.add(mid)
            ms = rec.get("received_ms")
            if isinstance(ms, int | float):
                first = ms if first is None else min(first, ms)
                last = ms if last is None else max(last, ms)
    return delivered, reconciled, (first, last) if first is not None else None


def summarize(
    sent: Iterable[tuple[str, bool, float]],
    delivered: set[str],
    reconciled: set[str],
    recording_started_ms: float | None = None,
) -> dict[str, Any]:
    """The completeness figures of a log. ``sent``: (message id, acknowledged, created wall ms).

    With ``recording_started_ms`` (an observer's start) the missing frames sent before it are
    counted apart (``missing_before_start``): the recording began late."""
    n_sent = n_recorded = n_reconciled = unacked = before = 0
    missing: list[float] = []
    for mid, acked, created_ms in sent:
        if not acked:
            unacked += mid not in delivered
            continue
        n_sent += 1
        if mid in delivered:
            n_recorded += 1
        elif mid in reconciled:
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
        "events": EVENTS_NOTE,
    }
    if recording_started_ms is not None:
        summary["missing_before_start"] = before
    return summary


def completeness(
    db: Database, path: Path, *, until_ms: int | None = None, recording_started_ms: float | None = None
) -> dict[str, Any]:
    """The log at ``path`` checked against the journal (nothing written)."""
    delivered, reconciled, _ = log_ids(path)
    frames = sent_frames(db, until_ms=until_ms)
    return summarize(
        ((f.message_id, f.acknowledged, f.created_wall_ms) for f in frames),
        delivered,
        reconciled,
        recording_started_ms,
    )


def reconcile(db: Database, path: Path) -> dict[str, Any]:
    """Append every acknowledged frame the log lacks, marked ``"reconciled": true``; the summary
    after filling (``reconciled`` says how many lines were filled in, now or before)."""
    delivered, reconciled, _ = log_ids(path)
    frames = sent_frames(db)
    gaps = [f for f in frames if f.acknowledged and f.message_id not in delivered | reconciled]
    if gaps:
        with path.open("ab") as f:
            for row in _outbox_rows(db, gaps):
                try:
                    message: Any = orjson.loads(row.payload)
                except orjson.JSONDecodeError:
                    message = row.payload
                line = {
                    "received_ms": None,
                    "sent_ms": row.created_wall_ms,
                    "topic": row.topic,
                    "type": row.type,
                    "message": message,
                    "reconciled": True,
                }
                f.write(orjson.dumps(line) + b"\n")
        reconciled |= {g.message_id for g in gaps}
    return summarize(
        ((f.message_id, f.acknowledged, f.created_wall_ms) for f in frames), delivered, reconciled
    )
