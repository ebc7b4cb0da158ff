"""A run's record as pandas tables: every message, conversation, bid, step, resource, event, note.

    >>> from twinbid import analysis
    >>> run = analysis.load("runs/demo-line")
    >>> run.bids.groupby("resource").price.mean()

`load(OUT)` reads the output folder of `twinbid run` (`run.db`, `messages.jsonl`, `kpis.json`)
or of `twinbid observe` (`messages.jsonl` only: what the broker delivered, without the agents'
simulated times).  Every table is an ordinary `pandas.DataFrame`; the columns are listed in
`docs/analysis.md`.  Nothing here writes to the run.
"""

from __future__ import annotations

import heapq
import json
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from protocol.elements import Bid, Booking, Content, ElementError, Reason, StepCall, StepResult
from protocol.topics import TopicError, parse_topic
from scenarios import log_completeness
from scenarios.kpis import percentile  # one definition of the percentiles the KPIs report

__all__ = [
    "MESSAGE_TYPES",
    "NOTE_GROUPS",
    "Run",
    "RunNotFound",
    "decode",
    "load",
    "percentile",
    "read_recording",
    "recording_row",
    "summarise",
]

#: The bidding procedure's message types, in the order they occur in a conversation.
MESSAGE_TYPES = (
    "callForProposal",
    "proposal",
    "refuseProposal",
    "acceptProposal",
    "rejectProposal",
    "informConfirm",
    "inform",
    "informFailure",
    "notUnderstood",
)

#: How `stats` groups the protocol notes (tb_note.kind): late, duplicate, and rejected input.
NOTE_GROUPS: dict[str, tuple[str, ...]] = {
    "late": ("late",),
    "duplicate": ("duplicate", "repeated-accept"),
    "rejected": (
        "bad-frame",
        "bad-topic",
        "forged-sender",
        "wrong-receiver",
        "no-role",
        "not-understood",
        "bad-elements",
        "out-of-sequence",
        "not-participant",
        "wrong-product",
        "stray-confirm",
        "unknown-receiver",
    ),
}

_CONTENT: dict[str, type[Content]] = {
    "callForProposal": StepCall,
    "proposal": Bid,
    "acceptProposal": Bid,
    "informConfirm": Booking,
    "inform": StepResult,
    "refuseProposal": Reason,
    "rejectProposal": Reason,
    "informFailure": Reason,
    "notUnderstood": Reason,
}

_BID_FIELDS = (
    "resource",
    "capability",
    "earliest_start",
    "completion",
    "duration",
    "setup",
    "transport",
    "price",
    "valid_until",
    "location",
)


class RunNotFound(FileNotFoundError):
    """The folder holds neither a run database nor a recording."""


# --------------------------------------------------------------------------- decoding


def decode(kind: str | None, elements: Any) -> Content | None:
    """The content of a message of type `kind` (None when absent or unreadable)."""
    cls = _CONTENT.get(kind or "")
    if cls is None or not isinstance(elements, list):
        return None
    try:
        return cls.from_json_elements(elements)
    except (ElementError, TypeError, ValueError, AttributeError):
        return None


def _f(x: float | None, digits: int = 2) -> str:
    return "?" if x is None else f"{x:.{digits}f}"


def summarise(kind: str | None, content: Content | None) -> str:
    """One line saying what a message carries, e.g. ``mill-fast: 5.00-8.00, price 12.00``."""
    c = content
    if isinstance(c, StepCall):
        alts = f" (or {c.alternatives})" if c.alternatives else ""
        due = f", due {_f(c.due)}" if c.due is not None else ""
        return f"{c.capability}{alts} for {c.product}#{c.step}, prio {c.priority}, from {_f(c.release)}{due}"
    if isinstance(c, Bid):
        prefix = "award " if kind == "acceptProposal" else ""
        return (
            f"{prefix}{c.resource}: {_f(c.earliest_start)}-{_f(c.completion)}, price {_f(c.price)}, "
            f"valid to {_f(c.valid_until)}"
        )
    if isinstance(c, Booking):
        return f"booked {c.resource} {_f(c.start)}-{_f(c.completion)}"
    if isinstance(c, StepResult):
        delay = f", breakdown +{_f(c.breakdown_delay)}" if c.breakdown_delay else ""
        return f"{c.outcome} on {c.resource} {_f(c.started)}-{_f(c.finished)}{delay}"
    if isinstance(c, Reason):
        return f"{c.code}: {c.text}" if c.text else c.code
    return ""


def _topic_parts(topic: str) -> tuple[str | None, str | None, str | None, str | None]:
    """(channel, sender, receiver, capability) of a topic; Nones outside the scheme."""
    try:
        t = parse_topic(topic)
    except TopicError:
        return None, None, None, None
    return str(t.channel), t.sender, t.receiver, t.capability


# --------------------------------------------------------------------------- the recording


