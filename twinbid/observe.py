"""Observing negotiations: `observe`, `log`, `trace`, `stats` and `report`.

These commands read what a run leaves behind (`run.db`, `messages.jsonl`) or record a live
plant; they never write to a run.  `app` is mounted on the main `twinbid` command; it also
runs on its own: `python -m twinbid.observe log runs/demo-line`.  See docs/observe.md.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Observe negotiations.")
console = Console()
err = Console(stderr=True)

#: Short names accepted by ``--type`` (besides the full message types and event kinds).
TYPE_ALIASES = {
    "cfp": "callForProposal",
    "call": "callForProposal",
    "propose": "proposal",
    "refuse": "refuseProposal",
    "accept": "acceptProposal",
    "reject": "rejectProposal",
    "confirm": "informConfirm",
    "failure": "informFailure",
    "nu": "notUnderstood",
}

_TYPE_STYLE = {
    "callForProposal": "bold cyan",
    "proposal": "green",
    "refuseProposal": "yellow",
    "acceptProposal": "bold green",
    "rejectProposal": "red",
    "informConfirm": "bold blue",
    "inform": "blue",
    "informFailure": "bold red",
    "notUnderstood": "bold magenta",
    "event": "dim",
}

OutArg = Annotated[Path, typer.Argument(help="a run's output folder (or an observer's)")]
DbOpt = Annotated[str | None, typer.Option("--db", help="run database URL (default: OUT/run.db)")]


def _load(out: Path, db: str | None = None):
    from twinbid.analysis import RunNotFound, load

    try:
        return load(out, db=db)
    except RunNotFound as exc:
        err.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from None


# =========================================================================== observe


def _observed(broker: str | None, ns: str | None, plant: Path | None) -> tuple[Any, str]:
    """Where to listen: the options given, completed from a run's plant.json and its accounts."""
    from protocol.transport import BrokerAddress

    if plant is None:
        if broker is None or ns is None:
            raise ValueError("give --broker URL and --ns NAMESPACE, or --plant OUT (a run's output folder)")
        return BrokerAddress.from_url(broker), ns
    from protocol.credentials import Credentials
    from twinbid.vendor import PlantInfo

    info = PlantInfo.read(plant)
    url, ns = broker or info.broker, ns or info.namespace
    if url is None or ns is None:
        raise ValueError(f"{plant}: plant.json names no broker or namespace; give --broker and --ns")
    address = BrokerAddress.from_url(url)
    accounts = PlantInfo.accounts(plant)
    if broker is None and accounts is not None:
        address = Credentials.load(accounts).observer_address(address)
    return address, ns


