"""MQTT transport on gmqtt (asyncio): QoS 1, persistent sessions, back-pressure, ordered delivery.

The transport moves bytes between topics; it knows nothing about frames.  What it guarantees
(see ``docs/transport.md``):

* **At least once.**  Every QoS 1 publish that returned is re-sent after a reconnect until the
  broker acknowledges it.  Incoming QoS 1 messages are acknowledged (PUBACK) only after the
  handler returned, so a crash inside the handler makes the broker deliver the message again.
  Duplicates happen; receivers de-duplicate by ``messageId``.
* **Order.**  The handler is awaited for one message at a time, in arrival order, so messages of
  one sender on one topic reach the handler in the order they were sent (after de-duplication).
* **Back-pressure.**  ``publish`` waits for a free in-flight slot, bounded by
  ``min(max_inflight, broker's receive maximum - 2)``; it never raises gmqtt's
  ``OverflowError`` and never drops a message.
* **Reconnect.**  Lost connections are re-established with exponential back-off (tenacity), the
  session is resumed (clean start only on the very first connect, when asked for), subscriptions
  are sent again, and unacknowledged publishes are replayed in their original order with DUP set.

What the transport takes over from gmqtt 0.8, and why (the internals used are checked at import):

* **Incoming PUBLISH and PUBACK.**  gmqtt sends PUBACK *before* calling ``on_message`` unless
  ``optimistic_acknowledgement=False``, and then only for coroutine callbacks, for which it creates
  one task per message: handlers run concurrently and order is lost.  gmqtt also ignores the
  reason code of a PUBACK (MQTT 5: 0x87 when an ACL denies a publish).  The transport hooks
  ``MqttPackageHandler._handle_packet``: PUBLISH (QoS 0/1) is queued for one consumer task,
  PUBACK frees the in-flight slot (refusals are logged and counted); every other packet
  (CONNACK, SUBACK, PINGRESP, DISCONNECT ...) is left to gmqtt.
* **Outgoing PUBLISH.**  gmqtt's ``publish`` raises ``OverflowError`` when more messages are in
  flight than the broker's receive maximum, replays unacknowledged ones from a task scheduled
  after CONNACK (new publishes can overtake them), *discards* them on a CONNACK without session
  (leaking their packet ids), and costs a ``send`` syscall per message.  The transport builds
  PUBLISH packets itself (packet ids still come from gmqtt's allocator, shared with SUBSCRIBE),
  keeps them until acknowledged, replays them synchronously on CONNACK before anything new, and
  writes all packets of one event-loop iteration with one ``send``.
* **Reconnects.**  gmqtt's own reconnect (fixed delay, no session handling) is switched off; the
  transport reconnects with tenacity's exponential back-off and re-subscribes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import gmqtt
from gmqtt.mqtt.constants import MQTTv50, MQTTv311
from gmqtt.mqtt.handler import MQTTConnectError, MqttPackageHandler
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    stop_never,
    wait_exponential,
    wait_random,
)

__all__ = [
    "BrokerAddress",
    "ConnectRefused",
    "MessageHandler",
    "MqttTransport",
    "SubscriptionRefused",
    "TransportClosed",
    "TransportError",
    "TransportStats",
]

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], Awaitable[None]]
ProtocolChoice = Literal["auto", "5", "3.1.1"]

# The gmqtt internals this module relies on (see the module docstring).  Fail at import, loudly,
# rather than lose messages silently with a gmqtt whose internals moved.
for _owner, _name in (
    (MqttPackageHandler, "_handle_packet"),
    (gmqtt.Client, "reconnect"),
):
    if not hasattr(_owner, _name):  # pragma: no cover - depends on the installed gmqtt
        raise ImportError(
            f"protocol.transport needs gmqtt 0.8 internals; {_owner.__name__}.{_name} is missing"
        )

_PUBACK_HEADER = b"\x40\x02"  # PUBACK, remaining length 2 (reason code 0 may be omitted in MQTT 5)
_DUP_FLAG = 0x08
_YIELD_EVERY = 64  # the consumer yields to the event loop (and flushes PUBACKs) this often
_PERMANENT_CONNACK_CODES = frozenset({2, 4, 5, 133, 134, 135, 138, 140})
_VERSION_REFUSED_CODES = frozenset({1, 132})
# Brokers found to refuse MQTT 5 in "auto" mode, so later transports in this process skip the probe.
_V311_ONLY: set[tuple[str, int]] = set()


class TransportError(Exception):
    """Base class of the transport's errors."""


class TransportClosed(TransportError):
    """The transport was closed; nothing more can be sent."""


