"""Fault injection across processes: SIGKILL agent processes at random, restart the broker.

Used by the chaos test and the recovery benchmark. Kills are spread over the
run; each killed share is taken over by a warm spare after `down` seconds; the
broker is restarted (keeping its persistence) once, half way through.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Chaos:
    kills: int = 20
    interval: tuple[float, float] = (0.3, 1.2)  # wall seconds between kills
    down: float = 0.2  # wall seconds a killed share stays dead
    broker_restarts: int = 1
    seed: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)

    async def run(self, pool: Any, broker: Any, done: Callable[[], bool]) -> None:
        rng = random.Random(self.seed)
        broker_at = self.kills // 2 if self.broker_restarts else -1
        for i in range(self.kills):
            await asyncio.sleep(rng.uniform(*self.interval))
            if done():
                break
            if i == broker_at:
                t0 = time.time()
                await asyncio.to_thread(broker.restart)
                self.log.append(
                    {"event": "broker-restart", "ms": int(t0 * 1000), "took_s": round(time.time() - t0, 3)}
                )
            share = rng.choice(pool.shares)
            killed = pool.kill(share)
            self.log.append({"event": "kill", "share": share, "ms": killed})
            try:
                await asyncio.sleep(self.down)
            finally:
                # Also when the run ends while the share is down: its agents still have to be
                # resumed once, to write their products' AASX and settle what they were doing.
                pool.restart(share, killed)
                self.log.append({"event": "restart", "share": share, "ms": int(time.time() * 1000)})