@app.command()
def observe(
    broker: Annotated[
        str | None, typer.Option(help="broker URL, e.g. mqtt://user:pw@host:1883 (or --plant)")
    ] = None,
    ns: Annotated[
        str | None, typer.Option(help="plant namespace (the {ns} in i40/{ns}/...; or --plant)")
    ] = None,
    plant: Annotated[
        Path | None,
        typer.Option(
            help="a running `twinbid run`'s output folder: its broker, namespace and, when the run "
            "started its broker with accounts, the observer's account"
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="folder for messages.jsonl")] = Path("observed"),
    duration: Annotated[
        float | None, typer.Option(help="stop after this many seconds (default: until Ctrl-C)")
    ] = None,
    client_id: Annotated[
        str | None, typer.Option(help="MQTT client id (default: twinbid-observer-<ns>)")
    ] = None,
    sqlite: Annotated[
        bool, typer.Option("--sqlite/--no-sqlite", help="also write table tb_recorded in OUT/observe.db")
    ] = False,
    session_expiry: Annotated[
        int, typer.Option(help="seconds the broker keeps the session (and queues) while we are away")
    ] = 3600,
    clean: Annotated[
        bool, typer.Option("--clean", help="start a fresh session, discard a queued one")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no live counter")] = False,
) -> None:
    """Record every message of a live plant (QoS 1, persistent session) to OUT/messages.jsonl."""
    from protocol.recorder import Recorder
    from protocol.topics import TopicError, check_name

    try:
        address, ns = _observed(broker, ns, plant)
        check_name(ns, "namespace")
    except (ValueError, TopicError) as exc:
        err.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from None
    out.mkdir(parents=True, exist_ok=True)
    recorder = Recorder(
        address,
        ns,
        out / "messages.jsonl",
        client_id=client_id or f"twinbid-observer-{ns}",
        clean=clean,
        session_expiry=session_expiry,
        db=out / "observe.db" if sqlite else None,
    )
    try:
        recorder.start()
    except ConnectionError as exc:
        err.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1) from None
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    err.print(f"recording i40/{ns}/# from {address} to {out / 'messages.jsonl'} (Ctrl-C stops)")
    started = time.monotonic()
    started_ms = time.time() * 1000
    status = err.status("0 messages") if not quiet and err.is_terminal else contextlib.nullcontext()
    try:
        with status as live:
            while not stop.is_set():
                left = None if duration is None else duration - (time.monotonic() - started)
                if left is not None and left <= 0:
                    break
                stop.wait(0.5 if left is None else min(0.5, left))
                if live is not None:
                    live.update(f"{recorder.count:,} messages ({recorder.duplicates:,} redelivered)")
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        recorder.stop(settle=0.2, max_wait=5)
    by_type = ", ".join(f"{k} {v}" for k, v in sorted(recorder.by_type.items()))
    err.print(f"recorded {recorder.written:,} messages ({by_type or 'none'})")
    log = _recording_gaps(out / "messages.jsonl", plant, started_ms)
    (out / "recording.json").write_text(
        json.dumps({"plant": str(plant) if plant else None, "log": log}, indent=2)
    )
    err.print(log_line(log), highlight=False)


#: How long before the last line an observer received its recording is judged (see _recording_gaps).
IN_FLIGHT_MS = 1000


def _recording_gaps(path: Path, plant: Path | None, started_ms: float) -> dict[str, Any]:
    """What the recording lacks of what the plant's agents sent while it ran and before (a late
    start), from the plant's journal (OUT/run.db) when there is one to read."""
    from agents.persistence import open_database
    from agents.persistence.database import sqlite_url
    from scenarios import log_completeness

    if plant is None or not (plant / "run.db").exists():
        return {"complete": None, "note": "no plant journal to compare with (observe with --plant OUT)"}
    span = log_completeness.read_log(path).span
    # Judged up to a second before the last line received: what an agent journaled just before
    # the recording stopped may still have been on its way (up to ~0.5 s on a loaded machine).
    until = int(span[1] if span else time.time() * 1000) - IN_FLIGHT_MS
    db = open_database(sqlite_url(plant / "run.db"))
    try:
        return log_completeness.completeness(db, path, until_ms=until, recording_started_ms=started_ms)
    finally:
        db.dispose()


# =========================================================================== log


@dataclass
class LogFilter:
    """What `twinbid log` keeps; every given criterion must hold."""

    products: set[str] = field(default_factory=set)
    resources: set[str] = field(default_factory=set)
    conversations: list[str] = field(default_factory=list)
    types: set[str] = field(default_factory=set)
    since: float | None = None
    until: float | None = None
    events: bool = False

    def keep(self, row: dict[str, Any], receivers: Iterable[str] = ()) -> bool:
        is_event = row.get("type") == "event"
        if is_event and not self.events:
            return False
        if self.types:
            kinds = {row.get("type"), row.get("event")} if is_event else {row.get("type")}
            if not kinds & self.types:
                return False
        parties = {row.get("sender"), row.get("receiver"), *receivers}
        if self.products and not ({row.get("product")} | parties) & self.products:
            return False
        if self.resources and not parties & self.resources:
            return False
        if self.conversations:
            cid = row.get("conversation_id") or ""
            if not any(cid.startswith(c) for c in self.conversations):
                return False
        if self.since is not None or self.until is not None:
            sim = row.get("sim")
            if sim is None or pd.isna(sim):
                return False
            if self.since is not None and sim < self.since:
                return False
            if self.until is not None and sim > self.until:
                return False
        return True


