"""`twinbid report OUT`: one self-contained HTML page about a run, readable offline.

Every figure is a PNG written to ``OUT/figures/`` and embedded in ``OUT/report.html`` as a
base64 data URI, so the page needs no network, no JavaScript and no other file.
"""

from __future__ import annotations

import base64
import html
import math
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from scenarios.gantt import PRIORITY_COLOURS, Bar
from scenarios.gantt import draw as draw_gantt
from twinbid.analysis import MESSAGE_TYPES, Run

DPI = 110
BAR_OK = "#c6dbef"
BAR_BAD = "#e7298a"
TYPE_COLOURS = {
    "callForProposal": "#1b9e77",
    "proposal": "#7570b3",
    "refuseProposal": "#e6ab02",
    "acceptProposal": "#66a61e",
    "rejectProposal": "#d95f02",
    "informConfirm": "#1f78b4",
    "inform": "#a6cee3",
    "informFailure": "#e7298a",
    "notUnderstood": "#666666",
}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.titlelocation": "left"})
    return plt


def _tidy(ax: Any) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


# =========================================================================== figures


def figure_gantt(run: Run, path: Path) -> Path | None:
    w = run.work_orders
    if not len(w):
        return None
    done = w[w["state"] == "done"]
    prio = run.products.set_index("product")["priority"].to_dict() if len(run.products) else {}
    bars = [
        Bar(
            r.resource,
            r.product,
            int(r.step),
            float(r.started if not pd.isna(r.started) else r.start),
            float(r.finished if not pd.isna(r.finished) else r.end),
            int(prio.get(r.product, r.priority)),
        )
        for r in done.itertuples(index=False)
    ]
    return draw_gantt(bars, path, title="Schedule", dpi=DPI)


def figure_utilisation(run: Run, path: Path) -> Path | None:
    """Heat map: resources x time windows, busy fraction; mean utilisation on the right."""
    u = run.utilisation_over_time(bins=60)
    if not len(u.columns):
        return None
    plt = _plt()
    resources = list(u.columns)
    height = max(2.4, 0.38 * len(resources) + 1.4)
    fig, ax = plt.subplots(figsize=(13, height), dpi=DPI)
    edges = [*list(u.index), u.index[-1] + (u.index[1] - u.index[0] if len(u.index) > 1 else 1.0)]
    mesh = ax.pcolormesh(edges, range(len(resources) + 1), u.T.values, cmap="Greens", vmin=0, vmax=1)
    ax.set_yticks([i + 0.5 for i in range(len(resources))], resources)
    ax.set_ylim(len(resources), 0)
    ax.set_xlabel("simulated time")
    ax.set_title(
        f"Resource utilisation over time (busy fraction per window of {edges[1] - edges[0]:.2g} units)"
    )
    util = run.resources.set_index("resource")["utilisation"].to_dict() if len(run.resources) else {}
    for i, r in enumerate(resources):
        value = util.get(r)
        if value is not None and not pd.isna(value):
            ax.text(
                1.005,
                1 - (i + 0.5) / len(resources),
                f"{value:.0%}",
                transform=ax.transAxes,
                va="center",
                fontsize=8,
            )
    cbar = fig.colorbar(mesh, ax=ax, pad=0.05, fraction=0.03)
    cbar.set_label("busy")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def figure_queues(run: Run, path: Path) -> Path | None:
    """Steps booked and waiting at each resource over simulated time (step lines or a heat map)."""
    q = run.queue_lengths()
    if not len(q.columns) or not len(q):
        return None
    plt = _plt()
    resources = list(q.columns)
    if len(resources) <= 8:
        fig, ax = plt.subplots(figsize=(13, 3.4), dpi=DPI)
        cmap = plt.get_cmap("tab10")
        for i, r in enumerate(resources):
            ax.step(q.index, q[r], where="post", label=r, color=cmap(i % 10), linewidth=1.6)
        ax.set_ylabel("steps waiting")
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)
        ax.grid(alpha=0.3)
        _tidy(ax)
    else:
        height = max(2.4, 0.38 * len(resources) + 1.4)
        fig, ax = plt.subplots(figsize=(13, height), dpi=DPI)
        edges = [*list(q.index), q.index[-1] + 1e-9]
        mesh = ax.pcolormesh(edges, range(len(resources) + 1), q.T.values[:, :], cmap="Oranges", vmin=0)
        ax.set_yticks([i + 0.5 for i in range(len(resources))], resources)
        ax.set_ylim(len(resources), 0)
        fig.colorbar(mesh, ax=ax, pad=0.02, fraction=0.03).set_label("steps waiting")
    ax.set_xlabel("simulated time")
    ax.set_title("Queue length: steps booked at a resource and not yet started")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