class ConnectRefused(TransportError, ConnectionError):
    """The broker answered CONNECT with a refusal that retrying cannot fix (credentials, id)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"broker refused the connection: code {code} ({message})")
        self.code = code


class SubscriptionRefused(TransportError):
    """The broker refused one or more topic filters (SUBACK reason code >= 0x80, e.g. ACL)."""

    def __init__(self, refused: dict[str, int]) -> None:
        super().__init__("subscription refused: " + ", ".join(f"{t} (0x{c:02x})" for t, c in refused.items()))
        self.refused = refused


class _AttemptFailed(ConnectionError):
    """One connection attempt ended without a CONNACK (socket closed or timed out)."""


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is and how to authenticate.  ``protocol`` is a hint for ``auto`` transports."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls: bool = False
    protocol: ProtocolChoice = "auto"

    @property
    def uses_tls(self) -> bool:
        return self.tls or bool(self.tls_ca or self.tls_cert)

    @classmethod
    def from_url(cls, url: str) -> BrokerAddress:
        """Parse ``mqtt://user:pw@host:port`` or ``mqtts://...?ca=..&cert=..&key=..&protocol=3.1.1``.

        ``tcp://`` is accepted for ``mqtt://`` and ``ssl://`` for ``mqtts://``.  A missing port means
        1883 (plain) or 8883 (TLS).
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("mqtt", "tcp", "mqtts", "ssl"):
            raise ValueError(f"not an MQTT URL (mqtt:// or mqtts://): {url!r}")
        tls = scheme in ("mqtts", "ssl")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        protocol = query.get("protocol", "auto")
        if protocol not in ("auto", "5", "3.1.1"):
            raise ValueError(f"protocol must be auto, 5 or 3.1.1, not {protocol!r}")
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or (8883 if tls else 1883),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            tls_ca=query.get("ca"),
            tls_cert=query.get("cert"),
            tls_key=query.get("key"),
            tls=tls,
            protocol=protocol,  # type: ignore[arg-type]
        )

    def url(self, *, with_password: bool = True) -> str:
        """The URL that ``from_url`` reads back into an equal address."""
        scheme = "mqtts" if self.uses_tls else "mqtt"
        auth = ""
        if self.username is not None:
            auth = quote(self.username, safe="")
            if self.password is not None:
                auth += ":" + (quote(self.password, safe="") if with_password else "***")
            auth += "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = {
            k: v
            for k, v in (("ca", self.tls_ca), ("cert", self.tls_cert), ("key", self.tls_key))
            if v is not None
        }
        if self.protocol != "auto":
            query["protocol"] = self.protocol
        return f"{scheme}://{auth}{host}:{self.port}" + (f"?{urlencode(query, safe='/')}" if query else "")

    def __str__(self) -> str:
        return self.url(with_password=False)

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.uses_tls:
            return None
        ctx = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        return ctx


@dataclass
class TransportStats:
    """Counters, updated in place (read them, don't write them)."""

    published: int = 0  # publishes handed to the client
    acked: int = 0  # PUBACKs received for them
    refused: int = 0  # PUBACKs with a failure reason code (MQTT 5 only; e.g. ACL denial)
    resent: int = 0  # publishes replayed after a reconnect
    received: int = 0  # messages passed to the handler
    handler_errors: int = 0  # handler calls that raised
    reconnects: int = 0  # successful re-connections after a loss
    connect_failures: int = 0  # failed connection attempts
    last_connect_time: float = field(default=0.0, repr=False)


def _topic_error(topic: str, *, is_filter: bool) -> str | None:
    if not isinstance(topic, str) or not topic:
        return "topic must be a non-empty str"
    if "\x00" in topic:
        return "topic contains NUL"
    if len(topic.encode()) > 65535:
        return "topic longer than 65535 bytes"
    if not is_filter and ("+" in topic or "#" in topic):
        return "wildcards are not allowed in a topic name"
    if is_filter:
        levels = topic.split("/")
        for i, level in enumerate(levels):
            if "#" in level and (level != "#" or i != len(levels) - 1):
                return "'#' must be a whole last level"
            if "+" in level and level != "+":
                return "'+' must be a whole level"
    return None


class _CoalescingWriter:
    """Replaces ``write_data`` of one gmqtt connection so a burst costs few ``send`` syscalls.

    The first packet of an event-loop iteration is written at once (no added latency); packets
    that follow in the same iteration are gathered and written together by a callback at the
    start of the next one.  A syscall per message was the largest cost of a QoS 1 publish.
    Order is kept.
    """

    __slots__ = ("_buffer", "_connection", "_loop", "_pending", "_transport", "direct")

    def __init__(self, connection: Any) -> None:
        self._connection = connection
        self._transport = connection._transport
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._pending = False  # a flush callback is scheduled (we wrote in this iteration)
        self.direct = False

    def write(self, data: bytes | bytearray) -> None:
        if self._pending and not self.direct:
            self._buffer += data
            return
        if self.direct:
            self.flush()
        else:
            self._pending = True
            self._loop.call_soon(self.flush)
        self._write(data)

    def write_soon(self, data: bytes | bytearray) -> None:
        """Written with whatever else this turn of the loop writes, at the start of the next one
        (acknowledgements released by a commit join the messages that commit released)."""
        if self.direct:
            self.write(data)
            return
        self._buffer += data
        if not self._pending:
            self._pending = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._pending = False
        if self._buffer:
            data = bytes(self._buffer)
            self._buffer.clear()
            self._write(data)

    def _write(self, data: bytes | bytearray) -> None:
        if not self._transport.is_closing():
            self._connection._last_data_out = time.monotonic()  # gmqtt's keep-alive clock
            self._transport.write(data)