def _split(values: list[str] | None) -> set[str]:
    return {v.strip() for item in values or [] for v in item.split(",") if v.strip()}


def _types(values: list[str] | None) -> set[str]:
    from twinbid.analysis import MESSAGE_TYPES

    by_lower = {t.lower(): t for t in MESSAGE_TYPES}
    out = set()
    for v in _split(values):
        out.add(TYPE_ALIASES.get(v.lower()) or by_lower.get(v.lower()) or v)
    return out


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return ""
    try:
        if pd.isna(x):
            return ""
    except (TypeError, ValueError):
        pass
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _who(row: dict[str, Any]) -> str:
    receiver = row.get("receiver")
    if row.get("type") == "event":
        return str(row.get("sender") or "")
    if not isinstance(receiver, str):
        receiver = f"cfp/{row.get('capability') or '?'}"
    return f"{row.get('sender') or '?'} → {receiver}"


def _product_step(row: dict[str, Any]) -> str:
    p, s = row.get("product"), row.get("step")
    if not isinstance(p, str):
        return ""
    return p if s is None or pd.isna(s) else f"{p}#{int(s)}"


def _jsonable(row: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    out = {}
    for k in keys:
        v = row.get(k)
        try:
            if v is not None and not isinstance(v, dict | list) and pd.isna(v):
                v = None
        except (TypeError, ValueError):
            pass
        if hasattr(v, "item"):
            v = v.item()
        out[k] = v
    return out


LOG_KEYS = (
    "sim", "time_ms", "type", "sender", "receiver", "product", "step", "conversation_id",
    "message_id", "in_reply_to", "summary",
)  # fmt: skip


def _log_line(row: dict[str, Any], t0: float | None) -> str:
    t = row.get("time_ms")
    rel = "" if t is None or t0 is None or pd.isna(t) else f"{(t - t0) / 1000:9.3f}s"
    kind = row.get("type") or "?"
    style = _TYPE_STYLE.get(kind, "")
    label = row.get("event") if kind == "event" else kind
    return (
        f"{_fmt(row.get('sim')):>8} {rel:>10}  [{style}]{escape(str(label)):<16}[/] "
        f"{escape(_who(row)):<28} {escape(_product_step(row)):<14} {escape(str(row.get('summary') or ''))}"
    )


def _event_rows(events: pd.DataFrame) -> list[dict[str, Any]]:
    rows = []
    for e in events.to_dict("records"):
        data = e.get("data") or {}
        rows.append(
            {
                "type": "event",
                "event": e.get("kind"),
                "sender": e.get("agent"),
                "receiver": None,
                "product": e.get("product"),
                "step": e.get("step"),
                "sim": e.get("sim"),
                "time_ms": e.get("wall_ms"),
                "conversation_id": None,
                "message_id": None,
                "summary": f"{e.get('kind')} " + " ".join(f"{k}={_fmt(v)}" for k, v in sorted(data.items())),
            }
        )
    return rows


@app.command("log")
def log_command(
    out: OutArg,
    product: Annotated[
        list[str] | None, typer.Option(help="only this product (repeat or comma-separate)")
    ] = None,
    resource: Annotated[list[str] | None, typer.Option(help="only messages to or from this resource")] = None,
    conversation: Annotated[
        list[str] | None, typer.Option(help="only this conversation (id, unique prefix, or product/step)")
    ] = None,
    type_: Annotated[
        list[str] | None,
        typer.Option("--type", help="only these message types (cfp, proposal, accept, reject, confirm, ...)"),
    ] = None,
    since: Annotated[float | None, typer.Option(help="from this simulated time")] = None,
    until: Annotated[float | None, typer.Option(help="up to this simulated time")] = None,
    events: Annotated[bool, typer.Option("--events", help="include progress events")] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="tail a live run's messages.jsonl")] = False,
    idle_timeout: Annotated[
        float | None, typer.Option(help="with --follow: stop after this many seconds without a new line")
    ] = None,
    jsonl: Annotated[
        bool, typer.Option("--jsonl", help="one JSON object per line (with the message)")
    ] = False,
    csv: Annotated[
        Path | None, typer.Option("--csv", help="write the selected rows to this CSV file")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="show at most this many rows (the last ones)")] = None,
    db: DbOpt = None,
) -> None:
    """Every message of a run, filtered; a table, JSON Lines, or CSV."""
    flt = LogFilter(
        products=_split(product),
        resources=_split(resource),
        types=_types(type_),
        since=since,
        until=until,
        events=events,
    )
    if follow:
        flt.conversations = sorted(_split(conversation))
        _follow(out, flt, jsonl=jsonl, idle_timeout=idle_timeout, db=db, limit=limit)
        return
    run = _load(out, db)
    if conversation:
        try:
            flt.conversations = [run.find_conversation(c) for c in sorted(_split(conversation))]
        except KeyError as exc:
            err.print(f"[red]{escape(str(exc.args[0]))}[/red]")
            raise typer.Exit(2) from None
    rows = run.messages.to_dict("records")
    if events:
        rows = sorted(
            rows + _event_rows(run.events),
            key=lambda r: r["time_ms"] if r["time_ms"] is not None and not pd.isna(r["time_ms"]) else 0,
        )
    receivers = run.receivers() if flt.resources or flt.products else {}
    rows = [r for r in rows if flt.keep(r, receivers.get(r.get("message_id") or "", ()))]
    if limit is not None:
        rows = rows[-limit:] if limit > 0 else []
    if csv is not None:
        frame = pd.DataFrame([_jsonable(r, LOG_KEYS) for r in rows], columns=list(LOG_KEYS))
        frame.to_csv(csv, index=False)
        err.print(f"{len(rows)} rows written to {csv}")
        return
    if jsonl:
        _print_jsonl(rows)
        return
    _print_log_table(rows, run.t0_ms, title=f"{out}: {len(rows)} of {len(run.messages)} messages")