MAX_LANES = 120  # beyond this many products the lanes are unreadable; the other panels remain


def figure_negotiations(run: Run, path: Path) -> Path | None:
    """Wall-clock timeline: one lane per product with one bar per negotiation (CFP -> informConfirm)
    and marks for its messages; the latency of every negotiation against the time it started;
    the message rate by type."""
    c = run.conversations
    m = run.messages
    if not len(c) or not len(m) or m["time_ms"].isna().all():
        return None
    plt = _plt()

    products = (
        [p for p in run.products["product"].tolist() if p in set(c["product"])] if len(run.products) else []
    )
    products += sorted(set(c["product"].dropna()) - set(products))
    n = len(products)
    lanes = 0 < n <= MAX_LANES
    lane_h = 0.28 if n <= 40 else 0.15
    heights = ([max(2.6, lane_h * n + 0.8)] if lanes else []) + [2.2, 1.8]
    fig, axes = plt.subplots(
        len(heights),
        1,
        figsize=(13, sum(heights) + 0.6),
        dpi=DPI,
        sharex=True,
        gridspec_kw={"height_ratios": heights},
    )
    if lanes:
        _negotiation_lanes(run, axes[0], products)
    _latency_panel(run, axes[-2])
    _rate_panel(run, axes[-1])
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _negotiation_lanes(run: Run, ax: Any, products: list[str]) -> None:
    from matplotlib.lines import Line2D

    c, m, t0 = run.conversations, run.messages, run.t0_ms
    lane = {p: i for i, p in enumerate(products)}
    n = len(products)
    first_cfp = m[m["type"] == "callForProposal"].groupby("conversation_id")["time_ms"].min()
    end_of = m[m["type"] == "informConfirm"].groupby("conversation_id")["time_ms"].min()
    thick = 7.0 if n <= 20 else 5.0 if n <= 40 else 3.0
    for r in c.itertuples(index=False):
        if r.product not in lane or r.conversation_id not in first_cfp:
            continue
        y = lane[r.product]
        s = (first_cfp[r.conversation_id] - t0) / 1000
        e = end_of.get(r.conversation_id)
        colour = BAR_OK if r.status in ("done", "scheduled") else BAR_BAD
        if e is None or pd.isna(e):
            e, colour = m.loc[m["conversation_id"] == r.conversation_id, "time_ms"].max(), BAR_BAD
        e = (e - t0) / 1000
        ax.plot([s, e], [y, y], color=colour, linewidth=thick, solid_capstyle="butt", zorder=2)
        if r.rounds and r.rounds > 1:
            ax.text(e, y, f" ×{int(r.rounds)}", va="center", fontsize=7, color=BAR_BAD, zorder=4)
    marks = m[m["type"].isin(["callForProposal", "proposal", "refuseProposal", "informConfirm"])]
    size = 16 if n <= 40 else 6
    for kind, marker in (
        ("callForProposal", ">"),
        ("proposal", "o"),
        ("refuseProposal", "X"),
        ("informConfirm", "|"),
    ):
        g = marks[marks["type"] == kind]
        ax.scatter(
            [(t - t0) / 1000 for t in g["time_ms"]],
            [lane.get(p, math.nan) for p in g["product"]],
            s=size * (2.2 if marker == "|" else 1),
            marker=marker,
            color=TYPE_COLOURS[kind],
            zorder=3,
            linewidths=1.4 if marker == "|" else 0,
        )
    ax.set_yticks(range(n), products, fontsize=8 if n <= 40 else 6.5)
    ax.set_ylim(n - 0.5, -0.5)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Negotiations over wall-clock time, one lane per product")
    legend = [
        Line2D([0], [0], color=BAR_OK, lw=6, label="negotiating: first CFP → informConfirm"),
        Line2D([0], [0], color=BAR_BAD, lw=6, label="not confirmed (×n: rounds)"),
        Line2D([0], [0], marker=">", lw=0, color=TYPE_COLOURS["callForProposal"], label="callForProposal"),
        Line2D([0], [0], marker="o", lw=0, color=TYPE_COLOURS["proposal"], label="proposal"),
        Line2D([0], [0], marker="X", lw=0, color=TYPE_COLOURS["refuseProposal"], label="refuseProposal"),
        Line2D(
            [0],
            [0],
            marker="|",
            lw=0,
            markersize=9,
            markeredgewidth=1.6,
            color=TYPE_COLOURS["informConfirm"],
            label="informConfirm",
        ),
    ]
    ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=7.5)
    _tidy(ax)


