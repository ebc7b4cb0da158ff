"""The webhook outbox over real HTTP: signed deliveries, retries with back-off, exactly one acknowledged delivery
per idempotency key, per-order ordering, and rows that survive a restart of the process that queued them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from sqlmodel import select
from webhook_receiver import Receiver

import agents.ordertaking.tables  # noqa: F401  (registers the tables before create_all)
from agents.ordertaking.tables import WebhookOutboxRecord
from agents.ordertaking.webhooks import WebhookOutbox, event_key, sign, verify_signature
from agents.persistence import open_database
from agents.persistence.database import sqlite_url
from protocol.mosquitto import free_port

SECRET = "s3cret-for-acme"


@pytest.fixture
def db(tmp_path: Path):
    database = open_database(sqlite_url(tmp_path / "run.db"))
    yield database
    database.dispose()


def test_signature_round_trip_and_tampering() -> None:
    body = b'{"id":"o:step-completed:1"}'
    header = sign(SECRET, body)
    assert header.startswith("t=") and ",v1=" in header
    assert verify_signature(SECRET, body, header)
    assert not verify_signature(SECRET, body + b" ", header)
    assert not verify_signature("other", body, header)
    assert not verify_signature(SECRET, body, None)
    assert not verify_signature(SECRET, body, "v1=abc")
    old = sign(SECRET, body, timestamp=int(time.time()) - 3600)
    assert not verify_signature(SECRET, body, old)  # replayed an hour later
    assert verify_signature(SECRET, body, old, tolerance=7200)


def test_idempotency_keys() -> None:
    assert event_key({"order": "o1", "kind": "step-completed", "step": 2}) == "o1:step-completed:2"
    assert event_key({"order": "o1", "kind": "manufacturing-completed"}) == "o1:manufacturing-completed:-"
    assert event_key({"id": "mine", "order": "o1", "kind": "x"}) == "mine"
    first = event_key(
        {"order": "o", "kind": "step-scheduled", "step": 1, "data": {"resource": "a", "start": 1.0}}
    )
    again = event_key(
        {"order": "o", "kind": "step-scheduled", "step": 1, "data": {"resource": "b", "start": 5.0}}
    )
    assert first != again  # a step booked again after a failure is a new event
    reawards = [
        event_key({"order": "o", "kind": "step-reawarded", "step": 1, "data": {"resource": r, "reason": "x"}})
        for r in ("b", "c", "b")
    ]
    assert reawards[0] != reawards[1] and reawards[0] == reawards[2] == "o:step-reawarded:1:b"


async def test_a_flaky_receiver_gets_every_event_exactly_once(db) -> None:
    receiver = Receiver(SECRET, fail_first=5)  # the first five deliveries fail with 503
    url = await receiver.start()
    outbox = WebhookOutbox(db, {"acme": SECRET}, backoff=0.02, max_backoff=0.2, max_attempts=20)
    await outbox.start()
    try:
        keys = []
        for order in ("o1", "o2"):
            events = [
                {"order": order, "kind": "manufacturing-accepted", "product": f"p-{order}"},
                {
                    "order": order,
                    "kind": "step-scheduled",
                    "step": 1,
                    "data": {"resource": "ws-a", "start": 0.0},
                },
                {"order": order, "kind": "step-completed", "step": 1, "data": {"resource": "ws-a"}},
                {"order": order, "kind": "manufacturing-completed", "data": {"flow_time": 3.5}},
            ]
            for e in events:
                outbox.enqueue("acme", url, e)
                keys.append(event_key(e))
        # a product twin that restarted reports an event again: the same key, one delivery
        outbox.enqueue(
            "acme", url, {"order": "o1", "kind": "step-completed", "step": 1, "data": {"resource": "ws-a"}}
        )
        assert await outbox.flush(20)
    finally:
        await outbox.stop()
        await receiver.stop()
    assert receiver.bad_signatures == 0
    assert receiver.acknowledged == {k: 1 for k in keys}, receiver.acknowledged
    assert receiver.calls == len(keys) + 5
    # events of one order arrive in the order they were enqueued, even though early deliveries failed
    for order in ("o1", "o2"):
        kinds = [e["type"] for e in receiver.events if e["order"] == order]
        assert kinds == [
            "manufacturing-accepted",
            "step-scheduled",
            "step-completed",
            "manufacturing-completed",
        ]
    retried = [k for k, attempts in receiver.attempt_headers.items() if len(attempts) > 1]
    assert retried and all(
        receiver.attempt_headers[k] == list(range(1, len(receiver.attempt_headers[k]) + 1)) for k in retried
    )
    event = next(e for e in receiver.events if e["type"] == "manufacturing-completed")
    assert event["vendor"] == "acme" and event["data"] == {"flow_time": 3.5} and event["time"].endswith("Z")
    with db.session() as s:
        rows = s.exec(select(WebhookOutboxRecord)).all()
    assert len(rows) == len(keys) and all(r.state == "delivered" for r in rows)
    assert sum(r.attempts for r in rows) == len(keys) + 5


async def test_undelivered_rows_are_sent_after_a_restart(db) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"  # nobody listens yet
    outbox = WebhookOutbox(db, {"acme": SECRET}, backoff=0.05, max_backoff=0.1, max_attempts=50)
    await outbox.start()
    outbox.enqueue("acme", url, {"order": "o9", "kind": "manufacturing-accepted"})
    outbox.enqueue("acme", url, {"order": "o9", "kind": "manufacturing-completed"})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with db.session() as s:
            row = s.get(WebhookOutboxRecord, "o9:manufacturing-accepted:-")
        if row.attempts >= 2:
            break
        await asyncio.sleep(0.05)
    await outbox.stop()  # the process "dies" with both events undelivered
    with db.session() as s:
        states = {r.key: (r.state, r.attempts) for r in s.exec(select(WebhookOutboxRecord)).all()}
    assert all(state == "pending" for state, _ in states.values()), states
    assert states["o9:manufacturing-accepted:-"][1] >= 2

    receiver = Receiver(SECRET)
    await receiver.start(port)
    again = WebhookOutbox(db, {"acme": SECRET}, backoff=0.05, max_backoff=0.1, max_attempts=50)
    await again.start()
    try:
        assert await again.flush(10)
    finally:
        await again.stop()
        await receiver.stop()
    assert receiver.acknowledged == {"o9:manufacturing-accepted:-": 1, "o9:manufacturing-completed:-": 1}
    assert [e["type"] for e in receiver.events] == ["manufacturing-accepted", "manufacturing-completed"]


async def test_gone_stops_retrying_and_attempts_run_out(db) -> None:
    gone = Receiver(SECRET, fail_first=10**6, fail_status=410)
    broken = Receiver(SECRET, fail_first=10**6, fail_status=500)
    gone_url, broken_url = await gone.start(), await broken.start()
    outbox = WebhookOutbox(db, {"acme": SECRET}, backoff=0.01, max_backoff=0.02, max_attempts=3)
    await outbox.start()
    try:
        outbox.enqueue("acme", gone_url, {"order": "g", "kind": "manufacturing-accepted"})
        outbox.enqueue("acme", broken_url, {"order": "b", "kind": "manufacturing-accepted"})
        outbox.enqueue(
            "acme", None, {"order": "n", "kind": "manufacturing-accepted"}
        )  # no endpoint: log only
        assert await outbox.flush(10)
    finally:
        await outbox.stop()
        await gone.stop()
        await broken.stop()
    assert gone.calls == 1 and broken.calls == 3
    with db.session() as s:
        rows = {r.order_id: r for r in s.exec(select(WebhookOutboxRecord)).all()}
    assert rows["g"].state == "failed" and rows["g"].last_status == 410
    assert rows["b"].state == "failed" and rows["b"].attempts == 3 and rows["b"].last_error == "HTTP 500"
    assert rows["n"].state == "no-endpoint"
    assert [e["delivery"]["state"] for e in outbox.events("b")] == ["failed"]


async def test_a_vendor_without_a_secret_gets_no_unsigned_webhooks(db) -> None:
    receiver = Receiver(SECRET)
    url = await receiver.start()
    outbox = WebhookOutbox(db, backoff=0.01, max_backoff=0.02, max_attempts=2)
    await outbox.start()
    try:
        outbox.enqueue("nobody", url, {"order": "x", "kind": "manufacturing-accepted"})
        assert await outbox.flush(5)
        outbox.remember_secret("acme", SECRET)  # learnt at run time (derived from the vendor's key)
        outbox.enqueue("acme", url, {"order": "y", "kind": "manufacturing-accepted"})
        assert await outbox.flush(5)
    finally:
        await outbox.stop()
        await receiver.stop()
    assert receiver.acknowledged == {"y:manufacturing-accepted:-": 1}
    assert "no webhook signing secret" in outbox.events("x")[0]["delivery"]["lastError"]
    assert WebhookOutbox(db).secret_for("acme") == SECRET  # kept in tb_vendor_secret