def _print_jsonl(rows: Iterable[dict[str, Any]]) -> None:
    write = sys.stdout.write
    for r in rows:
        obj = _jsonable(r, LOG_KEYS)
        if r.get("type") == "event":
            obj["event"] = r.get("event")
        elif isinstance(r.get("payload"), str):
            try:
                obj["message"] = json.loads(r["payload"])
            except ValueError:
                obj["message"] = r["payload"]
        write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def _print_log_table(rows: list[dict[str, Any]], t0: float, title: str) -> None:
    t = Table(title=title, title_justify="left", header_style="bold")
    t.add_column("sim", justify="right")
    t.add_column("wall s", justify="right")
    t.add_column("type")
    t.add_column("from → to")
    t.add_column("product#step")
    t.add_column("conv")
    t.add_column("what")
    for r in rows:
        kind = r.get("type") or "?"
        time_ms = r.get("time_ms")
        rel = "" if time_ms is None or pd.isna(time_ms) else f"{(time_ms - t0) / 1000:.3f}"
        t.add_row(
            _fmt(r.get("sim")),
            rel,
            f"[{_TYPE_STYLE.get(kind, '')}]{escape(str(r.get('event') if kind == 'event' else kind))}[/]",
            escape(_who(r)),
            escape(_product_step(r)),
            escape((r.get("conversation_id") or "")[:8]),
            escape(str(r.get("summary") or "")),
        )
    console.print(t)