def _latency_panel(run: Run, ax: Any) -> None:
    import matplotlib.pyplot as plt

    c = run.conversations.dropna(subset=["cfp_ms", "latency_ms"])
    if len(c):
        x = (c["cfp_ms"] - run.t0_ms) / 1000
        proposals = c["proposals"].clip(upper=6).astype(int)
        colours = plt.get_cmap("viridis")
        top = max(1, int(proposals.max()))
        for k in sorted(proposals.unique()):
            sel = proposals == k
            label = f"{k}{'+' if k == 6 else ''} proposal{'s' if k != 1 else ''}"
            ax.scatter(
                x[sel],
                c.loc[sel, "latency_ms"],
                s=16,
                color=colours(k / top * 0.9),
                linewidths=0,
                zorder=3,
                label=label,
            )
        retried = c[c["rounds"] > 1]
        if len(retried):
            ax.scatter(
                (retried["cfp_ms"] - run.t0_ms) / 1000,
                retried["latency_ms"],
                s=42,
                facecolors="none",
                edgecolors=BAR_BAD,
                linewidths=1.2,
                zorder=4,
                label="more than one round",
            )
        ax.axhline(c["latency_ms"].median(), color="black", linewidth=0.8, linestyle=":", label="median")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=7.5)
    ax.set_ylabel("latency ms")
    if len(c) and c["latency_ms"].min() > 0:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_title("Negotiation latency, first CFP → informConfirm (log scale), against when it started")
    ax.grid(alpha=0.3)
    _tidy(ax)


def _rate_panel(run: Run, ax: Any) -> None:
    m, t0 = run.messages, run.t0_ms
    span = max((m["time_ms"].max() - t0) / 1000, 1e-3)
    bins = min(120, max(10, int(span * 10)))
    width = span / bins
    bottoms = [0.0] * bins
    for kind in MESSAGE_TYPES:
        times = m.loc[m["type"] == kind, "time_ms"].dropna()
        if not len(times):
            continue
        counts = [0] * bins
        for t in times:
            counts[min(bins - 1, int((t - t0) / 1000 / width))] += 1
        rates = [k / width for k in counts]
        ax.bar(
            [i * width for i in range(bins)],
            rates,
            width=width,
            bottom=bottoms,
            align="edge",
            color=TYPE_COLOURS[kind],
            label=kind,
            linewidth=0,
        )
        bottoms = [b + r for b, r in zip(bottoms, rates, strict=True)]
    ax.set_ylabel("messages / s")
    ax.set_xlabel("wall-clock seconds since the first message")
    ax.set_title("Message rate by type")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    _tidy(ax)


