"""The agent runtime: one MQTT identity, one AAS, a set of roles.

An incoming message goes through the same steps for every kind of agent:
parse (size limit first), check that the topic's sender owns the frame's sender
id, record it in the inbox (write-ahead), and hand it to the role that accepts
it. Outgoing messages are staged in the journal with the state change that
caused them and published only after that commit: the write-before-send rule.
Nothing that arrives can crash the agent: every rejection is logged, counted
and, where a reply address exists, answered with `notUnderstood`.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agents.persistence.tables import EventRecord, InboxRecord, NoteRecord, OutboxRecord
from agents.runtime.role import Role
from protocol.bidding.effects import Count, Effect, Note, Send
from protocol.elements import Reason
from protocol.frame import FrameError, Message, MessageType, make_message
from protocol.frame import Role as FrameRole
from protocol.topics import (
    Channel,
    TopicError,
    cfp_topic,
    check_name,
    direct_topic,
    events_topic,
    inbox_filter,
    parse_topic,
)

if TYPE_CHECKING:
    from agents.runtime.node import Node
    from shopfloor.clock import Clock, Timer

log = logging.getLogger(__name__)


class Agent:
    kind = "agent"

    def __init__(self, node: Node, name: str, aas_id: str) -> None:
        self.node = node
        self.name = check_name(name, "agent name")
        self.aas_id = aas_id
        self.roles: list[Role] = []
        self.counters: Counter[str] = Counter()
        self._timers: dict[str, Timer] = {}
        self._seq = 0
        self.finished = False  # a product that completed (or failed) has nothing left to do

    # --- composition ------------------------------------------------------------------------------

    def add_role(self, role: Role) -> Role:
        role.bind(self)
        self.roles.append(role)
        return role

    def role(self, kind: type) -> Any:
        return next(r for r in self.roles if isinstance(r, kind))

    def topic_filters(self) -> list[str]:
        filters = [inbox_filter(self.node.ns, self.name)]
        for role in self.roles:
            filters += role.topic_filters()
        return filters

    @property
    def clock(self) -> Clock:
        return self.node.clock

    def now(self) -> float:
        return self.node.clock.now()

    def now_ms(self) -> int:
        return self.node.clock.epoch_ms()

    # --- inbound ----------------------------------------------------------------------------------

    async def on_raw(self, topic_text: str, payload: bytes) -> None:
        """Transport callback: one message, in arrival order. Never raises."""
        clock = self.node.clock
        try:
            with clock.activity():
                # The broker gets its PUBACK once the journal has committed what the message
                # caused (the transport's ack_after), not when this returns: waiting for the
                # commit here would serialise each agent's inbox on the commit latency.
                await self._on_raw(topic_text, payload)
        except Exception:
            self.counters["handler-error"] += 1
            log.exception("%s: handler failed on %s", self.name, topic_text)
        finally:
            self.node.delivered(self, topic_text)

    async def _on_raw(self, topic_text: str, payload: bytes) -> None:
        self.counters["received"] += 1
        try:
            topic = parse_topic(topic_text)
        except TopicError as exc:
            return self.reject("bad-topic", str(exc))
        try:
            msg = self.node.messages.parse(payload)
        except FrameError as exc:
            self.reject("bad-frame", f"from {topic.sender} on {topic_text}: {exc}")
            if exc.salvaged and topic.channel is not Channel.EVENTS:
                s = exc.salvaged
                self._reply_not_understood(topic.sender, s.sender, s.message_id, s.conversation_id, str(exc))
            return None
        if topic.channel is Channel.EVENTS:
            return None
        sender = await self.node.directory.by_id(msg.sender)
        if sender is None or sender.name != topic.sender:
            owner = sender.name if sender else "nobody"
            return self.reject(
                "forged-sender",
                f"{msg.type} {msg.id}: frame sender {msg.sender!r} belongs to {owner}, published by {topic.sender!r}",
            )
        if topic.channel is Channel.TO and msg.receiver not in (None, self.aas_id):
            return self.reject("wrong-receiver", f"{msg.type} {msg.id} addressed to {msg.receiver!r}")
        self.node.journal.put(
            InboxRecord,
            {
                "agent": self.name,
                "message_id": msg.id,
                "conversation_id": msg.conversation,
                "type": msg.type.value,
                "sender": topic.sender,
                "topic": topic_text,
                "received_wall_ms": int(time.time() * 1000),
                "received_sim": self.now(),
                # A plant agent's message is its sender's outbox row (same messageId) and a line of
                # the run's recording: the inbox keeps the receipt, not a second copy (a sixth of
                # the bytes a step wrote). A message from outside the plant keeps its payload.
                "payload": ""
                if msg.sender.startswith(self.node.plant_ids)
                else payload.decode(errors="replace"),
            },
        )
        for role in self.roles:
            if role.accepts(msg, topic):
                await role.handle(msg, topic)
                return None
        if msg.type is not MessageType.NOT_UNDERSTOOD:
            self.reject(
                "no-role", f"{msg.type} {msg.id} of conversation {msg.conversation}: nothing here for it"
            )
            self._reply_not_understood(
                topic.sender, msg.sender, msg.id, msg.conversation, "unknown conversation"
            )
        return None

    def reject(self, kind: str, detail: str) -> None:
        self.note(Note(kind, detail))
        log.info("%s rejected input (%s): %s", self.name, kind, detail)

    def _reply_not_understood(
        self, to_name: str, to_id: str, msg_id: str, conversation: str, text: str
    ) -> None:
        reply = make_message(
            MessageType.NOT_UNDERSTOOD,
            sender=self.aas_id,
            sender_role=FrameRole.PROVIDER,
            conversation_id=conversation,
            receiver=to_id,
            receiver_role=FrameRole.REQUESTER,
            in_reply_to=msg_id,
            elements=Reason("not-understood", text[:500]).to_json_elements(),
        )
        self._publish(direct_topic(self.node.ns, to_name, self.name), reply)

    # --- outbound ---------------------------------------------------------------------------------

    async def send(self, msg: Message, capability: str | None = None) -> None:
        """Stage a message; it is published after the state that caused it is committed."""
        if capability is not None:
            topic = cfp_topic(self.node.ns, capability, self.name)
        else:
            receiver = await self.node.directory.by_id(msg.receiver or "")
            if receiver is None:
                self.note(
                    Note("unknown-receiver", f"{msg.type} {msg.id} to {msg.receiver!r}: not registered")
                )
                return
            topic = direct_topic(self.node.ns, receiver.name, self.name)
        self._publish(topic, msg)

    def _publish(self, topic: str, msg: Message) -> None:
        self._seq += 1
        payload = msg.to_json()
        row = {
            "agent": self.name,
            "message_id": msg.id,
            "seq": self._seq,
            "conversation_id": msg.conversation,
            "type": msg.type.value,
            "topic": topic,
            "created_wall_ms": int(time.time() * 1000),
            "created_sim": self.now(),
            "payload": payload.decode(),
            "published": False,
        }
        self.node.journal.put(OutboxRecord, row)
        self.counters[f"sent:{msg.type.value}"] += 1
        self.node.publish_after_commit(self, topic, payload, row)

    async def carry_out(self, effects: list[Effect]) -> list[Effect]:
        """Do the generic effects (send, note); return the rest for the role."""
        rest = []
        for e in effects:
            match e:
                case Send(message=message, capability=capability):
                    await self.send(message, capability)
                case Note():
                    self.note(e)
                case Count(kind=kind):
                    self.counters[f"count:{kind}"] += 1
                case _:
                    rest.append(e)
        return rest

    def note(self, note: Note) -> None:
        self.counters[f"note:{note.kind}"] += 1
        self.node.journal.add(
            NoteRecord,
            {
                "agent": self.name,
                "kind": note.kind,
                "detail": note.detail[:2000],
                "message_id": note.message_id,
                "sim": self.now(),
                "wall_ms": int(time.time() * 1000),
            },
        )

    def event(self, kind: str, *, product: str | None = None, step: int | None = None, **data: Any) -> None:
        """A progress event: recorded, and published on the events topic for observers."""
        now = self.now()
        row = {
            "agent": self.name,
            "kind": kind,
            "product": product,
            "step": step,
            "sim": now,
            "wall_ms": int(time.time() * 1000),
            "data": json.dumps(data, sort_keys=True, default=str),
        }
        self.node.journal.add(EventRecord, row)
        body = json.dumps(
            {"event": kind, "agent": self.name, "product": product, "step": step, "sim": now, **data}
        )
        self.node.publish_event_after_commit(self, events_topic(self.node.ns, self.name), body.encode())
        self.node.on_event(self, kind, product, step, data)

    # --- timers -----------------------------------------------------------------------------------

    def set_timer(self, key: str, when: float | None, callback: Callable[[], Any]) -> None:
        """One timer per key, at simulated time `when`; setting it again replaces it, None cancels it."""
        old = self._timers.get(key)
        if old is not None:
            if when is not None and old.when == when and not (old.cancelled or old.fired or self.finished):
                old.callback = callback  # the same deadline again (most transitions keep it): no re-arming
                return
            del self._timers[key]
            old.cancel()
        if when is None or self.finished:
            return
        self._timers[key] = self.clock.call_at(max(when, self.now()), callback, order=(self.name, key))

    def set_timer_ms(self, key: str, when_ms: int | None, callback: Callable[[], Any]) -> None:
        """The same, for a deadline in epoch milliseconds (the bidding machines' unit)."""
        self.set_timer(key, None if when_ms is None else self.clock.from_epoch_ms(when_ms), callback)

    def cancel_timers(self) -> None:
        for t in self._timers.values():
            t.cancel()
        self._timers.clear()

    # --- lifecycle --------------------------------------------------------------------------------

    async def recover(self) -> None:
        for role in self.roles:
            await role.recover()

    async def on_start(self) -> None:
        for role in self.roles:
            await role.on_start()

    async def on_stop(self) -> None:
        self.cancel_timers()
        for role in self.roles:
            await role.on_stop()

    def finish(self) -> None:
        self.finished = True
        self.cancel_timers()
        self.node.agent_finished(self)