# --------------------------------------------------------------------------- follow


class _SimLookup:
    """Simulated send times and conversation subjects from a live run's database, when there is one."""

    def __init__(self, out: Path, db: str | None) -> None:
        self.conn: Any = None
        self.engine: Any = None
        self.path = out / "run.db"
        if db is not None:
            from sqlalchemy import create_engine

            self.engine = create_engine(db)

    def _connect(self) -> None:
        """Open the run database read-only once it exists (a follower may start before the run)."""
        if self.conn is None and self.engine is None and self.path.exists():
            try:
                self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
            except sqlite3.Error:
                self.conn = None

    def _query(self, sql: str, params: list[str]) -> list[tuple]:
        self._connect()
        try:
            if self.conn is not None:
                return self.conn.execute(sql.replace(":ids", ",".join("?" * len(params))), params).fetchall()
            if self.engine is not None:
                from sqlalchemy import bindparam, text

                stmt = text(sql).bindparams(bindparam("ids", expanding=True))
                with self.engine.connect() as c:
                    return [tuple(r) for r in c.execute(stmt, {"ids": params})]
        except Exception:
            return []
        return []

    def sims(self, ids: list[str]) -> dict[str, float]:
        out: dict[str, float] = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            sql = "SELECT message_id, MIN(created_sim) FROM tb_outbox WHERE message_id IN (:ids) GROUP BY message_id"
            out.update({m: s for m, s in self._query(sql, chunk)})
        return out

    def subjects(self, conversations: list[str]) -> dict[str, tuple[str, int]]:
        out: dict[str, tuple[str, int]] = {}
        for i in range(0, len(conversations), 500):
            chunk = conversations[i : i + 500]
            sql = "SELECT conversation_id, product, step FROM tb_step WHERE conversation_id IN (:ids)"
            out.update({c: (p, s) for c, p, s in self._query(sql, chunk)})
        return out

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        if self.engine is not None:
            self.engine.dispose()


def tail_lines(
    path: Path,
    *,
    poll: float = 0.2,
    idle_timeout: float | None = None,
    stop: Callable[[], bool] | None = None,
) -> Iterator[list[str]]:
    """Batches of complete lines of a growing file (waits for it to appear); ends on `stop()` or idleness."""
    last_new = time.monotonic()
    while not path.exists():
        if (stop and stop()) or (idle_timeout is not None and time.monotonic() - last_new > idle_timeout):
            return
        time.sleep(poll)
    with path.open("rb") as f:
        pending = b""
        while True:
            chunk = f.read(1 << 20)
            if chunk:
                pending += chunk
                *complete, pending = pending.split(b"\n")
                if complete:
                    last_new = time.monotonic()
                    yield [c.decode("utf-8", errors="replace") for c in complete if c.strip()]
                continue
            if (stop and stop()) or (idle_timeout is not None and time.monotonic() - last_new > idle_timeout):
                return
            time.sleep(poll)


