"""The recorder: every message of a plant namespace, with its receive time, as JSON Lines.

It runs on paho-mqtt with its own network thread — a client stack independent of
the agents' gmqtt — so what it records is what the broker delivered, not what the
agents believe they sent. A persistent session keeps the broker queueing for it
across a reconnect.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from protocol.topics import namespace_filter
from protocol.transport import BrokerAddress

log = logging.getLogger(__name__)


class Recorder:
    def __init__(
        self, broker: BrokerAddress, ns: str, out: Path, *, client_id: str = "observer", clean: bool = True
    ) -> None:
        self.broker = broker
        self.ns = ns
        self.out = Path(out)
        self.client_id = client_id
        self.clean = clean
        self.count = 0
        self.by_type: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._file: Any = None
        self._client: mqtt.Client | None = None
        self._subscribed = threading.Event()

    def start(self, timeout: float = 10.0) -> Recorder:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.out.open("a", buffering=1 << 16)
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
        raise ConnectionError(f"recorder could not connect to {self.broker}: {last}")

    def _connect(self, version: int, timeout: float) -> None:
        kwargs: dict[str, Any] = {"client_id": self.client_id, "protocol": version}
        if version != mqtt.MQTTv5:
            kwargs["clean_session"] = self.clean
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kwargs)
        if self.broker.username:
            client.username_pw_set(self.broker.username, self.broker.password)
        ctx = self.broker.ssl_context() if hasattr(self.broker, "ssl_context") else None
        if ctx is not None:
            client.tls_set_context(ctx)
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_subscribe = lambda *a, **k: self._subscribed.set()
        self._subscribed.clear()
        if version == mqtt.MQTTv5:
            client.connect(self.broker.host, self.broker.port, clean_start=self.clean)
        else:
            client.connect(self.broker.host, self.broker.port)
        client.loop_start()
        self._client = client
        if not self._subscribed.wait(timeout):
            raise TimeoutError("no SUBACK")

    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any = None
    ) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("recorder connect refused: %s", reason)
            return
        client.subscribe(namespace_filter(self.ns), qos=1)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        try:
            body = json.loads(msg.payload)
        except ValueError:
            body = msg.payload.decode(errors="replace")
        kind = (
            body.get("frame", {}).get("type")
            if isinstance(body, dict) and isinstance(body.get("frame"), dict)
            else None
        )
        line = json.dumps(
            {"received_ms": round(now * 1000, 3), "topic": msg.topic, "type": kind, "message": body}
        )
        with self._lock:
            self.count += 1
            self.by_type[kind or "event"] += 1
            if self._file is not None:
                self._file.write(line + "\n")

    def _stop_client(self) -> None:
        if self._client is not None:
            try:
                self._client.disconnect()
                self._client.loop_stop()
            except Exception:
                pass
            self._client = None

    def stop(self, settle: float = 0.3) -> None:
        """Stop after the stream has been quiet for `settle` seconds (so in-flight messages land)."""
        last, deadline = -1, time.monotonic() + 10
        while time.monotonic() < deadline:
            with self._lock:
                current = self.count
            if current == last:
                break
            last = current
            time.sleep(settle)
        self._stop_client()
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