class _GmqttClient(gmqtt.Client):
    """gmqtt client whose own reconnect is switched off (the transport reconnects itself)."""

    async def reconnect(self, delay: bool = False) -> None:
        return


class MqttTransport:
    """One MQTT connection: QoS 1 publish with back-pressure, ordered handler calls, reconnects.

    ``on_message(topic, payload)`` is awaited for one message at a time in arrival order; the
    PUBACK of an incoming QoS 1 message goes out after it returned (or raised: exceptions are
    logged and counted, and the message is acknowledged anyway, as redelivery would not help).
    """

    def __init__(
        self,
        client_id: str,
        broker: BrokerAddress,
        on_message: MessageHandler,
        *,
        protocol: ProtocolChoice = "auto",
        clean_start: bool = False,
        session_expiry: int = 3600,
        max_inflight: int = 16,
        keepalive: int = 30,
        connect_retries: int = 20,
        connect_timeout: float = 10.0,
        v5_probe_timeout: float = 1.5,
        max_backoff: float = 5.0,
        receive_maximum: int | None = None,
        ack_after: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        """``ack_after``: where the PUBACKs of handled messages wait before they go out. None: they
        are written once the inbox is empty. A callable (``Journal.after_commit``) is handed a
        callback that writes them, to be run once what the handlers staged is durable: a message
        is then acknowledged only after the commit of what it caused, and its PUBACK goes to the
        socket in one write with the messages it caused (written in the same turn of the loop)."""
        if not client_id:
            raise ValueError("client_id is required (persistent sessions are keyed by it)")
        if protocol not in ("auto", "5", "3.1.1"):
            raise ValueError(f"protocol must be 'auto', '5' or '3.1.1', not {protocol!r}")
        if max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        self.client_id = client_id
        self.broker = broker
        self._on_message = on_message
        self._ack_after = ack_after
        self._protocol: ProtocolChoice = protocol
        self._clean_start = clean_start
        self._max_inflight = max_inflight
        self._keepalive = keepalive
        self._connect_retries = max(1, connect_retries)
        self._connect_timeout = connect_timeout
        self._v5_probe_timeout = v5_probe_timeout
        self._max_backoff = max_backoff
        self.stats = TransportStats()

        connect_properties: dict[str, Any] = {"session_expiry_interval": int(session_expiry)}
        if receive_maximum is not None:
            connect_properties["receive_maximum"] = int(receive_maximum)
        # Unacknowledged outgoing QoS 1 PUBLISH packets by packet id, in publishing order.  The
        # transport builds and stores them itself; gmqtt's own store stays empty.
        self._outbox: OrderedDict[int, bytearray] = OrderedDict()
        self._topic_headers: dict[str, bytes] = {}
        self._topic_names: dict[bytes, str] = {}
        self._v5 = False
        self._properties = b""  # empty PUBLISH property block ("\x00") under MQTT 5
        client = _GmqttClient(client_id, clean_session=clean_start, **connect_properties)
        if broker.username is not None:
            client.set_auth_credentials(broker.username, broker.password)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_suback
        client.on_unsubscribe = self._on_unsuback
        client.on_message = self._on_plain_message  # QoS 2 only (never subscribed to)
        handler = client._package_handler
        # gmqtt's MqttPackageHandler.__call__ dispatches every incoming packet through
        # _handle_packet; PUBLISH (QoS 0/1) and PUBACK take the transport's lean path, the rest
        # (CONNACK, SUBACK, PINGRESP, DISCONNECT, ...) gmqtt's own.
        self._gmqtt_handle_packet = handler._handle_packet
        handler._handle_packet = self._on_packet
        self._client = client
        self._id_generator = handler.id_generator

        self._version: int | None = None  # negotiated MQTT version, kept for reconnects
        self._gen = 0  # connection generation; packet ids of older generations are void
        self._connected = False
        self._connected_event = asyncio.Event()
        self._ever_connected = False
        self._closing = False
        self._closed = False
        self._lost = asyncio.Event()  # set when an established connection is lost
        self._attempt_lost: asyncio.Future[None] | None = None

        # outgoing flow control
        self._window = max_inflight
        self._id_capacity = 65534
        self._max_packet: int | None = None
        self._inflight = 0  # slots granted: published-and-unacked + granted-not-yet-published
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._blocked = 0  # publishers waiting (for a slot, a grant to run, or a packet id)
        self._ack_waiters: list[asyncio.Future[None]] = []  # woken on the next PUBACK
        self._flush_waiters: list[asyncio.Future[None]] = []

        # subscriptions
        self._subs: dict[str, int] = {}
        self._control: dict[int, tuple[asyncio.Future[Any], tuple[str, ...]]] = {}
        self._control_lock = asyncio.Lock()

        # incoming
        self._inbox: deque[tuple[str, bytes, int | None, int]] = deque()
        self._inbox_waiter: asyncio.Future[None] | None = None
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._consumer: asyncio.Task[None] | None = None
        self._writer: _CoalescingWriter | None = None
        self._supervisor: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ properties

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def inflight(self) -> int:
        """Outgoing QoS 1 messages not yet acknowledged."""
        return len(self._outbox)

    @property
    def window(self) -> int:
        """Current bound on outgoing QoS 1 messages in flight."""
        return self._window

    @property
    def mqtt_version(self) -> str | None:
        """``"5"`` or ``"3.1.1"`` once connected."""
        return None if self._version is None else ("5" if self._version == MQTTv50 else "3.1.1")

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("connected" if self._connected else "disconnected")
        return f"<MqttTransport {self.client_id} {self.broker} {state}>"

    async def __aenter__(self) -> MqttTransport:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ connection

    async def connect(self) -> None:
        """Connect, retrying with exponential back-off; then keep the connection up until ``close``.

        Raises ``ConnectRefused`` at once for refusals that retrying cannot fix (bad credentials,
        not authorised, client id rejected), and the last error after ``connect_retries`` attempts.
        """
        if self._closed or self._closing:
            raise TransportClosed("transport is closed")
        if self._ever_connected:
            return
        if self._consumer is None:
            self._consumer = asyncio.get_running_loop().create_task(
                self._consume(), name=f"mqtt-consume-{self.client_id}"
            )
            self._consumer.add_done_callback(self._task_ended)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._connect_retries),
            wait=wait_exponential(multiplier=0.05, max=2.0) + wait_random(0, 0.05),
            retry=retry_if_exception(self._retryable),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._establish()
        except BaseException:
            self._consumer.cancel()
            self._consumer = None
            raise
        self._supervisor = asyncio.get_running_loop().create_task(
            self._supervise(), name=f"mqtt-supervise-{self.client_id}"
        )
        self._supervisor.add_done_callback(self._task_ended)

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: %s died", self.client_id, task.get_name(), exc_info=task.exception())

    async def wait_connected(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            while not self._connected:
                if self._closed:
                    raise TransportClosed("transport is closed")
                await self._connected_event.wait()

    @staticmethod
    def _retryable(exc: BaseException) -> bool:
        # tenacity hands over BaseExceptions too: never "retry" a cancellation.
        return isinstance(exc, Exception) and not isinstance(
            exc, (ConnectRefused, TransportClosed, ssl.SSLCertVerificationError)
        )

    def _log_retry(self, state: Any) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "%s: connecting to %s failed (%s); attempt %d, retrying in %.2fs",
            self.client_id,
            self.broker,
            exc,
            state.attempt_number,
            state.next_action.sleep if state.next_action else 0.0,
        )

    async def _supervise(self) -> None:
        """Re-establish lost connections with back-off until ``close``."""
        while not self._closing:
            await self._lost.wait()
            if self._closing:
                return
            log.warning("%s: connection to %s lost; reconnecting", self.client_id, self.broker)
            retrying = AsyncRetrying(
                stop=stop_never,
                wait=wait_exponential(multiplier=0.05, max=self._max_backoff) + wait_random(0, 0.05),
                retry=retry_if_exception(
                    lambda e: isinstance(e, Exception) and not isinstance(e, TransportClosed)
                ),
                before_sleep=self._log_retry,
                reraise=True,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        if self._closing:
                            raise TransportClosed("closing")
                        await self._establish()
            except TransportClosed:
                return

    async def _establish(self) -> None:
        """One connection attempt (two in ``auto`` mode when the broker refuses MQTT 5)."""
        if self._version is not None:
            await self._attempt(self._version, self._connect_timeout)
            return
        choice = self._protocol
        if choice == "auto":
            choice = self.broker.protocol
        if choice == "auto" and (self.broker.host, self.broker.port) in _V311_ONLY:
            choice = "3.1.1"
        if choice == "5":
            await self._attempt(MQTTv50, self._connect_timeout)
        elif choice == "3.1.1":
            await self._attempt(MQTTv311, self._connect_timeout)
        else:
            try:
                await self._attempt(MQTTv50, self._v5_probe_timeout)
            except (_AttemptFailed, TimeoutError, ConnectRefused) as exc:
                if isinstance(exc, ConnectRefused) and exc.code not in _VERSION_REFUSED_CODES:
                    raise
                log.info(
                    "%s: %s did not accept MQTT 5 (%s); trying MQTT 3.1.1", self.client_id, self.broker, exc
                )
                await self._attempt(MQTTv311, self._connect_timeout)
                _V311_ONLY.add((self.broker.host, self.broker.port))
        self._version = self._client._connection_state.protocol_version

    async def _attempt(self, version: int, limit: float) -> None:
        client = self._client
        # MQTT 5: clean start only on the first connection of this transport, so a reconnect resumes
        # the session.  MQTT 3.1.1 ties "clean" to the session's lifetime, so keep it throughout.
        client._clean_session = self._clean_start and (not self._ever_connected or version == MQTTv311)
        loop = asyncio.get_running_loop()
        self._attempt_lost = lost = loop.create_future()
        task = loop.create_task(
            client.connect(
                self.broker.host,
                self.broker.port,
                ssl=self.broker.ssl_context() or False,
                keepalive=self._keepalive,
                version=version,
                raise_exc=True,
            )
        )
        try:
            done, _ = await asyncio.wait({task, lost}, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                task.result()  # raises OSError, MQTTConnectError, ...
                if not self._connected:  # pragma: no cover - CONNACK seen but lost straight away
                    raise _AttemptFailed("connection lost right after CONNACK")
                return
            if lost in done:
                raise _AttemptFailed("broker closed the connection before CONNACK")
            raise TimeoutError(f"no CONNACK within {limit:.1f}s")
        except MQTTConnectError as exc:
            self.stats.connect_failures += 1
            code = getattr(exc, "_code", -1)
            await self._abort_connection(task)
            if code in _PERMANENT_CONNACK_CODES or code in _VERSION_REFUSED_CODES:
                raise ConnectRefused(code, getattr(exc, "message", str(exc))) from None
            raise ConnectionError(str(exc)) from None
        except BaseException:
            self.stats.connect_failures += 1
            await self._abort_connection(task)
            raise
        finally:
            self._attempt_lost = None

    async def _abort_connection(self, task: asyncio.Task[Any]) -> None:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        conn = getattr(self._client, "_connection", None)
        if conn is not None and not conn.is_closing():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2.0)
        self._mark_lost()

    # ------------------------------------------------------------------ gmqtt callbacks

    def _on_connect(self, client: gmqtt.Client, flags: int, rc: int, properties: dict[str, Any]) -> None:
        self._gen += 1
        connack = client._package_handler._connack_properties
        receive_maximum = _first(connack.get("receive_maximum")) or 65535
        # gmqtt hands out at most receive_maximum - 1 packet ids (publish, subscribe and
        # unsubscribe share them); keep one for SUBSCRIBE/UNSUBSCRIBE.
        self._id_capacity = max(2, receive_maximum - 1)
        self._window = max(1, min(self._max_inflight, self._id_capacity - 1))
        self._max_packet = _first(connack.get("maximum_packet_size"))
        self._v5 = client._connection_state.protocol_version >= MQTTv50
        self._properties = b"\x00" if self._v5 else b""
        # Packet ids still "used" by SUBSCRIBEs of the dead connection would leak for ever.
        self._id_generator._used_ids = set(self._outbox)
        conn = client._connection
        self._writer = writer = _CoalescingWriter(conn)
        conn._protocol.write_data = writer.write
        # Replay unacknowledged publishes first, in order, before anything new can be sent; also
        # when the broker has no session for us (it lost it), or they would be lost.
        for packet in self._outbox.values():
            packet[0] |= _DUP_FLAG
            writer.write(packet)
            self.stats.resent += 1
        if self._subs:
            try:
                self._send_subscribe(dict(self._subs), None)
            except OverflowError:  # pragma: no cover - ids were just reset; cannot happen
                log.error("%s: no packet id left to re-subscribe", self.client_id)
        was_connected = self._ever_connected
        self._ever_connected = True
        self._connected = True
        self.stats.last_connect_time = time.time()
        if was_connected:
            self.stats.reconnects += 1
            log.info(
                "%s: reconnected to %s (session present: %s, replayed %d)",
                self.client_id,
                self.broker,
                bool(flags),
                len(self._outbox),
            )
        self._lost.clear()
        self._connected_event.set()
        self._grant()

    def _on_disconnect(self, client: gmqtt.Client, packet: Any = None, exc: Any = None) -> None:
        self._mark_lost()

    def _mark_lost(self) -> None:
        if self._attempt_lost is not None and not self._attempt_lost.done():
            self._attempt_lost.set_result(None)
        if not self._connected:
            return
        self._connected = False
        self._connected_event.clear()
        self._gen += 1
        for fut, _ in self._control.values():
            if not fut.done():
                fut.set_exception(ConnectionError("connection lost"))
        self._control.clear()
        if not self._closing:
            self._lost.set()

    def _on_packet(self, cmd: int, packet: bytes) -> None:
        kind = cmd & 0xF0
        if kind == 0x30 and not cmd & 0x04:
            self._on_publish(cmd, packet)
        elif kind == 0x40:
            self._on_puback(packet)
        else:
            self._gmqtt_handle_packet(cmd, packet)

    def _on_publish(self, cmd: int, packet: bytes) -> None:
        """An incoming PUBLISH (QoS 0 or 1): queue it for the consumer, PUBACK comes later."""
        end = 2 + ((packet[0] << 8) | packet[1])
        raw_topic = packet[2:end]
        if cmd & 0x02:
            mid: int | None = (packet[end] << 8) | packet[end + 1]
            end += 2
        else:
            mid = None
        if self._v5:  # skip the property block (no topic aliases: the transport allows none)
            length = shift = 0
            while True:
                byte = packet[end]
                end += 1
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    break
                shift += 7
            end += length
        topic = self._topic_names.get(raw_topic)
        if topic is None:
            try:
                topic = raw_topic.decode()
            except UnicodeDecodeError:
                topic = ""
            if not topic:
                log.warning(
                    "%s: dropped a PUBLISH with an invalid or empty topic %r", self.client_id, raw_topic
                )
                return
            if len(self._topic_names) >= 4096:
                self._topic_names.clear()
            self._topic_names[raw_topic] = topic
        self._inbox.append((topic, packet[end:], mid, self._gen))
        waiter = self._inbox_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_puback(self, packet: bytes) -> None:
        mid = (packet[0] << 8) | packet[1]
        self._id_generator.free_id(mid)
        stored = self._outbox.pop(mid, None)
        if stored is None:
            return  # duplicate PUBACK
        self.stats.acked += 1
        if len(packet) > 2 and packet[2] >= 0x80:
            self.stats.refused += 1
            log.warning(
                "%s: broker refused publish on %r with reason 0x%02x",
                self.client_id,
                _topic_of(stored),
                packet[2],
            )
        self._inflight -= 1
        if self._ack_waiters:  # first: they hold slots already and were in line earlier
            waiters, self._ack_waiters = self._ack_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        if self._slot_waiters:
            self._grant()
        if self._flush_waiters and not self._outbox:
            waiters, self._flush_waiters = self._flush_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def _on_plain_message(
        self, client: gmqtt.Client, topic: str, payload: bytes, qos: int, properties: dict[str, Any]
    ) -> None:
        self._inbox.append((topic, payload, None, self._gen))
        waiter = self._inbox_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_suback(self, client: gmqtt.Client, mid: int, codes: tuple[int, ...], properties: Any) -> None:
        entry = self._control.pop(mid, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(codes)

    def _on_unsuback(self, client: gmqtt.Client, mid: int, codes: Any) -> None:
        entry = self._control.pop(mid, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(codes)

    # ------------------------------------------------------------------ incoming

    async def _consume(self) -> None:
        """Await the handler for one message at a time, in arrival order; PUBACK afterwards."""
        loop = asyncio.get_running_loop()
        inbox = self._inbox
        acks = bytearray()
        acks_gen = -1
        since_yield = 0
        while not self._closed:
            if not inbox or since_yield >= _YIELD_EVERY:
                if acks:
                    self._send_acks(acks, acks_gen)
                    acks = bytearray()
                if since_yield >= _YIELD_EVERY and inbox:
                    since_yield = 0
                    await asyncio.sleep(0)
                    continue
                since_yield = 0
                if self._idle_waiters:
                    waiters, self._idle_waiters = self._idle_waiters, []
                    for fut in waiters:
                        if not fut.done():
                            fut.set_result(None)
                self._inbox_waiter = loop.create_future()
                try:
                    await self._inbox_waiter
                finally:
                    self._inbox_waiter = None
                continue
            topic, payload, mid, gen = inbox.popleft()
            since_yield += 1
            try:
                await self._on_message(topic, payload)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise  # we are being stopped
                # a CancelledError escaping from something the handler awaited is its failure
                self.stats.handler_errors += 1
                log.error("%s: message handler on %r was cancelled", self.client_id, topic)
            except Exception:
                self.stats.handler_errors += 1
                log.exception("%s: message handler failed on %r", self.client_id, topic)
            self.stats.received += 1
            if mid is not None and gen == self._gen and self._connected:
                if gen != acks_gen:
                    acks = bytearray()
                    acks_gen = gen
                acks += _PUBACK_HEADER
                acks.append(mid >> 8)
                acks.append(mid & 0xFF)

    def _send_acks(self, acks: bytearray, gen: int) -> None:
        if self._ack_after is None:
            self._write_acks(acks, gen)
        else:
            self._ack_after(lambda: self._write_acks(acks, gen, deferred=True))

    def _write_acks(self, acks: bytearray, gen: int, *, deferred: bool = False) -> None:
        # PUBACKs are only valid on the connection whose packet ids they carry; after a
        # reconnect the broker re-sends those messages (DUP) and they are acknowledged then.
        if gen == self._gen and self._connected and self._writer is not None:
            if deferred:
                self._writer.write_soon(acks)
            else:
                self._writer.write(acks)

    async def _wait_idle(self, limit: float) -> None:
        if self._consumer is None or asyncio.current_task() is self._consumer:
            return
        if not self._inbox and self._inbox_waiter is not None:
            return
        fut = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(fut)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fut, limit)

    # ------------------------------------------------------------------ outgoing

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Hand a message to the client; waits for a free in-flight slot (and for a connection).

        Returns once the message is written (QoS 1: kept until acknowledged and re-sent after a
        reconnect).  ``await flush()`` waits for the acknowledgements.
        """
        if self._closing:
            raise TransportClosed("transport is closed")
        header = self._topic_headers.get(topic) or self._topic_header(topic)
        if type(payload) is not bytes:
            if not isinstance(payload, (bytearray, memoryview)):
                raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
            payload = bytes(payload)
        if self._max_packet is not None and len(payload) + len(header) + 12 > self._max_packet:
            raise ValueError(f"message larger than the broker's maximum packet size {self._max_packet}")
        if qos != 1:
            if qos != 0:
                raise ValueError("qos must be 0 or 1")
            await self.wait_connected()
            self._writer.write(_publish_packet(0x30, header, 0, self._properties, payload))  # type: ignore[union-attr]
            self.stats.published += 1
            return
        if self._connected and self._inflight < self._window and not self._blocked:
            self._inflight += 1
            try:
                mid = self._id_generator.next_id()
            except OverflowError:
                self._blocked += 1
                try:
                    mid = await self._wait_for_packet_id()
                finally:
                    self._blocked -= 1
        else:
            # Publishers that have to wait are served strictly in the order they called.
            self._blocked += 1
            try:
                await self._acquire_slot()
                try:
                    mid = self._id_generator.next_id()
                except OverflowError:
                    mid = await self._wait_for_packet_id()
            finally:
                self._blocked -= 1
        packet = _publish_packet(0x32, header, mid, self._properties, payload)
        self._outbox[mid] = packet
        # If the connection dropped since the slot was granted, the write goes nowhere and the
        # packet is replayed from the outbox after the reconnect.
        self._writer.write(packet)  # type: ignore[union-attr]
        self.stats.published += 1

    async def _wait_for_packet_id(self) -> int:
        """Rare: a SUBSCRIBE holds the last packet id.  Keep our slot (and so our place in line)
        and wait for an acknowledgement to free one."""
        try:
            while True:
                if self._closing:
                    raise TransportClosed("transport is closed")
                await self._next_ack()
                with contextlib.suppress(OverflowError):
                    return self._id_generator.next_id()
        except BaseException:
            self._inflight -= 1
            self._grant()
            raise

    def _topic_header(self, topic: str) -> bytes:
        """Validated, length-prefixed topic name (cached: agents publish to few topics)."""
        error = _topic_error(topic, is_filter=False)
        if error:
            raise ValueError(f"{error}: {topic!r}")
        raw = topic.encode()
        header = len(raw).to_bytes(2, "big") + raw
        if len(self._topic_headers) >= 4096:
            self._topic_headers.clear()
        self._topic_headers[topic] = header
        return header

    async def _acquire_slot(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._inflight -= 1  # granted, but our caller went away
                self._grant()
            else:
                with contextlib.suppress(ValueError):
                    self._slot_waiters.remove(fut)
            raise

    def _grant(self) -> None:
        waiters = self._slot_waiters
        while waiters and self._connected and self._inflight < self._window:
            fut = waiters.popleft()
            if fut.done():
                continue
            self._inflight += 1
            fut.set_result(None)

    async def _next_ack(self) -> None:
        """Wait for the next PUBACK (at most a second: a reconnect frees packet ids too)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._ack_waiters.append(fut)
        # Await the future itself (not wait_for, which adds scheduling hops): waiters must wake
        # in the order the PUBACK handler resolves them, ahead of freshly granted publishers.
        timer = loop.call_later(1.0, _resolve, fut)
        try:
            await fut
        finally:
            timer.cancel()
            if fut in self._ack_waiters:
                self._ack_waiters.remove(fut)

    async def flush(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - public API
        """Wait until every QoS 1 publish made so far is acknowledged (``TimeoutError`` if not)."""
        if not self._outbox:
            return
        fut = asyncio.get_running_loop().create_future()
        self._flush_waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            if fut in self._flush_waiters:
                self._flush_waiters.remove(fut)

    # ------------------------------------------------------------------ subscriptions

    async def subscribe(self, *topic_filters: str, qos: int = 1) -> None:
        """Subscribe (and remember: re-subscribed after every reconnect).  Waits for the SUBACK.

        Raises ``SubscriptionRefused`` for filters the broker refused (they are forgotten).
        """
        if not topic_filters:
            return
        for f in topic_filters:
            error = _topic_error(f, is_filter=True)
            if error:
                raise ValueError(f"{error}: {f!r}")
        if qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        for f in topic_filters:
            self._subs[f] = qos
        codes = await self._control_request({f: qos for f in topic_filters})
        refused = {f: c for f, c in zip(topic_filters, codes, strict=False) if c >= 0x80}
        if refused:
            for f in refused:
                self._subs.pop(f, None)
            raise SubscriptionRefused(refused)

    async def unsubscribe(self, *topic_filters: str) -> None:
        """Forget the filters and unsubscribe (waits for the UNSUBACK)."""
        if not topic_filters:
            return
        for f in topic_filters:
            self._subs.pop(f, None)
        await self._control_request(None, topic_filters)

    def _send_subscribe(self, filters: dict[str, int], fut: asyncio.Future[Any] | None) -> int:
        subs = [gmqtt.Subscription(f, qos=q) for f, q in filters.items()]
        mid = self._client._connection.subscribe(subs)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            fut.add_done_callback(functools.partial(self._check_resubscribe, tuple(filters)))
        self._control[mid] = (fut, tuple(filters))
        return mid

    def _check_resubscribe(self, filters: tuple[str, ...], fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return  # the next reconnect subscribes again
        for topic, code in zip(filters, fut.result(), strict=False):
            if code >= 0x80:
                log.error("%s: broker refused re-subscription to %r (0x%02x)", self.client_id, topic, code)

    async def _control_request(
        self, subscribe: dict[str, int] | None, unsubscribe: tuple[str, ...] = ()
    ) -> tuple[int, ...]:
        async with self._control_lock:
            while True:
                if self._closing:
                    raise TransportClosed("transport is closed")
                await self.wait_connected()
                fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                try:
                    if subscribe is not None:
                        self._send_subscribe(subscribe, fut)
                    else:
                        mid = self._client._connection.unsubscribe(list(unsubscribe))
                        self._control[mid] = (fut, unsubscribe)
                except OverflowError:
                    await self._next_ack()
                    continue
                try:
                    return tuple(await fut or ())
                except ConnectionError:
                    continue  # connection lost before the ack: send again once reconnected

    # ------------------------------------------------------------------ shutdown

    async def close(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - public API
        """Flush what is in flight (up to ``timeout``), let the handler finish, disconnect cleanly.

        The session stays on the broker (for ``session_expiry`` seconds), so messages that arrive
        meanwhile are delivered at the next connect with the same client id.
        """
        if self._closed:
            return
        if not self._closing:
            try:
                await self.flush(timeout)
            except TimeoutError:
                log.warning(
                    "%s: closing with %d unacknowledged publish(es)",
                    self.client_id,
                    len(self._outbox),
                )
            await self._wait_idle(min(timeout, 5.0))
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(BaseException):
                await self._supervisor
        if self._connected:
            self._connected = False
            self._gen += 1
            if self._writer is not None:
                self._writer.direct = True  # the DISCONNECT must go out before the socket closes
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.disconnect(), 5.0)
        else:
            conn = getattr(self._client, "_connection", None)
            if conn is not None and not conn.is_closing():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 2.0)
        self._closed = True
        self._connected_event.set()  # wake wait_connected() callers so they see the closure
        for fut in [*self._slot_waiters, *self._flush_waiters, *self._ack_waiters]:
            if not fut.done():
                fut.set_exception(TransportClosed("transport closed"))
        for fut, _ in self._control.values():
            if not fut.done():
                fut.set_exception(TransportClosed("transport closed"))
        self._slot_waiters.clear()
        self._flush_waiters.clear()
        self._ack_waiters.clear()
        self._control.clear()
        if self._consumer is not None and asyncio.current_task() is not self._consumer:
            self._consumer.cancel()
            with contextlib.suppress(BaseException):
                await self._consumer


def _publish_packet(
    first_byte: int, topic_header: bytes, mid: int, properties: bytes, payload: bytes
) -> bytearray:
    """A PUBLISH packet (QoS 0 when ``mid`` is 0)."""
    remaining = len(topic_header) + (2 if mid else 0) + len(properties) + len(payload)
    if remaining > 268_435_455:
        raise ValueError("message too large for MQTT")
    packet = bytearray((first_byte,))
    while True:
        byte = remaining & 0x7F
        remaining >>= 7
        if remaining:
            packet.append(byte | 0x80)
        else:
            packet.append(byte)
            break
    packet += topic_header
    if mid:
        packet.append(mid >> 8)
        packet.append(mid & 0xFF)
    packet += properties
    packet += payload
    return packet


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _first(value: Any) -> Any:
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _topic_of(packet: bytes | bytearray) -> str:
    """Topic of a raw PUBLISH packet (for log messages)."""
    i = 1
    while packet[i] & 0x80:
        i += 1
    i += 1
    length = (packet[i] << 8) | packet[i + 1]
    return bytes(packet[i + 2 : i + 2 + length]).decode(errors="replace")