def follow_rows(
    out: Path,
    *,
    db: str | None = None,
    idle_timeout: float | None = None,
    stop: Callable[[], bool] | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """Batches of log rows from a live run's messages.jsonl (simulated times from its database)."""
    from protocol.elements import StepCall
    from twinbid.analysis import decode, recording_row, summarise

    lookup = _SimLookup(out, db)
    about: dict[str, tuple[str, int]] = {}
    try:
        for lines in tail_lines(out / "messages.jsonl", idle_timeout=idle_timeout, stop=stop):
            rows = []
            for line in lines:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                row = recording_row(rec)
                body = row.pop("body")
                if row["event"] is not None:
                    data = {
                        k: v for k, v in body.items() if k not in ("event", "agent", "product", "step", "sim")
                    }
                    row["type"] = "event"
                    row["time_ms"] = row["received_ms"]
                    row["summary"] = f"{row['event']} " + " ".join(
                        f"{k}={_fmt(v)}" for k, v in sorted(data.items())
                    )
                    rows.append(row)
                    continue
                elements = body.get("interactionElements") if isinstance(body, dict) else None
                content = decode(row["type"], elements)
                if isinstance(content, StepCall) and row["conversation_id"]:
                    about.setdefault(row["conversation_id"], (content.product, content.step))
                row["summary"] = summarise(row["type"], content)
                row["time_ms"] = row["received_ms"]
                row["payload"] = json.dumps(body)
                rows.append(row)
            missing_sim = [r["message_id"] for r in rows if r.get("message_id")]
            sims = lookup.sims(missing_sim) if missing_sim else {}
            unknown = sorted({r["conversation_id"] for r in rows if r.get("conversation_id")} - set(about))
            if unknown:
                about.update(lookup.subjects(unknown))
            for r in rows:
                if r["type"] != "event":
                    r["sim"] = sims.get(r.get("message_id") or "")
                    r["product"], r["step"] = about.get(r.get("conversation_id") or "", (None, None))
            yield rows
    finally:
        lookup.close()


def _follow(
    out: Path, flt: LogFilter, *, jsonl: bool, idle_timeout: float | None, db: str | None, limit: int | None
) -> None:
    t0: float | None = None
    seen: set[str] = set()
    first = True
    try:
        for rows in follow_rows(out, db=db, idle_timeout=idle_timeout):
            kept = []
            for r in rows:
                mid = r.get("message_id")
                if mid:  # each message once, though it may come on two topics, or twice
                    if mid in seen:
                        continue
                    seen.add(mid)
                if t0 is None and r.get("time_ms") is not None:
                    t0 = r["time_ms"]
                if flt.keep(r):
                    kept.append(r)
            if first and limit is not None:
                kept = kept[-limit:] if limit > 0 else []
            first = False
            if jsonl:
                _print_jsonl(kept)
            else:
                for r in kept:
                    console.print(_log_line(r, t0), highlight=False, soft_wrap=True)
    except KeyboardInterrupt:
        pass


# =========================================================================== trace


def mermaid(trace: pd.DataFrame, receivers: dict[str, list[str]] | None = None) -> str:
    """A Mermaid sequence diagram of one conversation (one arrow per delivery of a broadcast)."""
    receivers = receivers or {}
    names: list[str] = []

    def pid(name: str) -> str:
        if name not in names:
            names.append(name)
        return f"P{names.index(name)}"

    lines: list[str] = []
    requester = trace["sender"].iloc[0] if len(trace) else None
    if isinstance(requester, str):
        pid(requester)
    round_no = 0
    for r in trace.to_dict("records"):
        kind = r["type"]
        label = _mermaid_label(r)
        if kind == "callForProposal":
            round_no += 1
            targets = receivers.get(r["message_id"]) or [f"cfp/{r.get('capability') or '?'}"]
            lines.append(f"    Note over {pid(r['sender'])}: round {round_no}")
            for target in targets:  # a broadcast: an open arrow to every provider that got it
                lines.append(f"    {pid(r['sender'])}-){pid(target)}: {label}")
            continue
        arrow = (
            "--x" if kind in ("rejectProposal", "refuseProposal", "informFailure", "notUnderstood") else "->>"
        )
        target = r["receiver"] if isinstance(r["receiver"], str) else "?"
        lines.append(f"    {pid(r['sender'])}{arrow}{pid(target)}: {label}")
    header = ["sequenceDiagram", "    autonumber"]
    header += [f"    participant P{i} as {n}" for i, n in enumerate(names)]
    return "\n".join(header + lines) + "\n"


def _mermaid_label(r: dict[str, Any]) -> str:
    text = f"{r['type']}"
    if r.get("summary"):
        text += f" {r['summary']}"
    for bad, good in ((";", ","), ("#", " step "), ("\n", " "), ("%", " pct"), ("<", "("), (">", ")")):
        text = text.replace(bad, good)
    return text[:120]


@app.command()
def trace(
    out: OutArg,
    conversation: Annotated[str, typer.Argument(help="conversation id, unique prefix, or product/step")],
    as_mermaid: Annotated[bool, typer.Option("--mermaid", help="print a Mermaid sequence diagram")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="the messages as a JSON array")] = False,
    db: DbOpt = None,
) -> None:
    """One bidding procedure, message by message, in order (each message once)."""
    run = _load(out, db)
    try:
        cid = run.find_conversation(conversation)
    except KeyError as exc:
        err.print(f"[red]{escape(str(exc.args[0]))}[/red]")
        raise typer.Exit(2) from None
    t = run.trace(cid)
    if as_mermaid:
        sys.stdout.write(mermaid(t, run.receivers()))
        return
    if as_json:
        rows = []
        for r in t.to_dict("records"):
            obj = _jsonable(r, LOG_KEYS)
            obj["message"] = json.loads(r["payload"]) if isinstance(r.get("payload"), str) else None
            rows.append(obj)
        sys.stdout.write(json.dumps(rows, indent=1, default=str) + "\n")
        return
    c = run.conversations.set_index("conversation_id").loc[cid]
    head = (
        f"[bold]{escape(str(c['product']))} step {_fmt(c['step'])}[/bold] — {escape(str(c['capability']))}, "
        f"priority {_fmt(c['priority'])}, {int(c['rounds'])} round(s), {int(c['proposals'])} proposal(s); "
        f"winner [bold]{escape(str(c['winner']))}[/bold] at {_fmt(c['price'])}; status {c['status']}; "
        f"negotiation {_fmt(c['latency_ms'], 0)} ms wall"
    )
    console.print(f"conversation {cid}")
    console.print(head, highlight=False)
    table = Table(header_style="bold")
    for name, justify in (("#", "right"), ("+ms", "right"), ("sim", "right"), ("type", "left"),
                          ("from → to", "left"), ("what", "left"), ("messageId", "left")):  # fmt: skip
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    start = t["time_ms"].min() if len(t) else 0
    receivers = run.receivers()
    for i, r in enumerate(t.to_dict("records"), 1):
        who = _who(r)
        if r["type"] == "callForProposal" and receivers.get(r["message_id"]):
            who = f"{r['sender']} → {', '.join(receivers[r['message_id']])}"
        table.add_row(
            str(i),
            _fmt(r["time_ms"] - start, 1) if not pd.isna(r["time_ms"]) else "",
            _fmt(r["sim"]),
            f"[{_TYPE_STYLE.get(r['type'], '')}]{escape(str(r['type']))}[/]",
            escape(who),
            escape(str(r["summary"] or "")),
            escape(str(r["message_id"])[:8]),
        )
    console.print(table)


