"""Recording and notification: progress events on MQTT, in the run database, and to the vendor.

Event kinds follow the reference platform's messages: `manufacturing-accepted`,
`step-scheduled`, `step-completed`, `manufacturing-completed`, and the failures
`step-failed` / `manufacturing-failed`. The vendor webhook delivery (signed, from
a persisted outbox) hooks in here.
"""

from __future__ import annotations

from typing import Any

from agents.runtime.role import Role


class Notifier(Role):
    def notify(self, kind: str, *, step: int | None = None, **data: Any) -> None:
        self.agent.event(kind, product=self.agent.name, step=step, **data)
