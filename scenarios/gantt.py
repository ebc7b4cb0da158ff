"""The schedule as a Gantt chart (PNG): one row per resource, one bar per executed step.

Bars are coloured by the product's priority (legend below the chart), separated by a thin
white edge so back-to-back steps stay distinguishable, and labelled ``product·step`` only
where the label fits inside its bar — short bars stay unlabelled rather than overprinted.
The figure's height grows with the number of resources, never with the number of products,
up to ``MAX_HEIGHT_IN``: a plant of thousands of resources gets thinner rows (every n-th one
named, bars unlabelled) instead of a canvas too large to allocate — at 0.42 in per row, 5,000
resources would need a 231,000-pixel-high image, which Agg refuses (2^16 at most) after it had
taken gigabytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel import select

from agents.persistence.database import Database
from agents.persistence.tables import ProductRecord, WorkOrderRecord

#: Priority 1 (top: earliest completion) ... 5 (lowest: cheapest), colour-blind-safe-ish.
PRIORITY_COLOURS = {1: "#d7301f", 2: "#fc8d59", 3: "#fdcc8a", 4: "#9ecae1", 5: "#3182bd"}
PRIORITY_NAMES = {1: "1 (earliest completion)", 5: "5 (cheapest)"}
ROW_IN = 0.42  # inches per resource row
MAX_HEIGHT_IN = 120.0  # 13,200 px at 110 dpi: ~75 MB of canvas
MIN_LABEL_PX = 14.0  # rows thinner than this get no bar labels, and only every n-th row is named


@dataclass(frozen=True)
class Bar:
    resource: str
    product: str
    step: int
    start: float
    end: float
    priority: int = 3


def bars_from_db(db: Database) -> list[Bar]:
    with db.session() as s:
        orders = s.exec(select(WorkOrderRecord).where(WorkOrderRecord.state == "done")).all()
        priorities = {p.product: p.priority for p in s.exec(select(ProductRecord)).all()}
    return [
        Bar(
            o.resource,
            o.product,
            o.step,
            o.started if o.started is not None else o.start,
            o.finished if o.finished is not None else o.end,
            priorities.get(o.product, o.priority),
        )
        for o in orders
    ]


def gantt(db: Database, path: Path, *, title: str = "") -> Path | None:
    """Draw the executed steps of the run in `db` to `path` (None when nothing was executed)."""
    return draw(bars_from_db(db), path, title=title)


def _fit_labels(fig: Any, ax: Any, labels: list[tuple[Any, Bar]], bar_height: float) -> None:
    """Measure every label as rendered: one line if it fits in its bar, else two, else none."""
    renderer = fig.canvas.get_renderer()
    for text, b in labels:
        (x0, y0), (x1, y1) = ax.transData.transform([(b.start, 0), (b.end, bar_height)])
        room_w, room_h = abs(x1 - x0) - 4, abs(y1 - y0) - 2
        for candidate in (f"{b.product}·{b.step}", f"{b.product}\nstep {b.step}"):
            text.set_text(candidate)
            extent = text.get_window_extent(renderer)
            if extent.width <= room_w and extent.height <= room_h:
                break
        else:
            text.remove()


def draw(bars: Iterable[Bar], path: Path, *, title: str = "", dpi: int = 110) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    bars = list(bars)
    if not bars:
        return None
    resources = sorted({b.resource for b in bars})
    row = {r: i for i, r in enumerate(resources)}
    t0 = min(0.0, min(b.start for b in bars))
    t1 = max(b.end for b in bars)
    span = max(t1 - t0, 1e-9)
    width_in = 13.0
    height_in = min(MAX_HEIGHT_IN, max(2.8, ROW_IN * len(resources) + 1.7))
    row_px = (height_in - 1.7) * dpi / len(resources)
    fig, ax = plt.subplots(figsize=(width_in, height_in), dpi=dpi)
    fontsize = 7.0 if len(bars) < 200 else 6.0
    by_priority: dict[int, list[Bar]] = {}
    for b in bars:
        by_priority.setdefault(b.priority, []).append(b)
    px_per_unit = width_in * dpi * 0.85 / (span * 1.02)  # about: the plotting area is ~85% wide
    for priority, group in sorted(by_priority.items()):
        ax.barh(
            [row[b.resource] for b in group],
            [max(b.end - b.start, 0.0) for b in group],
            left=[b.start for b in group],
            height=0.72,
            color=PRIORITY_COLOURS.get(priority, "#bbbbbb"),
            edgecolor="white",
            # a white gap between back-to-back steps, but not one that swallows a bar a few pixels wide
            linewidth=[0.8 if (b.end - b.start) * px_per_unit >= 8 else 0.2 for b in group],
        )
    dark = {1, 5}
    labels = []
    for b in bars if row_px >= MIN_LABEL_PX else ():
        text = ax.text(
            (b.start + b.end) / 2,
            row[b.resource],
            f"{b.product}·{b.step}",
            ha="center",
            va="center",
            fontsize=fontsize,
            color="white" if b.priority in dark else "black",
            clip_on=True,
        )
        labels.append((text, b))
    every = max(1, math.ceil(MIN_LABEL_PX / row_px))
    ax.set_yticks(range(0, len(resources), every), resources[::every])
    ax.set_ylim(len(resources) - 0.5, -0.5)
    ax.set_xlim(t0, t0 + span * 1.02)
    ax.set_xlabel("simulated time")
    ax.set_title(f"{title or 'Schedule'} ({len(bars)} steps)", loc="left", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    handles = [
        Patch(color=PRIORITY_COLOURS.get(p, "#bbbbbb"), label=f"priority {PRIORITY_NAMES.get(p, p)}")
        for p in sorted(by_priority)
    ]
    ax.legend(  # above the chart, right of the title: it never covers a bar
        handles=handles,
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        ncol=len(handles),
        frameon=False,
        fontsize=8,
        handlelength=1.2,
        columnspacing=1.0,
        borderaxespad=0.2,
    )
    fig.tight_layout()
    _fit_labels(fig, ax, labels, 0.72)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path