# =========================================================================== stats


@app.command()
def stats(
    out: OutArg,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    csv: Annotated[
        Path | None, typer.Option("--csv", help="also write every table as CSV into this folder")
    ] = None,
    db: DbOpt = None,
) -> None:
    """Messages per type, proposals per call, negotiation latency, win rates, utilisation, notes."""
    run = _load(out, db)
    figures = run.stats()
    if csv is not None:
        paths = run.to_csv(csv)
        err.print(f"{len(paths)} tables written to {csv}/ ({', '.join(p.name for p in paths)})")
    if as_json:
        sys.stdout.write(json.dumps(figures, indent=2) + "\n")
        return
    _print_stats(figures)


def log_line(log: dict[str, Any]) -> str:
    """One line on a recording's completeness (scenarios.log_completeness)."""
    if log.get("complete") is None:
        return f"negotiation log: completeness unknown ({log.get('note', 'nothing to compare with')})"
    e = log.get("events") or {}
    counts = (
        f"{log['sent']:,} sent, {log['recorded']:,} recorded, {log['reconciled']:,} filled in from the journal; "
        f"events: {e.get('sent', 0):,} journaled, {e.get('recorded', 0):,} recorded, {e.get('reconciled', 0):,} filled in"
    )
    if log["complete"]:
        return f"negotiation log: complete ({counts})"
    late = log.get("missing_before_start")
    before = f", {late:,} of them sent before the recording started" if late else ""
    return (
        f"negotiation log: INCOMPLETE, {log['missing']:,} sent messages missing{before}, "
        f"{e.get('missing', 0):,} events missing ({counts})"
    )


