"""Recovery time: from a killed agent process's takeover to its first resumed action.

Runs `scenarios/chaos.yaml` in 3 agent processes (plus a warm spare) on a private mosquitto and
SIGKILLs one process at a time, far enough apart that each takeover completes before the next
kill. A takeover hands the killed share to the spare; its agents reload their state from the run
database, reconnect (persistent MQTT sessions) and resume. Reported: p50/p99 seconds from the
takeover to the first message the share publishes, and that every product still completed.

    python bench/bench_recovery.py [--kills 8] [--gap 2.5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machineinfo import machine

from scenarios.chaos import Chaos
from scenarios.kpis import percentile
from scenarios.launcher import RunOptions, run
from scenarios.loader import load_scenario


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=8)
    ap.add_argument("--gap", type=float, default=2.5, help="wall seconds between kills")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    scenario = load_scenario(Path(__file__).resolve().parents[1] / "scenarios" / "chaos.yaml")
    chaos = Chaos(kills=args.kills, interval=(args.gap, args.gap + 0.5), down=0.0, broker_restarts=0, seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(
            run(
                scenario,
                RunOptions(
                    out=Path(tmp) / "out", progress=False, broker="mosquitto", processes=4, chaos=chaos
                ),
            )
        )
    times = [r.seconds for r in result.recoveries if r.seconds is not None]
    figures = {
        "kills": sum(1 for e in result.chaos_log if e["event"] == "kill"),
        "measured": len(times),
        "recovery_p50_s": percentile(times, 0.5),
        "recovery_p99_s": percentile(times, 0.99),
        "products_completed": result.kpis["products"]["completed"],
        "products_total": result.kpis["products"]["total"],
    }
    print(f"machine: {machine()}")
    print(f"kills {figures['kills']}, recoveries measured {figures['measured']}")
    print(
        f"recovery (takeover -> first resumed action): p50 {figures['recovery_p50_s']} s, p99 {figures['recovery_p99_s']} s"
    )
    print(f"products completed: {figures['products_completed']}/{figures['products_total']}")
    if args.json:
        print(json.dumps({"machine": machine(), **figures}))


if __name__ == "__main__":
    main()
