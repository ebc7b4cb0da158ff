"""A role is one concern of an agent (bidding, queueing, documenting...).

Agents are composed of roles, as in mango-agents: the runtime routes each
incoming message to the first role that accepts it, and gives every role the
same services (send, timers, journal, notes) through its agent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agents.runtime.agent import Agent
    from protocol.frame import Message
    from protocol.topics import Topic


class Role:
    agent: Agent

    def bind(self, agent: Agent) -> None:
        self.agent = agent

    def topic_filters(self) -> list[str]:
        """Extra MQTT subscriptions this role needs (the inbox is always subscribed)."""
        return []

    def accepts(self, msg: Message, topic: Topic) -> bool:
        return False

    async def handle(self, msg: Message, topic: Topic) -> None:
        """Act on a message this role accepted."""

    async def recover(self) -> None:
        """Reload this role's state from the run database (after a restart)."""

    async def on_start(self) -> None:
        """Called once the agent is connected, subscribed and registered."""

    async def on_stop(self) -> None:
        """Called on a clean stop."""

    def on_crash(self) -> None:
        """An in-process crash (fault injection): drop whatever is running, as a dead process would."""