def figure_distributions(run: Run, path: Path) -> Path | None:
    """Negotiation latency histogram and proposals per call."""
    lat = run.latencies()
    m = run.messages
    if not len(lat) and not len(m):
        return None
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 3.0), dpi=DPI)
    if len(lat):
        a.hist(lat, bins=min(40, max(5, len(lat) // 3)), color="#1f78b4", edgecolor="white")
        for q, style in ((0.5, "-"), (0.99, "--")):
            v = lat.quantile(q)
            a.axvline(v, color="black", linestyle=style, linewidth=1)
            a.text(
                v,
                a.get_ylim()[1] * (0.95 if q == 0.5 else 0.8),
                f" p{int(q * 100)} {v:.0f} ms ",
                fontsize=8,
                va="top",
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1},
            )
    a.set_xlabel("wall ms, first call for proposals → informConfirm")
    a.set_ylabel("negotiations")
    a.set_title("Negotiation latency")
    _tidy(a)
    props = m[m["type"] == "proposal"]["in_reply_to"].value_counts()
    calls = m.loc[m["type"] == "callForProposal", "message_id"]
    per_call = pd.Series([int(props.get(mid, 0)) for mid in calls]).value_counts().sort_index()
    b.bar([str(k) for k in per_call.index], per_call.values, color="#7570b3", edgecolor="white")
    b.set_xlabel("proposals received")
    b.set_ylabel("calls for proposal")
    b.set_title("Proposals per call")
    _tidy(b)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


# =========================================================================== HTML

CSS = """
:root { --ink:#1d2330; --muted:#5b6475; --line:#d9dee7; --bg:#f6f7fa; --accent:#1f5fae; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
       color:var(--ink); background:var(--bg); }
main { max-width:1240px; margin:0 auto; padding:28px 32px 60px; background:#fff; }
h1 { font-size:26px; margin:0 0 4px; }
h2 { font-size:19px; margin:38px 0 8px; padding-bottom:4px; border-bottom:2px solid var(--line); }
p.sub, p.note, figcaption { color:var(--muted); }
p.sub { margin:0 0 20px; }
.cards { display:grid; grid-template-columns:repeat(auto-fill,minmax(175px,1fr)); gap:12px; }
.card { border:1px solid var(--line); border-radius:8px; padding:10px 14px; background:#fbfcfe; }
.card .k { font-size:12px; text-transform:uppercase; letter-spacing:.04em; color:var(--muted); }
.card .v { font-size:22px; font-weight:600; }
.card .d { font-size:12.5px; color:var(--muted); }
figure { margin:10px 0 0; }
figure img { width:100%; height:auto; border:1px solid var(--line); border-radius:6px; }
figcaption { font-size:13.5px; margin-top:4px; }
table { border-collapse:collapse; width:100%; font-size:13.5px; margin:8px 0; }
th, td { padding:4px 8px; border-bottom:1px solid var(--line); text-align:left; vertical-align:top; }
th { background:#eef1f6; font-weight:600; position:sticky; top:0; }
td.n, th.n { text-align:right; font-variant-numeric:tabular-nums; }
tr:nth-child(even) td { background:#fafbfd; }
.pill { display:inline-block; padding:0 7px; border-radius:9px; font-size:12px; color:#fff; }
.ok { background:#2e7d32; } .bad { background:#c62828; } .warn { background:#ef6c00; }
details { margin:10px 0; } summary { cursor:pointer; color:var(--accent); font-weight:600; }
.two { display:grid; grid-template-columns:1fr 1fr; gap:24px; }
code { font-size:13px; background:#eef1f6; padding:1px 4px; border-radius:3px; }
footer { margin-top:40px; color:var(--muted); font-size:12.5px; }
@media print { main { max-width:none; } details { display:block; } }
"""


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _num(x: Any, digits: int = 2, pct: bool = False) -> str:
    if x is None:
        return ""
    try:
        if pd.isna(x):
            return ""
    except (TypeError, ValueError):
        return _e(x)
    if pct:
        return f"{float(x):.0%}"
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and digits == 0):
        return f"{int(x):,}"
    return f"{float(x):,.{digits}f}"


def _table(headers: Iterable[tuple[str, bool]], rows: Iterable[Iterable[str]], cls: str = "") -> str:
    heads = list(headers)
    out = [f'<table class="{cls}"><thead><tr>']
    out += [f'<th class="{"n" if num else ""}">{_e(h)}</th>' for h, num in heads]
    out.append("</tr></thead><tbody>")
    for row in rows:
        cells = list(row)
        out.append(
            "<tr>"
            + "".join(f'<td class="{"n" if heads[i][1] else ""}">{c}</td>' for i, c in enumerate(cells))
            + "</tr>"
        )
    out.append("</tbody></table>")
    return "".join(out)


def _img(path: Path | None, alt: str, caption: str, missing: str = "nothing to draw") -> str:
    if path is None or not path.exists():
        return f'<p class="note">({_e(alt)}: {_e(missing)})</p>'
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{caption} <code>figures/{_e(path.name)}</code></figcaption></figure>"
    )


