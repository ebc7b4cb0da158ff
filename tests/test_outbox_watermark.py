"""Published means acknowledged: a restart sends again what the broker had not acknowledged, and
nothing it had. And acknowledged means committed: a message received is acknowledged to the broker
only once what it caused is durable.

The broker's acknowledgements move each agent's watermark (``tb_agent.published_seq``); the
outbox rows above it are what a restarted agent publishes again, before anything it decides
anew, and its own messages continue the seq. Real mosquitto, real SQLite, a real broker outage.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from conftest import require_mosquitto
from sqlmodel import select

from agents.persistence import open_database
from agents.persistence.database import Database, sqlite_url
from agents.persistence.tables import AgentRecord, OutboxRecord
from agents.runtime.agent import Agent
from agents.runtime.directory import Entry
from agents.runtime.node import Node, NodeConfig
from protocol.frame import MessageType, Role, make_message, parse_message
from protocol.topics import direct_topic
from shopfloor.clock import make_clock

TOPIC = direct_topic("t", "listener", "p1")


def say(agent: Agent, n: int) -> None:
    msg = make_message(
        MessageType.INFORM,
        sender=agent.aas_id,
        sender_role=Role.PROVIDER,
        conversation_id="c-1",
        message_id=f"m-{n}",
    )
    agent._publish(TOPIC, msg)


def watermark(db: Database) -> int:
    with db.session() as s:
        row = s.get(AgentRecord, "p1")
        return row.published_seq if row else -1


async def until(condition, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_restart_publishes_again_exactly_what_the_broker_had_not_acknowledged(
    tmp_path: Path, mosquitto, make_transport
) -> None:
    broker = require_mosquitto(mosquitto)
    db = open_database(sqlite_url(tmp_path / "run.db"))
    node = Node(NodeConfig("t", broker.address), make_clock("real"), db)
    await node.start()
    try:
        agent = Agent(node, "p1", "urn:p1")
        await node.add_agent(agent)
        for n in (1, 2, 3):
            say(agent, n)
        await until(lambda: watermark(db) == 3)  # acknowledged, and the watermark committed

        broker.stop()
        for n in (4, 5):
            say(agent, n)
        await node.journal.commit()  # decided and durable, but the broker never acknowledged them
        await node.crash_agent(agent)
        assert watermark(db) == 3
        broker.start()

        seen: list[tuple[str, str]] = []

        async def listen(topic: str, payload: bytes) -> None:
            msg = parse_message(payload)
            seen.append((msg.id, msg.sender))

        listener = await make_transport("listener", broker.address, listen)
        await listener.subscribe(TOPIC)
        again = Agent(node, "p1", "urn:p1")
        await node.add_agent(again)
        say(again, 6)
        await until(lambda: len(seen) >= 3)
        await asyncio.sleep(0.2)  # anything more would arrive now

        assert [m for m, _ in seen] == ["m-4", "m-5", "m-6"]  # 1-3 not again; the old before the new
        await until(lambda: watermark(db) == 6)
        with db.session() as s:
            rows = s.exec(select(OutboxRecord).order_by(OutboxRecord.seq)).all()
        assert [(r.message_id, r.seq) for r in rows] == [(f"m-{n}", n) for n in range(1, 7)]
    finally:
        await node.stop()
        db.dispose()


async def test_a_message_is_acknowledged_only_once_what_it_caused_is_committed(
    tmp_path: Path, mosquitto, make_transport
) -> None:
    """The agent handled the message, but the journal could not commit yet (another process holds
    the writer lock): its PUBACK waits for the commit, so an agent killed in between gets the
    message again from the broker when it comes back (persistent session)."""
    broker = require_mosquitto(mosquitto)
    db = open_database(sqlite_url(tmp_path / "run.db"))
    node = Node(NodeConfig("t", broker.address), make_clock("real"), db)
    await node.start()
    holder: subprocess.Popen | None = None
    try:
        node.directory.add(Entry("p1", "urn:p1", None))
        agent = Agent(node, "a1", "urn:a1")
        await node.add_agent(agent)
        await node.journal.commit()
        sender = await make_transport("p1", broker.address)
        holder = subprocess.Popen(  # noqa: ASYNC220 - returns at once; its stdin lets go of the lock
            [
                sys.executable,
                "-c",
                "import fcntl, os, sys\n"
                f"fd = os.open({str(tmp_path / 'run.db')!r} + '.writer-lock', os.O_RDWR | os.O_CREAT)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                "print('locked', flush=True)\n"
                "sys.stdin.read()\n",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        msg = make_message(
            MessageType.INFORM, sender="urn:p1", sender_role=Role.PROVIDER, conversation_id="c-9"
        )
        await sender.publish(direct_topic("t", "a1", "p1"), msg.to_json())
        await until(lambda: agent.counters["received"] == 1)
        await asyncio.sleep(0.3)  # an acknowledgement written at once would have reached the broker
        await node.crash_agent(agent)
        assert holder.stdin is not None
        holder.stdin.close()
        assert holder.wait(10) == 0

        again = Agent(node, "a1", "urn:a1")
        await node.add_agent(again)
        await until(lambda: again.counters["received"] == 1)  # delivered again: it was not acknowledged
        await node.journal.commit()
        await asyncio.sleep(0.3)
        assert again.counters["received"] == 1  # and acknowledged after this commit: not a third time
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
        await node.stop()
        db.dispose()