def read_recording(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a recorder's JSON Lines file; a torn last line (live run) is skipped."""
    if not path.exists():
        return
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield rec


def recording_row(rec: dict[str, Any]) -> dict[str, Any]:
    """Flatten one recorder record: frame fields for a message, event fields for an event."""
    body = rec.get("message")
    topic = str(rec.get("topic", ""))
    channel, sender, receiver, capability = _topic_parts(topic)
    row: dict[str, Any] = {
        "received_ms": rec.get("received_ms"),
        "topic": topic,
        "channel": channel,
        "sender": sender,
        "receiver": receiver,
        "capability": capability,
        "type": rec.get("type"),
        "dup": bool(rec.get("dup", False)),
        # filled in from the journal at the end of the run: sent, but never delivered to the recorder
        "reconciled": bool(rec.get("reconciled", False)),
        "message_id": None,
        "conversation_id": None,
        "in_reply_to": None,
        "reply_by": None,
        "event": None,
        "product": None,
        "step": None,
        "sim": None,
        "body": body,
    }
    frame = body.get("frame") if isinstance(body, dict) else None
    if isinstance(frame, dict):
        row["message_id"] = frame.get("messageId")
        row["conversation_id"] = frame.get("conversationId")
        row["in_reply_to"] = frame.get("inReplyTo")
        row["reply_by"] = frame.get("replyBy")
        row["type"] = row["type"] or frame.get("type")
    elif isinstance(body, dict) and "event" in body:
        row["event"] = body.get("event")
        row["product"] = body.get("product")
        row["step"] = body.get("step")
        row["sim"] = body.get("sim")
    return row


# --------------------------------------------------------------------------- the database


def _engine(url: str) -> Any:
    from sqlalchemy import create_engine

    if url.startswith("sqlite"):
        return create_engine(url, connect_args={"timeout": 30})
    return create_engine(url, pool_pre_ping=True)


def _read_tables(url: str, tables: Iterable[str]) -> dict[str, pd.DataFrame]:
    from sqlalchemy import inspect, text

    engine = _engine(url)
    try:
        present = set(inspect(engine).get_table_names())
        out = {}
        with engine.connect() as conn:
            for name in tables:
                if name in present:
                    out[name] = pd.read_sql_query(text(f"SELECT * FROM {name}"), conn)
        return out
    finally:
        engine.dispose()


TABLES = (
    "tb_outbox",
    "tb_inbox",
    "tb_step",
    "tb_product",
    "tb_work_order",
    "tb_event",
    "tb_note",
    "tb_agent",
    "tb_conversation",
    "tb_documentation",
)


# --------------------------------------------------------------------------- the run


@dataclass
class Run:
    """One run's record.  Tables (pandas DataFrames, empty when the source lacks them):

    - ``messages``: every message once (de-duplicated by messageId), in causal time order.
    - ``conversations``: one row per bidding procedure (one manufacturing step).
    - ``bids``: every proposal, its fields decoded from the AAS interactionElements, and its fate.
    - ``steps``, ``products``, ``work_orders``: the schedule as the agents recorded it.
    - ``resources``: per resource, calls, proposals, wins, win rate, busy time, utilisation.
    - ``events``: progress events; ``notes``: protocol notes (late, duplicate, rejected input...).
    - ``recorded``: the recorder's lines (every delivery, duplicates included).
    """

    out: Path
    messages: pd.DataFrame
    conversations: pd.DataFrame
    bids: pd.DataFrame
    steps: pd.DataFrame
    products: pd.DataFrame
    work_orders: pd.DataFrame
    resources: pd.DataFrame
    events: pd.DataFrame
    notes: pd.DataFrame
    recorded: pd.DataFrame
    deliveries: pd.DataFrame
    kpis: dict[str, Any] = field(default_factory=dict)
    has_database: bool = True
    t0_ms: float = 0.0

    # ----------------------------------------------------------------- queries

    @property
    def makespan(self) -> float:
        if "makespan" in self.kpis and self.kpis["makespan"] is not None:
            return float(self.kpis["makespan"])
        return _makespan(self.steps, self.products)

    @property
    def namespace(self) -> str | None:
        for topic in (
            self.recorded.get("topic", pd.Series(dtype=str)).head(50).tolist()
            + self.messages.get("topic", pd.Series(dtype=str)).head(50).tolist()
        ):
            parts = str(topic).split("/")
            if len(parts) > 2 and parts[0] == "i40":
                return parts[1]
        return None

    def find_conversation(self, spec: str) -> str:
        """A conversation id from its full id, a unique prefix, or ``product/step`` (``bracket-1/2``)."""
        ids = self.conversations["conversation_id"].tolist() if len(self.conversations) else []
        if spec in ids:
            return spec
        if "/" in spec or "#" in spec:
            product, _, step = spec.replace("#", "/").rpartition("/")
            c = self.conversations
            if step.isdigit() and len(c):
                hit = c[(c["product"] == product) & (c["step"] == int(step))]
                if len(hit) == 1:
                    return str(hit["conversation_id"].iloc[0])
            raise KeyError(f"no conversation for product {product!r} step {step!r}")
        matches = [i for i in ids if i.startswith(spec)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise KeyError(f"no conversation {spec!r}")
        raise KeyError(f"{spec!r} is ambiguous: {len(matches)} conversations start with it")

    def trace(self, conversation: str) -> pd.DataFrame:
        """The messages of one bidding procedure, in order, each exactly once."""
        cid = self.find_conversation(conversation)
        m = self.messages
        return m[m["conversation_id"] == cid].reset_index(drop=True)

    def receivers(self) -> dict[str, list[str]]:
        """Who received each broadcast call for proposal: from the agents' inboxes (tb_inbox),
        and, without a database, whoever answered it."""
        got: dict[str, set[str]] = defaultdict(set)
        d = self.deliveries
        if len(d):
            for mid, agent in zip(d.loc[d["type"] == "callForProposal", "message_id"],
                                  d.loc[d["type"] == "callForProposal", "agent"], strict=True):  # fmt: skip
                got[mid].add(agent)
        m = self.messages
        if len(m):
            calls = set(m.loc[m["type"] == "callForProposal", "message_id"])
            for parent, sender in zip(m["in_reply_to"], m["sender"], strict=True):
                if parent in calls and isinstance(sender, str):
                    got[parent].add(sender)
        return {k: sorted(v) for k, v in got.items()}

    def latencies(self) -> pd.Series:
        """Negotiation latency per conversation: first callForProposal -> informConfirm, wall ms."""
        c = self.conversations
        if not len(c):
            return pd.Series(dtype=float)
        return c.set_index("conversation_id")["latency_ms"].dropna()

    def utilisation_over_time(self, bins: int = 60) -> pd.DataFrame:
        """Busy fraction of each resource in `bins` equal windows of simulated time."""
        w = self.work_orders
        resources = self.resource_names()
        if not len(w) or not resources:
            return pd.DataFrame()
        done = w[w["state"] == "done"]
        start = done["started"].fillna(done["start"])
        end = done["finished"].fillna(done["end"])
        t0 = float(min(self.products["release"].min(), start.min())) if len(self.products) else start.min()
        t1 = float(end.max())
        if not math.isfinite(t1) or t1 <= t0:
            return pd.DataFrame()
        edges = [t0 + (t1 - t0) * i / bins for i in range(bins + 1)]
        width = (t1 - t0) / bins
        data = {r: [0.0] * bins for r in resources}
        for r, s, e in zip(done["resource"], start, end, strict=True):
            if r not in data:
                continue
            first = max(0, int((s - t0) / width))
            for i in range(first, bins):
                lo, hi = edges[i], edges[i + 1]
                if lo >= e:
                    break
                data[r][i] += max(0.0, min(e, hi) - max(s, lo)) / width
        return pd.DataFrame(data, index=pd.Index(edges[:-1], name="sim"))

    def queue_lengths(self) -> pd.DataFrame:
        """Steps booked at each resource and not yet started, as a step function of simulated time."""
        w = self.work_orders
        if not len(w) or "booked_sim" not in w:
            return pd.DataFrame()
        changes: dict[str, list[tuple[float, int]]] = defaultdict(list)
        for r in w.itertuples():
            if r.state not in ("done", "running", "booked", "failed") or pd.isna(r.booked_sim):
                continue
            begin = r.started if not pd.isna(r.started) else r.start
            changes[r.resource].append((float(r.booked_sim), 1))
            if r.state != "booked":
                changes[r.resource].append((float(begin), -1))
        times = sorted({t for ch in changes.values() for t, _ in ch})
        if not times:
            return pd.DataFrame()
        out = {}
        for res in self.resource_names():
            deltas = Counter()
            for t, d in changes.get(res, []):
                deltas[t] += d
            level, col = 0, []
            for t in times:
                level += deltas.get(t, 0)
                col.append(level)
            out[res] = col
        return pd.DataFrame(out, index=pd.Index(times, name="sim"))

    def resource_names(self) -> list[str]:
        return self.resources["resource"].tolist() if len(self.resources) else []

    def stats(self) -> dict[str, Any]:
        """The figures `twinbid stats` prints (see docs/observe.md)."""
        return _stats(self)

    def tables(self) -> dict[str, pd.DataFrame]:
        """Every table by name (what `to_csv` writes)."""
        messages = self.messages.drop(columns=["payload"], errors="ignore")
        return {
            "messages": messages,
            "conversations": self.conversations,
            "bids": self.bids,
            "steps": self.steps,
            "products": self.products,
            "work_orders": self.work_orders,
            "resources": self.resources,
            "events": self.events,
            "notes": self.notes,
            "deliveries": self.deliveries,
        }

    def to_csv(self, folder: Path | str) -> list[Path]:
        """Write every table as ``<folder>/<name>.csv``; return the paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, df in self.tables().items():
            path = folder / f"{name}.csv"
            _csv_ready(df).to_csv(path, index=False)
            paths.append(path)
        return paths


def _csv_ready(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for col in out.columns:
        if out[col].map(lambda v: isinstance(v, dict | list)).any():
            out[col] = out[col].map(
                lambda v: json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else v
            )
    return out


# --------------------------------------------------------------------------- loading


def load(out: Path | str, *, db: str | None = None) -> Run:
    """Read a run's output folder (or an observer's) into tables.

    `db` is the run database's URL when it is not `OUT/run.db` (e.g. PostgreSQL).
    """
    out = Path(out)
    db_path = out / "run.db"
    url = db or (f"sqlite:///{db_path}" if db_path.exists() else None)
    recording = out / "messages.jsonl"
    if url is None and not recording.exists():
        raise RunNotFound(f"{out}: neither run.db nor messages.jsonl")
    raw = _read_tables(url, TABLES) if url else {}
    kpis: dict[str, Any] = {}
    if (out / "kpis.json").exists():
        try:
            kpis = json.loads((out / "kpis.json").read_text())
        except ValueError:
            kpis = {}
    recorded = pd.DataFrame([recording_row(r) for r in read_recording(recording)])
    if not len(recorded):
        recorded = pd.DataFrame(columns=list(recording_row({}).keys()))
    outbox = raw.get("tb_outbox", pd.DataFrame())
    inbox = raw.get("tb_inbox", pd.DataFrame())
    steps_raw = raw.get("tb_step", pd.DataFrame())
    delivered = recorded[~recorded["reconciled"].astype(bool)] if len(recorded) else recorded
    messages = _messages(outbox, delivered, steps_raw, _watermarks(raw.get("tb_agent")))
    t0 = float(messages["time_ms"].min()) if len(messages) else 0.0
    if len(messages):
        messages["t_ms"] = messages["time_ms"] - t0
    events = _events(raw.get("tb_event"), delivered)
    products_raw = raw.get("tb_product", pd.DataFrame())
    orders_raw = raw.get("tb_work_order", pd.DataFrame())
    if url is None and len(messages):  # a recording alone: the schedule from the messages themselves
        steps_raw, orders_raw, products_raw = _schedule_from_messages(messages, events)
    products = _products(products_raw, steps_raw)
    steps = _steps(steps_raw, products)
    selections = _selections(raw.get("tb_documentation"))
    conversations = _conversations(messages, inbox, steps, selections)
    bids = _bids(messages, conversations, selections)
    work_orders = _work_orders(orders_raw, messages)
    notes = raw.get("tb_note", pd.DataFrame(columns=["id", "agent", "kind", "detail", "message_id", "sim"]))
    deliveries = inbox.drop(columns=["payload"], errors="ignore") if len(inbox) else pd.DataFrame()
    run = Run(
        out=out,
        messages=messages,
        conversations=conversations,
        bids=bids,
        steps=steps,
        products=products,
        work_orders=work_orders,
        resources=pd.DataFrame(),
        events=events,
        notes=notes,
        recorded=recorded.drop(columns=["body"], errors="ignore"),
        deliveries=deliveries,
        kpis=kpis,
        has_database=url is not None,
        t0_ms=t0,
    )
    run.resources = _resources(run, raw.get("tb_agent", pd.DataFrame()), inbox)
    return run


def _watermarks(agents: pd.DataFrame | None) -> dict[str, int]:
    """Each agent's published watermark: its outbox rows up to this seq were acknowledged by the
    broker (schema v3; rows of older runs carry their own ``published`` flag)."""
    if agents is None or not len(agents) or "published_seq" not in agents:
        return {}
    return {str(n): int(s) for n, s in zip(agents["name"], agents["published_seq"], strict=True)}


def _messages(
    outbox: pd.DataFrame,
    recorded: pd.DataFrame,
    steps: pd.DataFrame,
    watermarks: dict[str, int] | None = None,
) -> pd.DataFrame:
    watermarks = watermarks or {}
    frames = recorded[recorded["message_id"].notna()] if len(recorded) else recorded
    first_seen: dict[str, float] = {}
    seen_count: Counter[str] = Counter()
    bodies: dict[str, Any] = {}
    for mid, ms, body in zip(
        frames.get("message_id", []), frames.get("received_ms", []), frames.get("body", []), strict=False
    ):
        seen_count[mid] += 1
        if mid not in first_seen or ms < first_seen[mid]:
            first_seen[mid] = ms
            bodies.setdefault(mid, body)
    rows: list[dict[str, Any]] = []
    known: set[str] = set()
    if len(outbox):
        for r in outbox.sort_values(["created_wall_ms", "agent", "seq"]).itertuples(index=False):
            if r.message_id in known:
                continue
            known.add(r.message_id)
            try:
                body = json.loads(r.payload)
            except (TypeError, ValueError):
                body = None
            rows.append(
                _message_row(
                    body,
                    topic=r.topic,
                    kind=r.type,
                    sim=float(r.created_sim),
                    sent_ms=float(r.created_wall_ms),
                    received_ms=first_seen.get(r.message_id),
                    deliveries=seen_count.get(r.message_id, 0),
                    source="outbox",
                    agent=r.agent,
                    seq=int(r.seq),
                    published=bool(r.published) or int(r.seq) <= watermarks.get(r.agent, 0),
                    message_id=r.message_id,
                    conversation_id=r.conversation_id,
                )
            )
    for rec in frames.itertuples(index=False) if len(frames) else []:
        if rec.message_id in known:
            continue
        known.add(rec.message_id)
        rows.append(
            _message_row(
                rec.body,
                topic=rec.topic,
                kind=rec.type,
                sim=None,
                sent_ms=None,
                received_ms=first_seen.get(rec.message_id),
                deliveries=seen_count.get(rec.message_id, 0),
                source="recorder",
                agent=rec.sender,
                seq=None,
                published=True,
                message_id=rec.message_id,
                conversation_id=rec.conversation_id,
            )
        )
    columns = [
        "order", "message_id", "conversation_id", "type", "sender", "receiver", "capability",
        "product", "step", "sim", "time_ms", "t_ms", "sent_ms", "received_ms", "deliveries",
        "in_reply_to", "reply_by", "summary", "topic", "source", "seq", "published", "payload",
    ]  # fmt: skip
    if not rows:
        return pd.DataFrame(columns=columns)
    # which product and step each conversation is about: from its call for proposal, else tb_step
    about: dict[str, tuple[str, int]] = {}
    if len(steps):
        for conv, product, step in zip(
            steps["conversation_id"], steps["product"], steps["step"], strict=True
        ):
            if isinstance(conv, str):
                about[conv] = (product, int(step))
    for row in rows:
        call = row.pop("_content")
        if isinstance(call, StepCall):
            about.setdefault(row["conversation_id"], (call.product, call.step))
    for row in rows:
        product, step = about.get(row["conversation_id"], (None, None))
        row["product"], row["step"] = product, step
    rows = _causal_order(rows)
    df = pd.DataFrame(rows)
    df["order"] = range(len(df))
    df["step"] = df["step"].astype("Int64")
    df["reply_by"] = pd.to_numeric(df["reply_by"], errors="coerce").astype("Int64")
    df["t_ms"] = 0.0
    return df[columns]


def _message_row(body: Any, **known: Any) -> dict[str, Any]:
    frame = body.get("frame", {}) if isinstance(body, dict) else {}
    frame = frame if isinstance(frame, dict) else {}
    _channel, sender, receiver, capability = _topic_parts(str(known["topic"]))
    kind = known["kind"] or frame.get("type")
    content = decode(kind, body.get("interactionElements") if isinstance(body, dict) else None)
    if capability is None and isinstance(content, StepCall):
        capability = content.capability
    received, sent = known["received_ms"], known["sent_ms"]
    return {
        "message_id": known["message_id"],
        "conversation_id": known["conversation_id"] or frame.get("conversationId"),
        "type": kind,
        "sender": sender or known["agent"],
        "receiver": receiver,
        "capability": capability,
        "sim": known["sim"],
        "time_ms": received if received is not None and not pd.isna(received) else sent,
        "sent_ms": sent,
        "received_ms": received,
        "deliveries": known["deliveries"],
        "in_reply_to": frame.get("inReplyTo"),
        "reply_by": frame.get("replyBy"),
        "summary": summarise(kind, content),
        "topic": known["topic"],
        "source": known["source"],
        "seq": known["seq"],
        "published": known["published"],
        "payload": json.dumps(body) if not isinstance(body, str) else body,
        "_content": content,
    }


def _causal_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sort by time, but never a reply before what it answers (clocks of two hosts may disagree)."""
    ids = {r["message_id"]: i for i, r in enumerate(rows)}
    children: dict[int, list[int]] = defaultdict(list)
    waiting = [0] * len(rows)
    for i, r in enumerate(rows):
        parent = ids.get(r.get("in_reply_to"))
        if parent is not None and parent != i:
            children[parent].append(i)
            waiting[i] += 1

    def key(i: int) -> tuple[float, float, str, float, int]:
        r = rows[i]
        t = r["time_ms"]
        t = float("inf") if t is None or pd.isna(t) else float(t)
        sim = r["sim"] if r["sim"] is not None and not pd.isna(r["sim"]) else float("inf")
        return (t, sim, str(r["sender"]), r["seq"] if r["seq"] is not None else 0, i)

    heap = [key(i) for i in range(len(rows)) if waiting[i] == 0]
    heapq.heapify(heap)
    ordered: list[int] = []
    while heap:
        i = heapq.heappop(heap)[-1]
        ordered.append(i)
        for c in children.get(i, ()):
            waiting[c] -= 1
            if waiting[c] == 0:
                heapq.heappush(heap, key(c))
    if len(ordered) < len(rows):  # a reply cycle (forged ids): keep the rest in time order
        rest = sorted((i for i in range(len(rows)) if waiting[i] > 0), key=key)
        ordered += rest
    return [rows[i] for i in ordered]


def _schedule_from_messages(
    messages: pd.DataFrame, events: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """tb_step, tb_work_order and tb_product as far as the messages tell (no run database).

    The calls give product, step, capability, priority, release and due; the awards the
    resource and price; `inform` results the executed times; events whether a product finished.
    """
    steps, orders, products = [], [], {}
    completed = set()
    if len(events):
        completed = set(events.loc[events["kind"] == "manufacturing-completed", "product"].dropna())
    for cid, g in messages[messages["conversation_id"].notna()].groupby("conversation_id", sort=False):
        contents = {k: decode(k, _elements(p)) for k, p in zip(g["type"], g["payload"], strict=True)}
        call, award = contents.get("callForProposal"), contents.get("acceptProposal")
        result = contents.get("inform")
        if not isinstance(call, StepCall):
            continue
        kinds = set(g["type"])
        status = (
            "done" if isinstance(result, StepResult) else "failed" if "informFailure" in kinds
            else "scheduled" if "informConfirm" in kinds else "negotiating"
        )  # fmt: skip
        resource = award.resource if isinstance(award, Bid) else None
        price = award.price if isinstance(award, Bid) else None
        started = result.started if isinstance(result, StepResult) else None
        finished = result.finished if isinstance(result, StepResult) else None
        steps.append(
            {"product": call.product, "step": call.step, "capability": call.capability, "status": status,
             "conversation_id": cid, "resource": resource, "rounds": int((g["type"] == "callForProposal").sum()),
             "cfp_sim": None, "started": started, "finished": finished, "price": price, "reason": ""}
        )  # fmt: skip
        if isinstance(result, StepResult):
            orders.append(
                {"resource": result.resource, "job_id": f"{call.product}/{call.step}", "product": call.product,
                 "step": call.step, "conversation_id": cid, "capability": call.capability, "state": "done",
                 "start": started, "end": finished, "started": started, "finished": finished,
                 "price": price if price is not None else float("nan"), "priority": call.priority}
            )  # fmt: skip
        p = products.setdefault(
            call.product,
            {"product": call.product, "product_type": call.product.rsplit("-", 1)[0], "priority": call.priority,
             "release": call.release, "due": call.due, "status": "running", "reason": "", "completed_sim": None},
        )  # fmt: skip
        p["release"] = min(p["release"], call.release)
    for name, p in products.items():
        if name in completed:
            p["status"] = "completed"
    return pd.DataFrame(steps), pd.DataFrame(orders), pd.DataFrame(list(products.values()))


def _products(raw: pd.DataFrame, steps: pd.DataFrame) -> pd.DataFrame:
    cols = ["product", "product_type", "priority", "release", "due", "status", "reason", "completed_sim"]
    if not len(raw):
        return pd.DataFrame(columns=[*cols, "flow_time", "lateness"])
    p = raw.drop(columns=["shell"], errors="ignore").copy()
    end = steps.groupby("product")["finished"].max() if len(steps) else pd.Series(dtype=float)
    p["end"] = p["product"].map(end)
    p["flow_time"] = p["end"] - p["release"]
    p["lateness"] = p["end"] - p["due"]
    p.loc[p["status"] != "completed", ["flow_time", "lateness"]] = float("nan")
    return p.sort_values(["release", "product"]).reset_index(drop=True)


def _steps(raw: pd.DataFrame, products: pd.DataFrame) -> pd.DataFrame:
    if not len(raw):
        return pd.DataFrame(
            columns=[
                "product",
                "step",
                "capability",
                "status",
                "conversation_id",
                "resource",
                "started",
                "finished",
            ]
        )
    s = raw.copy()
    if len(products):
        s = s.merge(products[["product", "product_type", "priority"]], on="product", how="left")
    s["duration"] = s["finished"] - s["started"]
    s["waited"] = s["started"] - s["cfp_sim"]
    return s.sort_values(["product", "step"]).reset_index(drop=True)


@dataclass
class _Selections:
    """What the products documented of each choice (their ProcessDocumentation, tb_documentation):
    per proposal its rank, score and the policy's reason; per step the policy and the winner's reason."""

    bids: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)


def _children(element: Any) -> dict[str, Any]:
    value = element.get("value") if isinstance(element, dict) else None
    return {c.get("idShort"): c for c in value if isinstance(c, dict)} if isinstance(value, list) else {}


def _text(element: Any) -> str | None:
    value = element.get("value") if isinstance(element, dict) else None
    return value if isinstance(value, str) else None


def _selections(docs: pd.DataFrame | None) -> _Selections:
    out = _Selections()
    if docs is None or not len(docs):
        return out
    for r in docs.itertuples(index=False):  # one merged record per step (part "record")
        try:
            record = _children(json.loads(r.element))
        except ValueError:
            continue  # the journal's row is the product's own JSON; unreadable is not ours to fix
        out.steps[(r.product, int(r.step))] = {
            "policy": _text(record.get("SelectionPolicy")),
            "selection_reason": _text(record.get("SelectionReason")),
        }
        bids = sorted(_children(record.get("Bids")).items(), key=lambda kv: str(kv[0]))
        for rank, (_, bid) in enumerate(bids, start=1):
            fields = _children(bid)
            proposal = _text(fields.get("ProposalId"))
            if proposal is None:
                continue
            score = _text(fields.get("Score"))
            out.bids[proposal] = {
                "rank": rank,
                "score": float(score) if score is not None else None,
                "selection_reason": _text(fields.get("SelectionReason")),
                "policy": out.steps[(r.product, int(r.step))]["policy"],
            }
    return out


def _conversations(
    messages: pd.DataFrame, inbox: pd.DataFrame, steps: pd.DataFrame, selections: _Selections
) -> pd.DataFrame:
    cols = [
        "conversation_id", "product", "step", "capability", "priority", "rounds", "proposals",
        "refusals", "rejections", "not_understood", "messages", "winner", "price", "completion",
        "policy", "selection_reason", "status", "cfp_sim", "confirm_sim", "started", "finished", "cfp_ms", "confirm_ms", "latency_ms",
    ]  # fmt: skip
    m = messages[messages["conversation_id"].notna()] if len(messages) else messages
    if not len(m):
        return pd.DataFrame(columns=cols)
    confirm_in: dict[str, float] = {}
    if len(inbox):
        conf = inbox[inbox["type"] == "informConfirm"]
        confirm_in = conf.groupby("conversation_id")["received_wall_ms"].min().astype(float).to_dict()
    step_rows = steps.set_index("conversation_id").to_dict("index") if len(steps) else {}
    rows = []
    for cid, g in m.groupby("conversation_id", sort=False):
        counts = Counter(g["type"])
        cfps = g[g["type"] == "callForProposal"]
        first = cfps.iloc[0] if len(cfps) else g.iloc[0]
        call = decode("callForProposal", _elements(first["payload"])) if len(cfps) else None
        accepts = g[g["type"] == "acceptProposal"]
        award = decode("acceptProposal", _elements(accepts.iloc[-1]["payload"])) if len(accepts) else None
        confirms = g[g["type"] == "informConfirm"]
        cfp_ms = _first_time(cfps, "sent_ms")
        confirm_ms = confirm_in.get(cid)
        if confirm_ms is None and len(confirms):
            confirm_ms = _first_time(confirms, "received_ms")
        st = step_rows.get(cid, {})
        chosen = selections.steps.get((first["product"], first["step"]), {})
        status = st.get("status") or (
            "done" if counts["inform"] else "failed" if counts["informFailure"] and not counts["informConfirm"]
            else "scheduled" if counts["informConfirm"] else "negotiating"
        )  # fmt: skip
        rows.append(
            {
                "conversation_id": cid,
                "product": first["product"],
                "step": first["step"],
                "capability": getattr(call, "capability", None) or first["capability"],
                "priority": getattr(call, "priority", None),
                "rounds": len(cfps),
                "proposals": counts["proposal"],
                "refusals": counts["refuseProposal"],
                "rejections": counts["rejectProposal"],
                "not_understood": counts["notUnderstood"],
                "messages": len(g),
                "winner": st.get("resource") or (award.resource if isinstance(award, Bid) else None),
                "price": st.get("price") if st.get("price") is not None else getattr(award, "price", None),
                "completion": getattr(award, "completion", None),
                "policy": chosen.get("policy"),
                "selection_reason": chosen.get("selection_reason"),
                "status": status,
                "cfp_sim": first["sim"] if len(cfps) else None,
                "confirm_sim": confirms["sim"].iloc[0] if len(confirms) else None,
                "started": st.get("started"),
                "finished": st.get("finished"),
                "cfp_ms": cfp_ms,
                "confirm_ms": confirm_ms,
                "latency_ms": (confirm_ms - cfp_ms)
                if confirm_ms is not None and cfp_ms is not None
                else None,
            }
        )
    df = pd.DataFrame(rows, columns=cols)
    for c in ("cfp_sim", "confirm_sim", "started", "finished", "cfp_ms", "confirm_ms", "latency_ms", "price"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    df["step"] = df["step"].astype("Int64")
    df["priority"] = pd.to_numeric(df["priority"], errors="coerce").astype("Int64")
    return df


def _elements(payload: Any) -> Any:
    try:
        body = json.loads(payload) if isinstance(payload, str) else payload
    except ValueError:
        return None
    return body.get("interactionElements") if isinstance(body, dict) else None


def _first_time(df: pd.DataFrame, prefer: str) -> float | None:
    if not len(df):
        return None
    values = df[prefer].dropna()
    if not len(values):
        values = df["time_ms"].dropna()
    return float(values.min()) if len(values) else None


def _bids(messages: pd.DataFrame, conversations: pd.DataFrame, selections: _Selections) -> pd.DataFrame:
    cols = [
        "message_id", "conversation_id", "call_id", "round", "product", "step", "priority",
        *_BID_FIELDS, "sender", "sim", "time_ms", "outcome", "reason", "accepted", "won",
        "policy", "rank", "score", "selection_reason",
    ]  # fmt: skip
    if not len(messages):
        return pd.DataFrame(columns=cols)
    m = messages
    props = m[m["type"] == "proposal"]
    answers: dict[str, tuple[str, str]] = {}
    for r in m[m["type"].isin(["acceptProposal", "rejectProposal"])].itertuples(index=False):
        if not isinstance(r.in_reply_to, str):
            continue
        if r.type == "acceptProposal":
            answers[r.in_reply_to] = ("accepted", "")
        else:
            reason = decode("rejectProposal", _elements(r.payload))
            code = reason.code if isinstance(reason, Reason) else "rejected"
            answers.setdefault(r.in_reply_to, ("rejected", code))
    calls = m[m["type"] == "callForProposal"]
    round_of = {
        mid: i + 1 for _, g in calls.groupby("conversation_id") for i, mid in enumerate(g["message_id"])
    }
    priority = conversations.set_index("conversation_id")["priority"].to_dict() if len(conversations) else {}
    winner = conversations.set_index("conversation_id")["winner"].to_dict() if len(conversations) else {}
    rows = []
    for r in props.itertuples(index=False):
        bid = decode("proposal", _elements(r.payload))
        fields = {f: getattr(bid, f, None) for f in _BID_FIELDS}
        outcome, reason = answers.get(r.message_id, ("unanswered", ""))
        rows.append(
            {
                "message_id": r.message_id,
                "conversation_id": r.conversation_id,
                "call_id": r.in_reply_to,
                "round": round_of.get(r.in_reply_to),
                "product": r.product,
                "step": r.step,
                "priority": priority.get(r.conversation_id),
                **fields,
                "sender": r.sender,
                "sim": r.sim,
                "time_ms": r.time_ms,
                "outcome": outcome,
                "reason": reason,
                "accepted": outcome == "accepted",
                "won": outcome == "accepted"
                and winner.get(r.conversation_id) == (fields["resource"] or r.sender),
                **{k: selections.bids.get(r.message_id, {}).get(k) for k in ("policy", "rank", "score")},
                "selection_reason": selections.bids.get(r.message_id, {}).get("selection_reason"),
            }
        )
    df = pd.DataFrame(rows, columns=cols)
    if len(df):
        df["resource"] = df["resource"].fillna(df["sender"])
        df["step"] = df["step"].astype("Int64")
        df["round"] = df["round"].astype("Int64")
        df["rank"] = pd.to_numeric(df["rank"], errors="coerce").astype("Int64")
        df["score"] = pd.to_numeric(df["score"], errors="coerce")
    return df


def _work_orders(raw: pd.DataFrame, messages: pd.DataFrame) -> pd.DataFrame:
    if not len(raw):
        return pd.DataFrame(
            columns=[
                "resource",
                "product",
                "step",
                "state",
                "start",
                "end",
                "started",
                "finished",
                "booked_sim",
            ]
        )
    w = raw.copy()
    booked: dict[tuple[str, str], float] = {}
    if len(messages):
        conf = messages[messages["type"] == "informConfirm"]
        for r in conf.itertuples(index=False):
            if r.sim is not None and not pd.isna(r.sim):
                key = (r.sender, r.conversation_id)
                booked[key] = min(float(r.sim), booked.get(key, float("inf")))
    w["booked_sim"] = [booked.get((r, c)) for r, c in zip(w["resource"], w["conversation_id"], strict=True)]
    w["booked_sim"] = pd.to_numeric(w["booked_sim"], errors="coerce")
    return w.sort_values(["resource", "start"]).reset_index(drop=True)


def _events(raw: pd.DataFrame | None, recorded: pd.DataFrame) -> pd.DataFrame:
    if raw is not None:
        e = raw.copy()
        e["data"] = e["data"].map(lambda s: json.loads(s) if isinstance(s, str) and s else {})
        e["step"] = e["step"].astype("Int64")
        return e.sort_values(["sim", "wall_ms", "id"]).reset_index(drop=True)
    cols = ["agent", "kind", "product", "step", "sim", "wall_ms", "data"]
    if not len(recorded):
        return pd.DataFrame(columns=cols)
    ev = recorded[recorded["event"].notna()]
    rows = []
    for r in ev.itertuples(index=False):
        body = r.body if isinstance(r.body, dict) else {}
        data = {k: v for k, v in body.items() if k not in ("event", "agent", "product", "step", "sim")}
        rows.append(
            {
                "agent": body.get("agent", r.sender),
                "kind": r.event,
                "product": r.product,
                "step": r.step,
                "sim": r.sim,
                "wall_ms": r.received_ms,
                "data": data,
            }
        )
    df = pd.DataFrame(rows, columns=cols)
    df["step"] = pd.to_numeric(df["step"], errors="coerce").astype("Int64")
    return df


def _makespan(steps: pd.DataFrame, products: pd.DataFrame) -> float:
    if not len(steps) or not len(products):
        return 0.0
    finished = steps["finished"].dropna()
    if not len(finished):
        return 0.0
    return float(finished.max() - products["release"].min())


def _resources(run: Run, agents: pd.DataFrame, inbox: pd.DataFrame) -> pd.DataFrame:
    cols = [
        "resource", "kind", "calls", "proposals", "refusals", "wins", "win_rate", "steps",
        "busy", "utilisation", "revenue", "restarts",
    ]  # fmt: skip
    names: list[str] = []
    kinds: dict[str, str] = {}
    restarts: dict[str, int] = {}
    if len(agents):
        for r in agents.itertuples(index=False):
            if r.kind != "product":
                names.append(r.name)
                kinds[r.name] = r.kind
                restarts[r.name] = int(r.restarts)
    m = run.messages
    if len(m):
        for s in m.loc[m["type"].isin(["proposal", "refuseProposal", "informConfirm"]), "sender"]:
            if isinstance(s, str) and s not in kinds and s not in names:
                names.append(s)
                kinds[s] = "resource"
    if len(run.work_orders):
        for s in run.work_orders["resource"]:
            if s not in kinds and s not in names:
                names.append(s)
                kinds[s] = "resource"
    if not names:
        return pd.DataFrame(columns=cols)
    calls: Counter[str] = Counter()
    if len(inbox):
        calls.update(inbox.loc[inbox["type"] == "callForProposal", "agent"])
    else:  # no database: count the calls each resource answered
        answered = m[m["type"].isin(["proposal", "refuseProposal"])]
        calls.update(answered.drop_duplicates(["sender", "in_reply_to"])["sender"])
    sent = Counter(zip(m["sender"], m["type"], strict=True)) if len(m) else Counter()
    b = run.bids
    wins = Counter(b.loc[b["won"], "resource"]) if len(b) else Counter()
    w = run.work_orders
    busy: dict[str, float] = defaultdict(float)
    done: Counter[str] = Counter()
    revenue: dict[str, float] = defaultdict(float)
    if len(w):
        for r in w[w["state"] == "done"].itertuples(index=False):
            done[r.resource] += 1
            revenue[r.resource] += float(r.price)
            if not pd.isna(r.started) and not pd.isna(r.finished):
                busy[r.resource] += float(r.finished) - float(r.started)
    makespan = run.makespan
    rows = []
    for n in sorted(names):
        proposals = sent[(n, "proposal")]
        rows.append(
            {
                "resource": n,
                "kind": kinds.get(n, "resource"),
                "calls": calls[n],
                "proposals": proposals,
                "refusals": sent[(n, "refuseProposal")],
                "wins": wins[n],
                "win_rate": (wins[n] / proposals) if proposals else float("nan"),
                "steps": done[n],
                "busy": busy[n],
                "utilisation": (busy[n] / makespan) if makespan else float("nan"),
                "revenue": revenue[n],
                "restarts": restarts.get(n, 0),
            }
        )
    return pd.DataFrame(rows, columns=cols)


# --------------------------------------------------------------------------- stats


def _num(x: Any, digits: int = 4) -> Any:
    if x is None:
        return None
    try:
        if pd.isna(x):
            return None
    except (TypeError, ValueError):
        pass
    if isinstance(x, int | bool):
        return x
    try:
        return round(float(x), digits)
    except (TypeError, ValueError):
        return x


def _log_completeness(run: Run, delivered: pd.DataFrame, filled: pd.DataFrame) -> dict[str, Any]:
    """messages.jsonl against the journal (scenarios.log_completeness); an observer's folder has
    no journal: what `twinbid observe` found when it stopped (OUT/recording.json)."""
    if not run.has_database:
        try:
            return json.loads((run.out / "recording.json").read_text())["log"]
        except (OSError, ValueError, KeyError, TypeError):
            return {"complete": None, "note": "no journal to check the recording against"}
    lc = log_completeness
    m = run.messages
    own = m[m["source"] == "outbox"] if len(m) else m
    sent = zip(own.get("message_id", []), own.get("published", []), own.get("sent_ms", []), strict=False)

    def frames(rec: pd.DataFrame) -> Counter:
        return Counter(rec["message_id"].dropna()) if len(rec) else Counter()

    def events(rec: pd.DataFrame) -> Counter:
        ev = rec[rec["event"].notna()] if len(rec) else rec
        return Counter(
            lc.event_key(r.sender, r.event, r.product, r.step, r.sim) for r in ev.itertuples(index=False)
        )

    e = run.events
    journal = [(lc.event_key(r.agent, r.kind, r.product, r.step, r.sim), True, float(r.wall_ms))
               for r in e.itertuples(index=False)] if len(e) else []  # fmt: skip
    return lc.combined(
        lc.summarize(((mid, bool(p), float(ms)) for mid, p, ms in sent), frames(delivered), frames(filled)),
        lc.summarize(journal, events(delivered), events(filled)),
    )


def _stats(run: Run) -> dict[str, Any]:
    m = run.messages
    sent = Counter(m["type"]) if len(m) else Counter()
    rec = run.recorded
    filled = rec[rec["reconciled"].astype(bool)] if len(rec) else rec
    rec = rec[~rec["reconciled"].astype(bool)] if len(rec) else rec
    rec_frames = rec[rec["message_id"].notna()] if len(rec) else rec
    # proposals per call for proposal
    per_call: list[int] = []
    if len(m):
        props = Counter(m.loc[m["type"] == "proposal", "in_reply_to"])
        per_call = [props.get(mid, 0) for mid in m.loc[m["type"] == "callForProposal", "message_id"]]
    lat = [float(x) for x in run.latencies().tolist()]
    notes = Counter(run.notes["kind"]) if len(run.notes) else Counter()
    rejections = Counter()
    if len(m):
        for payload in m.loc[m["type"] == "rejectProposal", "payload"]:
            reason = decode("rejectProposal", _elements(payload))
            rejections[reason.code if isinstance(reason, Reason) else "?"] += 1
    resources = {
        r.resource: {
            "calls": int(r.calls),
            "proposals": int(r.proposals),
            "refusals": int(r.refusals),
            "wins": int(r.wins),
            "win_rate": _num(r.win_rate),
            "steps": int(r.steps),
            "busy": _num(r.busy),
            "utilisation": _num(r.utilisation),
        }
        for r in run.resources.itertuples(index=False)
    }
    c = run.conversations
    return {
        "source": str(run.out),
        "messages": {
            "total": len(m),
            "by_type": {k: int(sent[k]) for k in _type_order(sent)},
            "recorded": len(rec_frames),
            "recorded_events": len(rec) - len(rec_frames),
            "repeated": int(rec_frames.duplicated(["message_id", "topic"]).sum()) if len(rec_frames) else 0,
        },
        "log": _log_completeness(run, rec, filled),
        "conversations": {
            "total": len(c),
            "by_status": {k: int(v) for k, v in sorted(Counter(c["status"]).items())} if len(c) else {},
            "rounds_mean": _num(c["rounds"].mean()) if len(c) else None,
        },
        "proposals_per_call": {
            "calls": len(per_call),
            "mean": _num(statistics.fmean(per_call)) if per_call else None,
            "min": min(per_call) if per_call else None,
            "max": max(per_call) if per_call else None,
            "histogram": {str(k): v for k, v in sorted(Counter(per_call).items())},
        },
        "negotiation_latency_ms": {
            "count": len(lat),
            "mean": _num(statistics.fmean(lat), 2) if lat else None,
            "min": _num(min(lat), 2) if lat else None,
            "p50": _num(percentile(lat, 0.5), 2),
            "p90": _num(percentile(lat, 0.9), 2),
            "p99": _num(percentile(lat, 0.99), 2),
            "max": _num(max(lat), 2) if lat else None,
        },
        "resources": resources,
        "rejections": dict(sorted(rejections.items())),
        "notes": {
            **{group: sum(notes[k] for k in kinds) for group, kinds in NOTE_GROUPS.items()},
            "total": int(sum(notes.values())),
            "by_kind": dict(sorted((k, int(v)) for k, v in notes.items())),
        },
    }


def _type_order(counts: Counter[str]) -> list[str]:
    known = [t for t in MESSAGE_TYPES if counts.get(t)]
    return known + sorted(t for t in counts if t not in MESSAGE_TYPES and isinstance(t, str))