def _print_stats(f: dict[str, Any]) -> None:
    m = f["messages"]
    t = Table(title=f"messages ({f['source']})", title_justify="left", header_style="bold")
    t.add_column("type")
    t.add_column("sent", justify="right")
    for k, v in m["by_type"].items():
        t.add_row(k, f"{v:,}")
    t.add_row("[bold]total[/bold]", f"[bold]{m['total']:,}[/bold]")
    console.print(t)
    console.print(
        f"recorder: {m['recorded']:,} deliveries of messages, {m['recorded_events']:,} events, "
        f"{m['repeated']:,} repeated (re-sent or redelivered on the same topic)",
        highlight=False,
    )
    console.print(log_line(f["log"]), highlight=False)
    c, p, lat = f["conversations"], f["proposals_per_call"], f["negotiation_latency_ms"]
    t = Table(title="negotiations", title_justify="left", show_header=False)
    t.add_row("conversations", f"{c['total']:,} ({', '.join(f'{k} {v}' for k, v in c['by_status'].items())})")
    t.add_row("rounds per conversation", _fmt(c["rounds_mean"]))
    hist = "  ".join(f"{k}: {v}" for k, v in p["histogram"].items())
    t.add_row("proposals per call", f"mean {_fmt(p['mean'])}, min {p['min']}, max {p['max']}   ({hist})")
    t.add_row(
        "latency CFP → informConfirm (wall ms)",
        f"n {lat['count']}  mean {_fmt(lat['mean'], 1)}  min {_fmt(lat['min'], 1)}  p50 {_fmt(lat['p50'], 1)}  "
        f"p90 {_fmt(lat['p90'], 1)}  p99 {_fmt(lat['p99'], 1)}  max {_fmt(lat['max'], 1)}",
    )
    t.add_row("rejections by reason", ", ".join(f"{k} {v}" for k, v in f["rejections"].items()) or "none")
    n = f["notes"]
    kinds = ", ".join(f"{k} {v}" for k, v in n["by_kind"].items()) or "none"
    t.add_row(
        "notes", f"late {n['late']}, duplicate {n['duplicate']}, rejected {n['rejected']}   (all: {kinds})"
    )
    console.print(t)
    t = Table(title="resources", title_justify="left", header_style="bold")
    for col in (
        "resource",
        "calls",
        "proposals",
        "refusals",
        "wins",
        "win rate",
        "steps",
        "busy",
        "utilisation",
    ):
        t.add_column(col, justify="left" if col == "resource" else "right")
    for name, r in f["resources"].items():
        t.add_row(
            name,
            str(r["calls"]),
            str(r["proposals"]),
            str(r["refusals"]),
            str(r["wins"]),
            "" if r["win_rate"] is None else f"{r['win_rate']:.0%}",
            str(r["steps"]),
            _fmt(r["busy"]),
            "" if r["utilisation"] is None else f"{r['utilisation']:.0%}",
        )
    console.print(t)


# =========================================================================== report


@app.command()
def report(
    out: OutArg,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="default: OUT/report.html")] = None,
    db: DbOpt = None,
) -> None:
    """One self-contained HTML report (figures embedded; also written to OUT/figures/)."""
    from twinbid.report import write_report

    run = _load(out, db)
    path = write_report(run, output)
    console.print(f"report written to {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
