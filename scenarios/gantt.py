"""The schedule as a Gantt chart (PNG): one row per resource, one bar per executed step."""

from __future__ import annotations

from pathlib import Path

from sqlmodel import select

from agents.persistence.database import Database
from agents.persistence.tables import ProductRecord, WorkOrderRecord


def gantt(db: Database, path: Path, *, title: str = "") -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with db.session() as s:
        orders = s.exec(select(WorkOrderRecord).where(WorkOrderRecord.state == "done")).all()
        priorities = {p.product: p.priority for p in s.exec(select(ProductRecord)).all()}
    if not orders:
        return None
    resources = sorted({o.resource for o in orders})
    products = sorted({o.product for o in orders})
    cmap = plt.get_cmap("tab20")
    colour = {p: cmap(i % 20) for i, p in enumerate(products)}
    height = max(2.5, 0.45 * len(resources) + 1.2)
    fig, ax = plt.subplots(figsize=(12, height), dpi=110)
    for o in orders:
        y = resources.index(o.resource)
        start, end = o.started or o.start, o.finished or o.end
        hatch = "//" if priorities.get(o.product, 3) == 1 else None
        ax.barh(
            y,
            end - start,
            left=start,
            height=0.7,
            color=colour[o.product],
            edgecolor="black",
            linewidth=0.4,
            hatch=hatch,
        )
        if len(orders) <= 120 and end - start > 0:
            ax.text(
                start + (end - start) / 2, y, f"{o.product}·{o.step}", ha="center", va="center", fontsize=6
            )
    ax.set_yticks(range(len(resources)), resources)
    ax.invert_yaxis()
    ax.set_xlabel("simulated time")
    ax.set_title(title or "Schedule (hatched: priority 1)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