def _card(key: str, value: str, detail: str = "") -> str:
    return f'<div class="card"><div class="k">{_e(key)}</div><div class="v">{value}</div><div class="d">{detail}</div></div>'


def _status(status: Any) -> str:
    cls = {"completed": "ok", "done": "ok", "failed": "bad"}.get(str(status), "warn")
    return f'<span class="pill {cls}">{_e(status)}</span>'


def render_html(run: Run, figures: dict[str, Path | None]) -> str:
    k, s = run.kpis, run.stats()
    p = run.products
    ns = run.namespace or "?"
    started = (
        datetime.fromtimestamp(run.t0_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if run.t0_ms else "?"
    )
    clock = (k.get("clock") or {}).get("kind", "?")
    completed = int((p["status"] == "completed").sum()) if len(p) else 0
    failed = int((p["status"] == "failed").sum()) if len(p) else 0
    steps_done = int((run.steps["status"] == "done").sum()) if len(run.steps) else 0
    lat = s["negotiation_latency_ms"]
    msgs = s["messages"]
    flow = p["flow_time"].dropna() if len(p) else pd.Series(dtype=float)
    late = int((p["lateness"] > 0).sum()) if len(p) else 0
    with_due = int(p["due"].notna().sum()) if len(p) else 0
    cards = [
        _card("products", f"{completed}/{len(p)}", f"completed; {failed} failed"),
        _card("steps", f"{steps_done}/{len(run.steps)}", "done"),
        _card("makespan", _num(run.makespan), "simulated time units"),
        _card("wall time", _num(k.get("wall_seconds")) + " s", f"{clock} clock"),
        _card(
            "messages",
            f"{msgs['total']:,}",
            f"{_num(msgs['total'] / steps_done if steps_done else None)} per step",
        ),
        _card(
            "negotiation p50", f"{_num(lat['p50'], 0)} ms", f"p99 {_num(lat['p99'], 0)} ms, n={lat['count']}"
        ),
        _card("mean flow time", _num(flow.mean() if len(flow) else None), "release → last step done"),
        _card("late products", f"{late}/{with_due}", "of those with a due date"),
    ]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>twinbid report — {_e(run.out.name)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>Run report: {_e(run.out.name)}</h1>",
        f"<p class='sub'>namespace <code>{_e(ns)}</code> · started {_e(started)} · "
        f"{len(run.resource_names())} resources, {len(p)} products, {len(run.conversations)} negotiations · "
        f"source <code>{_e(run.out)}</code></p>",
        "<h2>Key figures</h2><div class='cards'>" + "".join(cards) + "</div>",
        _priority_table(p),
        "<h2>Schedule</h2>",
        _img(
            figures.get("gantt"),
            "Gantt chart",
            "One row per resource, one bar per executed step "
            "(<i>product·step</i>), coloured by the product's priority. Short bars are left unlabelled.",
        ),
        "<h2>Resource utilisation over time</h2>",
        _img(
            figures.get("utilisation"),
            "Utilisation heat map",
            "Darker is busier: the fraction of each "
            "time window a resource spent executing steps; the number at the right is the utilisation over the "
            "whole makespan.",
        ),
        "<h2>Queue lengths over time</h2>",
        _img(
            figures.get("queues"),
            "Queue lengths",
            "Steps booked at a resource (informConfirm sent) and not yet started, over simulated time.",
            "nothing to draw"
            if run.has_database
            else "needs the run database: booking times are not in the messages",
        ),
        "<h2>Negotiation timeline</h2>",
        _img(
            figures.get("negotiations"),
            "Negotiation timeline",
            "Wall-clock time. Top: each bar is one bidding procedure from its first call for proposals to "
            "the winner's booking confirmation, with its call, proposals, refusals and confirmation marked as "
            "they arrived (lanes for up to 120 products). Middle: each negotiation's latency against when it "
            "started. Bottom: the message rate by type.",
        ),
        _img(
            figures.get("distributions"),
            "Distributions",
            "Left: negotiation latency (p50 solid, p99 dashed). "
            "Right: how many proposals each call for proposals received.",
        ),
        "<h2>Resources</h2>",
        _resources_table(run),
        "<h2>Products</h2>",
        _products_table(p),
        "<h2>Messages and protocol notes</h2>",
        _messages_tables(s),
        "<h2>Negotiations</h2>",
        _conversations_table(run),
        f"<footer>Written by <code>twinbid report</code> at {time.strftime('%Y-%m-%d %H:%M:%S')} from "
        f"<code>{_e(run.out)}</code>. Figures are also in <code>figures/</code>; the tables behind them: "
        f"<code>twinbid stats {_e(run.out)} --csv DIR</code> or <code>twinbid.analysis.load()</code>.</footer>",
        "</main></body></html>",
    ]
    return "\n".join(parts)


def _priority_table(p: pd.DataFrame) -> str:
    if not len(p):
        return ""
    rows = []
    for prio, g in p.groupby("priority"):
        done = g[g["status"] == "completed"]
        due = g[g["due"].notna()]
        rows.append(
            [
                f'<span class="pill" style="background:{PRIORITY_COLOURS.get(int(prio), "#888")}">{int(prio)}</span>',
                _num(len(g), 0),
                _num(len(done), 0),
                _num(done["flow_time"].mean()),
                _num(done["flow_time"].max()),
                _num(due["lateness"].mean()) if len(due) else "",
                f"{int((due['lateness'] > 0).sum())}/{len(due)}" if len(due) else "",
            ]
        )
    heads = [
        ("priority", False),
        ("products", True),
        ("completed", True),
        ("mean flow time", True),
        ("max flow time", True),
        ("mean lateness", True),
        ("late", True),
    ]
    return "<h2>By priority</h2>" + _table(heads, rows)


def _resources_table(run: Run) -> str:
    heads = [
        ("resource", False),
        ("kind", False),
        ("calls", True),
        ("proposals", True),
        ("refusals", True),
        ("wins", True),
        ("win rate", True),
        ("steps", True),
        ("busy", True),
        ("utilisation", True),
        ("revenue", True),
    ]
    rows = [
        [
            f"<b>{_e(r.resource)}</b>",
            _e(r.kind),
            _num(r.calls, 0),
            _num(r.proposals, 0),
            _num(r.refusals, 0),
            _num(r.wins, 0),
            _num(r.win_rate, pct=True),
            _num(r.steps, 0),
            _num(r.busy),
            _num(r.utilisation, pct=True),
            _num(r.revenue),
        ]
        for r in run.resources.itertuples(index=False)
    ]
    return _table(heads, rows) + (
        "<p class='note'>calls: calls for proposals received; win rate: accepted proposals / proposals; "
        "utilisation: busy time / makespan.</p>"
    )


def _products_table(p: pd.DataFrame) -> str:
    heads = [
        ("product", False),
        ("type", False),
        ("priority", True),
        ("release", True),
        ("due", True),
        ("finished", True),
        ("flow time", True),
        ("lateness", True),
        ("status", False),
    ]
    rows = [
        [
            f"<b>{_e(r.product)}</b>",
            _e(r.product_type),
            _num(r.priority, 0),
            _num(r.release),
            _num(r.due),
            _num(r.end),
            _num(r.flow_time),
            _num(r.lateness),
            _status(r.status) + (f" {_e(r.reason)}" if r.reason else ""),
        ]
        for r in p.itertuples(index=False)
    ]
    return _table(heads, rows)


def _messages_tables(s: dict[str, Any]) -> str:
    m = s["messages"]
    by_type = _table(
        [("type", False), ("sent", True)],
        [
            [
                f'<span class="pill" style="background:{TYPE_COLOURS.get(k, "#888")}">&nbsp;</span> {_e(k)}',
                _num(v, 0),
            ]
            for k, v in m["by_type"].items()
        ]
        + [["<b>total</b>", f"<b>{m['total']:,}</b>"]],
    )
    n = s["notes"]
    rows = [
        ["late", _num(n["late"], 0)],
        ["duplicate", _num(n["duplicate"], 0)],
        ["rejected input", _num(n["rejected"], 0)],
    ]
    rows += [[f"&nbsp;&nbsp;{_e(k)}", _num(v, 0)] for k, v in n["by_kind"].items()]
    rows += [[f"rejectProposal: {_e(k)}", _num(v, 0)] for k, v in s["rejections"].items()]
    notes = _table([("protocol notes and rejections", False), ("count", True)], rows)
    ppc, lat = s["proposals_per_call"], s["negotiation_latency_ms"]
    extra = (
        f"<p class='note'>The recorder saw {m['recorded']:,} deliveries of messages and {m['recorded_events']:,} "
        f"progress events ({m['repeated']:,} repeated on the same topic: re-sent or redelivered). Proposals per call: mean {_num(ppc['mean'])}, "
        f"min {_num(ppc['min'], 0)}, max {_num(ppc['max'], 0)}. Negotiation latency (wall ms): "
        f"min {_num(lat['min'], 0)}, p50 {_num(lat['p50'], 0)}, p90 {_num(lat['p90'], 0)}, "
        f"p99 {_num(lat['p99'], 0)}, max {_num(lat['max'], 0)}.</p>"
    )
    return f"<div class='two'><div>{by_type}</div><div>{notes}</div></div>{extra}"


def _conversations_table(run: Run) -> str:
    c = run.conversations
    if not len(c):
        return "<p class='note'>No negotiations recorded.</p>"
    c = c.sort_values(["cfp_ms", "product", "step"], na_position="last")
    heads = [
        ("product", False),
        ("step", True),
        ("capability", False),
        ("prio", True),
        ("rounds", True),
        ("proposals", True),
        ("winner", False),
        ("price", True),
        ("policy", False),
        ("why", False),
        ("booked", True),
        ("done", True),
        ("latency ms", True),
        ("status", False),
        ("conversation", False),
    ]
    rows = [
        [
            _e(r.product),
            _num(r.step, 0),
            _e(r.capability),
            _num(r.priority, 0),
            _num(r.rounds, 0),
            _num(r.proposals, 0),
            _e(r.winner),
            _num(r.price),
            _e(r.policy),
            _e(r.selection_reason),
            _num(r.started),
            _num(r.finished),
            _num(r.latency_ms, 0),
            _status(r.status),
            f"<code>{_e(str(r.conversation_id)[:8])}</code>",
        ]
        for r in c.itertuples(index=False)
    ]
    return (
        f"<details><summary>All {len(c)} negotiations</summary>{_table(heads, rows)}"
        f"<p class='note'>Trace one: <code>twinbid trace {_e(run.out)} PRODUCT/STEP</code> "
        "(add <code>--mermaid</code> for a sequence diagram).</p></details>"
    )


# =========================================================================== entry point


def write_report(run: Run, output: Path | None = None) -> Path:
    """Draw every figure into OUT/figures/, write the HTML (default OUT/report.html); return its path."""
    folder = run.out / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Path | None] = {}
    for name, fn in (
        ("gantt", figure_gantt),
        ("utilisation", figure_utilisation),
        ("queues", figure_queues),
        ("negotiations", figure_negotiations),
        ("distributions", figure_distributions),
    ):
        figures[name] = fn(run, folder / f"{name}.png")
    path = output or run.out / "report.html"
    path.write_text(render_html(run, figures), encoding="utf-8")
    return path
