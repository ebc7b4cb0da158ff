"""The recorder: every message of a plant namespace, with its receive time, as JSON Lines.

It runs on paho-mqtt with its own network thread — a client stack independent of
the agents' gmqtt — so what it records is what the broker delivered, not what the
agents believe they sent.

How it loses nothing:

* **Cheap receive path.**  paho's network thread timestamps each message and appends it to a
  queue; after each read of the socket (up to 64 KiB of packets) it writes, flushes and
  acknowledges that batch itself, with one PUBACK packet for the batch — no thread hand-over
  per batch, which was most of the recorder's CPU while a run's messages trickle in. A writer
  thread takes over should that fail (and serves a paho without the internals it relies on).
* **Acknowledged after writing.**  QoS 1 messages are acknowledged (PUBACK) only once their
  line has been written and flushed to the file, so if the recorder dies in between, the
  broker delivers them again (at least once to the file; a redelivery carries
  ``"dup": true``).
* **Persistent session** (``clean=False``): the broker keeps the subscription and queues
  messages while the recorder is away (MQTT 5: for ``session_expiry`` seconds); paho
  reconnects and the recorder resubscribes on every CONNACK.
* **Stop drains.**  ``stop()`` waits until the stream has been quiet for ``settle`` seconds,
  then writes everything received before it disconnects.

The broker must not drop messages for a slow subscriber either: mosquitto drops QoS 1
messages beyond ``max_queued_messages`` (default 1000); the private mosquitto of
``protocol.mosquitto`` sets 100,000.

Each line is ``{"received_ms", "topic", "type", "message"}`` (plus ``"dup": true`` on a
redelivery): ``type`` is the frame type, None for progress events and unreadable payloads;
``message`` the parsed JSON, or the payload as text when it is not JSON.  The file does not
depend on the run database.  With ``db=`` the same records also go to a SQLite table
``tb_recorded`` (see ``RECORDED_TABLE``).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocol.topics import namespace_filter
from protocol.transport import BrokerAddress

log = logging.getLogger(__name__)

_RECV_SIZE = 1 << 16
_PUBACK = struct.Struct("!BBH")  # fixed header, remaining length 2, packet id (MQTT 3.1.1 and 5)
_PUBACK_TYPE = 0x40
_BUFFERED = all(hasattr(mqtt.Client, n) for n in ("_sock_recv", "_sock_close", "_packet_read"))

RECORDED_TABLE = """
CREATE TABLE IF NOT EXISTS tb_recorded (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_ms REAL NOT NULL,
    topic TEXT NOT NULL,
    type TEXT,
    message_id TEXT,
    conversation_id TEXT,
    dup INTEGER NOT NULL DEFAULT 0,
    payload TEXT NOT NULL
)
"""


class _Client(mqtt.Client):
    """paho's client with a read buffer: one ``recv`` per socket-full instead of ~5 per packet.

    paho reads a packet with a ``recv`` for the header byte, one per length byte and one for
    the rest, and processes one packet per ``select()``; under a burst those syscalls are
    most of the recorder's time.  Here ``recv`` fills a 64 KiB buffer that paho's reads are
    served from, and ``loop_read`` goes on while the buffer holds data (``select()`` cannot
    see it).  It relies on two paho 2.x internals, checked at import (``_BUFFERED``).  It also
    acknowledges a written batch with one packet of PUBACKs — from the network thread after a read
    (``after_read``, ``send_acks``) or from the writer thread (``ack_many``) — relying on two more,
    checked per client (``batch_acks``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = bytearray()
        self._acks: deque[int] = deque()
        #: called by the network thread after each read of the socket (the recorder writes there)
        self.after_read: Callable[[], None] | None = None
        # paho 2.x internals the batched acknowledgements rely on (else: one ``ack`` per message)
        self.batch_acks = isinstance(getattr(self, "_out_packet", None), deque) and hasattr(
            self, "_sockpairW"
        )

    def ack_many(self, mids: list[int]) -> None:
        """PUBACK a written batch (QoS 1), from the writer thread, at the cost of one wake-up.

        paho's ``ack`` wakes the network thread with a byte on its socket pair and has it send each
        PUBACK with a ``send`` of its own: per message a wake-up and two syscalls, most of the
        recorder's CPU once a run's messages trickle in rather than burst. Here the batch's mids
        are handed over with one wake-up, and the network thread queues them as one packet of
        PUBACKs (``_queue_acks``), written with one ``send``.
        """
        self._acks.extend(mids)
        wake = self._sockpairW
        if wake is not None:
            with contextlib.suppress(BlockingIOError, OSError):
                wake.send(b"0")

    def _queue_acks(self) -> None:
        if not self._acks:
            return
        data = bytearray()
        while True:
            try:
                mid = self._acks.popleft()
            except IndexError:
                break
            data += _PUBACK.pack(_PUBACK_TYPE, 2, mid)
        packet = bytes(data)
        self._out_packet.append(
            {
                "command": _PUBACK_TYPE,
                "mid": 0,
                "qos": 1,
                "pos": 0,
                "to_process": len(packet),
                "packet": packet,
                "info": None,
            }
        )

    def want_write(self) -> bool:
        self._queue_acks()  # the network thread asks this before every select()
        return super().want_write()

    def loop_write(self) -> mqtt.MQTTErrorCode:
        self._queue_acks()  # woken by ack_many: the acknowledgements go out in this write
        return super().loop_write()

    def _sock_recv(self, bufsize: int) -> bytes:
        if not self._rbuf:
            data = super()._sock_recv(_RECV_SIZE)
            if not data:
                return data
            self._rbuf += data
        out = bytes(self._rbuf[:bufsize])
        del self._rbuf[:bufsize]
        return out

    def _sock_close(self) -> None:
        self._rbuf.clear()
        super()._sock_close()

    def reconnect(self) -> mqtt.MQTTErrorCode:
        self._rbuf.clear()  # nothing of the old connection may be read as the new one's
        return super().reconnect()

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        rc = super().loop_read(max_packets)
        while rc == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS and self._rbuf and self._sock is not None:
            rc = super().loop_read(max_packets)
        hook = self.after_read
        if hook is not None:
            hook()
        return rc

    def send_acks(self, mids: list[int]) -> None:
        """PUBACK these now: the network thread's own call (``after_read``), no wake-up needed."""
        self._acks.extend(mids)
        if self._sock is not None:
            self.loop_write()  # queues them (one packet) and writes


class Recorder:
    """Record every message under ``i40/{ns}/#`` to ``out`` (JSON Lines).

    ``clean=True`` starts a fresh session that ends with the connection (what a run's own
    recorder wants); ``clean=False`` resumes the session of ``client_id`` and keeps it for
    ``session_expiry`` seconds after a disconnect (a standalone observer).
    """

    def __init__(
        self,
        broker: BrokerAddress,
        ns: str,
        out: Path,
        *,
        client_id: str = "observer",
        clean: bool = True,
        session_expiry: int = 3600,
        db: Path | None = None,
        topic_filter: str | None = None,
    ) -> None:
        self.broker = broker
        self.ns = ns
        self.out = Path(out)
        self.client_id = client_id
        self.clean = clean
        self.session_expiry = session_expiry
        self.db_path = Path(db) if db is not None else None
        self.topic_filter = topic_filter or namespace_filter(ns)
        self.count = 0  # messages received (by the network thread)
        self.written = 0  # lines written and flushed
        self.duplicates = 0  # redeliveries flagged by the broker (DUP)
        self.by_type: Counter[str] = Counter()
        self.connects = 0
        self._lock = threading.Lock()
        self._queue: deque[tuple[float, str, bytes, int, int, bool]] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._writer: threading.Thread | None = None
        self._file: Any = None
        self._sql: sqlite3.Connection | None = None
        self._client: mqtt.Client | None = None
        self._subscribed = threading.Event()
        self._last_receive = time.monotonic()
        self._drain_lock = threading.Lock()
        self._inline = False  # batches written by the network thread (see _drain_after_read)

    # ------------------------------------------------------------------ life cycle

    def start(self, timeout: float = 10.0) -> Recorder:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.out.open("a", encoding="utf-8", buffering=1 << 16)
        if self.db_path is not None:
            self._sql = sqlite3.connect(self.db_path, check_same_thread=False)
            self._sql.execute("PRAGMA journal_mode=WAL")
            self._sql.execute(RECORDED_TABLE)
            self._sql.commit()
        self._stopping = False
        self._writer = threading.Thread(target=self._write_loop, name="recorder-writer", daemon=True)
        self._writer.start()
        last: Exception | None = None
        hint = getattr(self.broker, "protocol", "auto")
        versions = {"5": (mqtt.MQTTv5,), "3.1.1": (mqtt.MQTTv311,)}.get(hint, (mqtt.MQTTv5, mqtt.MQTTv311))
        for version in versions:
            try:
                self._connect(version, timeout)
                return self
            except Exception as exc:
                last = exc
                self._stop_client()
        self._close_outputs()
        raise ConnectionError(f"recorder could not connect to {self.broker}: {last}")

    def _connect(self, version: int, timeout: float) -> None:
        kwargs: dict[str, Any] = {"client_id": self.client_id, "protocol": version, "manual_ack": True}
        if version != mqtt.MQTTv5:
            kwargs["clean_session"] = self.clean
        client = (_Client if _BUFFERED else mqtt.Client)(mqtt.CallbackAPIVersion.VERSION2, **kwargs)
        if self.broker.username:
            client.username_pw_set(self.broker.username, self.broker.password)
        ctx = self.broker.ssl_context() if hasattr(self.broker, "ssl_context") else None
        if ctx is not None:
            client.tls_set_context(ctx)
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._subscribed.clear()
        self._client = client  # before anything can arrive: the writer acknowledges through it
        self._inline = isinstance(client, _Client) and client.batch_acks
        if self._inline:
            client.after_read = self._drain_after_read  # type: ignore[attr-defined]
        if version == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0 if self.clean else int(self.session_expiry)
            props.ReceiveMaximum = 1000
            client.connect(self.broker.host, self.broker.port, clean_start=self.clean, properties=props)
        else:
            client.connect(self.broker.host, self.broker.port)
        client.loop_start()
        if not self._subscribed.wait(timeout):
            raise TimeoutError("no SUBACK")

    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any = None
    ) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("recorder connect refused: %s", reason)
            return
        self.connects += 1
        client.subscribe(self.topic_filter, qos=1)  # again after every reconnect

    def _on_subscribe(self, _client: mqtt.Client, _userdata: Any, _mid: int, codes: Any, *_: Any) -> None:
        refused = [c for c in codes if getattr(c, "is_failure", False) or c == 0x80]
        if refused:
            log.warning("recorder: subscription to %s refused: %s", self.topic_filter, refused)
            return
        self._subscribed.set()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # paho's network thread: as little as possible per message; the batch is written after
        # the read (``_drain_after_read``), or by the writer thread.
        self._queue.append((time.time(), msg.topic, msg.payload, msg.mid, msg.qos, bool(msg.dup)))
        self.count += 1
        self._last_receive = time.monotonic()
        if not self._inline and not self._wake.is_set():  # a wake-up per message cost a quarter
            self._wake.set()

    def _drain_after_read(self) -> None:
        """Write and acknowledge what one read of the socket brought, in the network thread.

        A run's messages trickle in a few at a time: handing each few to a writer thread cost two
        thread wake-ups and a socket-pair byte per batch, the recorder's largest cost. Written here,
        a batch still waits for nothing but the file (acknowledged only once flushed)."""
        try:
            self._drain(in_network_thread=True)
        except Exception:
            log.exception("recorder: writing a batch failed; the writer thread takes over")
            self._inline = False
            if self._client is not None:
                self._client.after_read = None  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ writing

    def _write_loop(self) -> None:
        while True:
            self._wake.wait(0.2)
            self._wake.clear()
            self._drain()
            if self._stopping and not self._queue:
                return

    def _drain(self, *, in_network_thread: bool = False) -> None:
        with self._drain_lock:  # one batch at a time, so lines are written in arrival order
            self._drain_locked(in_network_thread)

    def _drain_locked(self, in_network_thread: bool) -> None:
        batch = []
        while self._queue:
            try:
                batch.append(self._queue.popleft())
            except IndexError:  # pragma: no cover - single consumer
                break
        if not batch:
            return
        lines, rows = [], []
        for received, topic, payload, _mid, _qos, dup in batch:
            line, row = _encode(received, topic, payload, dup)
            lines.append(line)
            rows.append(row)
        with self._lock:
            if self._file is not None:
                self._file.write("".join(lines))
                self._file.flush()
            if self._sql is not None:
                self._sql.executemany(
                    "INSERT INTO tb_recorded (received_ms, topic, type, message_id, conversation_id, dup, "
                    "payload) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                self._sql.commit()
            for row in rows:
                self.by_type[row[2] or "event"] += 1
            self.duplicates += sum(1 for b in batch if b[5])
            self.written += len(batch)
        client = self._client
        if client is None:
            return
        if isinstance(client, _Client) and client.batch_acks:
            mids = [mid for _r, _t, _p, mid, qos, _d in batch if qos == 1]
            if in_network_thread:
                client.send_acks(mids)
            else:
                client.ack_many(mids)
            return
        for _received, _topic, _payload, mid, qos, _dup in batch:
            if qos > 0:
                with contextlib.suppress(Exception):
                    client.ack(mid, qos)

    # ------------------------------------------------------------------ stopping

    def _stop_client(self) -> None:
        if self._client is not None:
            try:
                self._client.disconnect()
                self._client.loop_stop()
            except Exception:
                pass
            self._client = None

    def wait_quiet(self, settle: float = 0.3, max_wait: float = 60.0) -> int:
        """Block until nothing arrived for ``settle`` seconds (at most ``max_wait``); return the count."""
        deadline = time.monotonic() + max_wait
        while time.monotonic() < deadline:
            quiet_for = time.monotonic() - self._last_receive
            if quiet_for >= settle and not self._queue:
                break
            time.sleep(max(0.02, min(settle - quiet_for, 0.1)))
        return self.count

    def stop(self, settle: float = 0.3, max_wait: float = 60.0) -> None:
        """Stop once the stream has been quiet for ``settle`` seconds, so in-flight messages land."""
        if self._client is not None:
            self.wait_quiet(settle, max_wait)
        self._wake.set()
        deadline = time.monotonic() + 10
        while self._queue and time.monotonic() < deadline:  # written (and acknowledged) before we go
            self._wake.set()
            time.sleep(0.01)
        self._stop_client()
        self._stopping = True
        self._wake.set()
        if self._writer is not None:
            self._writer.join(10)
            self._writer = None
        self._close_outputs()

    def _close_outputs(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            if self._sql is not None:
                self._sql.close()
                self._sql = None

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _encode(
    received: float, topic: str, payload: bytes, dup: bool
) -> tuple[str, tuple[float, str, str | None, str | None, str | None, int, str]]:
    """One line of the recording and one row of its table.

    The message goes into the line as the bytes that arrived when they are one line of JSON (parsed
    once, for its type and ids, never written again); otherwise as the re-encoded value, or as
    text when it is not JSON.
    """
    try:
        body: Any = orjson.loads(payload)
        message: Any = body if b"\n" in payload or b"\r" in payload else orjson.Fragment(payload)
    except orjson.JSONDecodeError:
        body = message = payload.decode(errors="replace")
    frame = body.get("frame") if isinstance(body, dict) else None
    kind = mid = conv = None
    if isinstance(frame, dict):
        kind, mid, conv = frame.get("type"), frame.get("messageId"), frame.get("conversationId")
        kind = kind if isinstance(kind, str) else None
    received_ms = round(received * 1000, 3)
    record: dict[str, Any] = {"received_ms": received_ms, "topic": topic, "type": kind, "message": message}
    if dup:
        record["dup"] = True
    text = payload.decode(errors="replace")
    row = (
        received_ms,
        topic,
        kind,
        mid if isinstance(mid, str) else None,
        conv if isinstance(conv, str) else None,
        int(dup),
        text,
    )
    return orjson.dumps(record).decode() + "\n", row
