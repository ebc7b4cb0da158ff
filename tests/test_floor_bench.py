"""bench/bench_floor.py: the floors under twinbid's negotiation figures are what they claim to be.

A floor that skipped part of its guarantee would make the targets look reachable (or twinbid look
slow) for nothing, so each rung is checked on a small real run (real mosquitto, real processes,
real SQLite): every step negotiated; the frames on the wire are VDI/VDE 2193 frames that
twinbid's own parser accepts, carrying the content twinbid's messages carry; with the journal,
every message sent has its outbox row and every delivery its inbox row, committed before the
message went out; with the recorder, every message is in the log.
"""

from __future__ import annotations

import itertools
import sqlite3
import sys
from pathlib import Path

import orjson
import pytest
from conftest import needs_mosquitto

from protocol.elements import Bid, StepCall
from protocol.frame import MessageType, parse_message
from protocol.mosquitto import MosquittoProcess

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import bench_floor  # noqa: E402

K, PRODUCTS, STEPS = 3, 4, 10
MESSAGES = PRODUCTS * STEPS * (2 * K + 3)
DELIVERIES = PRODUCTS * STEPS * (K + K + 1 + (K - 1) + 1 + 1)  # the call reaches all K bidders


def test_a_frame_carries_the_call_and_the_bid_as_twinbid_reads_them() -> None:
    call = bench_floor._frame(
        "p1", "bare/cfp/c7", {"type": "cfp", "conv": "p1-0", "product": "p1", "capability": 7}
    )
    msg = parse_message(call)
    assert msg.type is MessageType.CALL_FOR_PROPOSAL and msg.conversation == "p1-0"
    assert msg.sender == "https://twinbid.dev/ids/bench/p1/aas" and msg.reply_by is not None
    assert StepCall.from_json_elements(msg.interactionElements, strict=True).capability == "c7"
    bid = bench_floor._frame(
        "r2", "bare/prod/p1", {"type": "proposal", "conv": "p1-0", "resource": "r2", "price": 2.5}
    )
    msg = parse_message(bid)
    assert msg.receiver == "https://twinbid.dev/ids/bench/p1/aas"
    assert Bid.from_json_elements(msg.interactionElements, strict=True).price == 2.5
    # both readers agree on every kind of message
    for name, topic, body in [
        ("p1", "bare/cfp/c7", {"type": "cfp", "conv": "c", "product": "p1", "capability": 7}),
        ("r2", "bare/prod/p1", {"type": "proposal", "conv": "c", "resource": "r2", "price": 1.0}),
        ("p1", "bare/res/r2", {"type": "accept", "conv": "c", "product": "p1"}),
        ("p1", "bare/res/r2", {"type": "reject", "conv": "c", "product": "p1"}),
        ("r2", "bare/prod/p1", {"type": "informConfirm", "conv": "c", "resource": "r2"}),
        ("r2", "bare/prod/p1", {"type": "inform", "conv": "c", "resource": "r2"}),
    ]:
        wire = bench_floor._frame(name, topic, body)
        read = bench_floor._unframe(wire)
        assert read == bench_floor._unframe_unchecked(wire)
        assert {k: v for k, v in read.items() if k != "id"} == body | (
            {"price": float(body["price"])} if "price" in body else {}
        )


def test_a_malformed_frame_is_refused_by_the_checked_reader_only() -> None:
    wire = orjson.loads(
        bench_floor._frame("r2", "bare/prod/p1", {"type": "inform", "conv": "c", "resource": "r2"})
    )
    wire["frame"]["messageId"] = ""  # the frame's schema wants 1 to 256 characters
    bad = orjson.dumps(wire)
    with pytest.raises(ValueError):
        bench_floor._unframe(bad)
    assert bench_floor._unframe_unchecked(bad)["type"] == "inform"  # what "unchecked" means


@needs_mosquitto
@pytest.mark.parametrize("processes", [1, 2])
def test_the_top_floor_negotiates_journals_and_records_every_message(tmp_path: Path, processes: int) -> None:
    with MosquittoProcess(tmp_path / "mq", persistence=False) as mosq:
        figures = bench_floor.run_floor(
            mosq.port, K, processes, ("frames", "journal", "recorder"), PRODUCTS, workdir=str(tmp_path)
        )
    assert figures["steps"] == PRODUCTS * STEPS and figures["messages_per_step"] == 2 * K + 3
    with sqlite3.connect(tmp_path / "floor.db") as db:
        outbox = db.execute("SELECT topic, body FROM outbox").fetchall()
        inbox = db.execute("SELECT COUNT(*) FROM inbox").fetchone()[0]
        conversations = db.execute("SELECT COUNT(DISTINCT conv) FROM conversation").fetchone()[0]
    assert len(outbox) == MESSAGES  # every message sent was written before it went out
    assert inbox == DELIVERIES  # and every delivery before it was acted on
    assert conversations == PRODUCTS * STEPS
    kinds = {parse_message(body).type for _, body in outbox}
    assert kinds == {
        MessageType.CALL_FOR_PROPOSAL, MessageType.PROPOSAL, MessageType.ACCEPT_PROPOSAL,
        MessageType.REJECT_PROPOSAL, MessageType.INFORM_CONFIRM, MessageType.INFORM,
    }  # fmt: skip
    lines = (tmp_path / "messages.jsonl").read_bytes().splitlines()
    assert len(lines) == MESSAGES
    logged = orjson.loads(lines[0])
    assert logged["topic"].startswith("bare/") and logged["received_ms"] > 0
    parse_message(orjson.dumps(logged["message"]))  # the log holds the frame as sent


def test_twinbid_is_the_last_rung_and_every_floor_rung_adds_to_the_one_before() -> None:
    labels = [label for label, _ in bench_floor.RUNGS]
    assert labels[0] == "bare" and labels[-1] == "twinbid"
    floors = [set(layers) for _, layers in bench_floor.RUNGS[1:-1]]
    assert floors[-1] == {"frames", "journal", "recorder"}
    assert floors[0] == {"frames", "unchecked"}  # the frames read without validation, beside the rest
    for before, after in itertools.pairwise(floors[1:]):
        assert before < after
