"""Key figures of a run, computed from the run database alone (so they can be recomputed later)."""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from typing import Any

from sqlmodel import select

from agents.persistence.database import Database
from agents.persistence.tables import (
    InboxRecord,
    NoteRecord,
    OutboxRecord,
    ProductRecord,
    RunRecord,
    StepRecord,
    WorkOrderRecord,
)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def compute(
    db: Database,
    *,
    wall_seconds: float,
    plan_steps: int | None = None,
    products_total: int | None = None,
    resources: list[str] | None = None,
) -> dict[str, Any]:
    """`plan_steps` / `products_total`: what the scenario asked for (a run stopped early has fewer
    rows); `resources`: every resource of the plant, listed under utilisation even if it did nothing."""
    with db.session() as s:
        products = s.exec(select(ProductRecord)).all()
        steps = s.exec(select(StepRecord)).all()
        out_rows = s.exec(select(OutboxRecord.message_id, OutboxRecord.type, OutboxRecord.conversation_id,
                                 OutboxRecord.created_wall_ms)).all()  # fmt: skip
        confirms = s.exec(
            select(InboxRecord.conversation_id, InboxRecord.received_wall_ms).where(
                InboxRecord.type == "informConfirm"
            )
        ).all()
        orders = s.exec(select(WorkOrderRecord).where(WorkOrderRecord.state == "done")).all()
        run_id = s.exec(select(RunRecord.run_id)).first()
        notes = s.exec(select(NoteRecord.kind)).all()
    by_type = Counter(t for _, t, _, _ in out_rows)
    first_cfp: dict[str, int] = {}
    for _, t, conv, created in out_rows:
        if t == "callForProposal":
            first_cfp[conv] = min(created, first_cfp.get(conv, created))
    latencies = []
    seen_conv = set()
    for conv, received in sorted(confirms, key=lambda r: r[1]):
        if conv in first_cfp and conv not in seen_conv:
            seen_conv.add(conv)
            latencies.append(received - first_cfp[conv])
    finished = [st.finished for st in steps if st.finished is not None]
    releases = [p.release for p in products]
    makespan = (max(finished) - min(releases)) if finished and releases else 0.0
    flow: dict[int, list[float]] = defaultdict(list)
    typed: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    typed_late: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    lateness: dict[int, list[float]] = defaultdict(list)
    last_finish: dict[str, float] = {}  # by product, in one pass (a scan per product was quadratic)
    for st in steps:
        if st.finished is not None and st.finished > last_finish.get(st.product, float("-inf")):
            last_finish[st.product] = st.finished
    for p in products:
        if p.status == "completed" and p.completed_sim is not None:
            end = last_finish.get(p.product, p.completed_sim)
            flow[p.priority].append(end - p.release)
            typed[p.product_type][p.priority].append(end - p.release)
            if p.due is not None:
                lateness[p.priority].append(end - p.due)
                typed_late[p.product_type][p.priority].append(end - p.due)
    all_flow = [x for v in flow.values() for x in v]
    busy: dict[str, float] = dict.fromkeys(resources or [], 0.0)
    for o in orders:
        if o.started is not None and o.finished is not None:
            busy[o.resource] = busy.get(o.resource, 0.0) + o.finished - o.started
    done_steps = sum(1 for st in steps if st.status == "done")
    total_steps = plan_steps if plan_steps is not None else len(steps)
    return {
        "run_id": run_id,  # the run this record holds (tb_run; every row carries it)
        "products": {
            "total": products_total if products_total is not None else len(products),
            "completed": sum(p.status == "completed" for p in products),
            "failed": sum(p.status == "failed" for p in products),
        },
        "steps": {"total": total_steps, "completed": done_steps},
        "makespan": makespan,
        "wall_seconds": round(wall_seconds, 3),
        # from the first message to the last: the plant at work, without start-up and shutdown
        "active_seconds": round((max(c for *_, c in out_rows) - min(c for *_, c in out_rows)) / 1000, 3)
        if out_rows
        else 0.0,
        "messages": {
            "total": len(out_rows),
            "by_type": dict(sorted(by_type.items())),
            "per_step": round(len(out_rows) / done_steps, 3) if done_steps else None,
        },
        "negotiation_latency_ms": {
            "p50": percentile(latencies, 0.5),
            "p99": percentile(latencies, 0.99),
            "count": len(latencies),
        },
        "flow_time": {
            "mean": statistics.fmean(all_flow) if all_flow else None,
            "by_priority": {str(k): statistics.fmean(v) for k, v in sorted(flow.items())},
            # the priority service is a promise within a product type: compare like with like
            "by_type_and_priority": {
                t: {
                    str(k): {
                        "count": len(v),
                        "mean": statistics.fmean(v),
                        "late": sum(x > 0 for x in typed_late[t].get(k, [])),
                    }
                    for k, v in sorted(by.items())
                }
                for t, by in sorted(typed.items())
            },
        },
        "lateness": {
            str(k): {"mean": statistics.fmean(v), "late": sum(x > 0 for x in v)}
            for k, v in sorted(lateness.items())
        },
        "utilisation": {r: round(b / makespan, 4) if makespan else 0.0 for r, b in sorted(busy.items())},
        "notes": dict(sorted(Counter(notes).items())),
    }


def dumps(kpis: dict[str, Any]) -> str:
    return json.dumps(kpis, indent=2, sort_keys=False)
