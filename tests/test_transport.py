"""MqttTransport against real brokers: mosquitto (MQTT 5) and the embedded amqtt (MQTT 3.1.1)."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import gmqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import transport as transport_module
from protocol.broker import EmbeddedBroker
from protocol.mosquitto import MosquittoProcess, find_mosquitto, free_port, write_password_file
from protocol.transport import (
    BrokerAddress,
    ConnectRefused,
    MqttTransport,
    TransportClosed,
)

pytestmark = pytest.mark.timeout(60)
needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto binary not installed")


def message(sender: str, seq: int) -> bytes:
    """A payload carrying its sender, its per-sender sequence number and a message id."""
    return f"{sender}|{seq}|{sender}-{seq}".encode()


class Receiver:
    """De-duplicates by message id and checks per-sender order of first deliveries."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.seen: set[str] = set()
        self.order: dict[str, list[int]] = defaultdict(list)
        self.deliveries = 0
        self.done = asyncio.Event()

    async def __call__(self, topic: str, payload: bytes) -> None:
        self.deliveries += 1
        sender, seq, msg_id = payload.decode().split("|")
        if msg_id in self.seen:
            return
        self.seen.add(msg_id)
        self.order[sender].append(int(seq))
        if len(self.seen) >= self.expected:
            self.done.set()

    def assert_complete(self, per_sender: dict[str, int]) -> None:
        for sender, count in per_sender.items():
            assert self.order[sender] == list(range(count)), f"{sender}: lost or out of order"
        assert len(self.seen) == sum(per_sender.values())


async def _burst(
    broker_address: BrokerAddress, make_transport, n: int, tag: str
) -> tuple[MqttTransport, ...]:
    receiver = Receiver(2 * n)
    a = await make_transport(f"{tag}-a", broker_address, receiver)
    b = await make_transport(f"{tag}-b", broker_address, receiver)
    await a.subscribe(f"i40/t/to/{tag}-a/#")
    await b.subscribe(f"i40/t/to/{tag}-b/#")
    # Each transport fires its whole burst at once: n concurrent publish() calls each, which
    # also checks that waiting publishers are served in order.
    await asyncio.gather(
        *(a.publish(f"i40/t/to/{tag}-b/{tag}-a", message("a", i)) for i in range(n)),
        *(b.publish(f"i40/t/to/{tag}-a/{tag}-b", message("b", i)) for i in range(n)),
    )
    await asyncio.wait_for(receiver.done.wait(), 45)
    await a.flush(10)
    await b.flush(10)
    receiver.assert_complete({"a": n, "b": n})
    assert a.stats.handler_errors == b.stats.handler_errors == 0
    return a, b


async def test_burst_exactly_once_in_order_mosquitto(mosquitto, make_transport) -> None:
    a, b = await _burst(mosquitto.address, make_transport, 5_000, "burst")  # 2 x 5,000 messages
    assert a.stats.acked == b.stats.acked == 5_000


async def test_burst_exactly_once_in_order_embedded(embedded_broker, make_transport) -> None:
    # the same 10,000 messages; amqtt needs 3-6 s for them here (mosquitto < 1 s)
    a, _ = await _burst(embedded_broker.address, make_transport, 5_000, "burst-amqtt")
    assert a.mqtt_version == "3.1.1"


@needs_mosquitto
async def test_broker_restart_mid_stream_loses_nothing(mosquitto, make_transport) -> None:
    n = 10_000
    receiver = Receiver(n)
    sub = await make_transport("restart-sub", mosquitto.address, receiver)
    await sub.subscribe("i40/r/to/restart-sub/#")
    pub = await make_transport("restart-pub", mosquitto.address)

    async def produce() -> None:
        for i in range(n):
            await pub.publish("i40/r/to/restart-sub/restart-pub", message("p", i))

    producer = asyncio.create_task(produce())
    while len(receiver.seen) < n // 4:  # noqa: ASYNC110 - polling a counter is the point
        await asyncio.sleep(0.002)
    assert not producer.done()
    t0 = time.monotonic()
    await mosquitto.arestart()  # SIGTERM (state saved), start again on the same port
    outage = time.monotonic() - t0
    await asyncio.wait_for(producer, 30)
    await asyncio.wait_for(receiver.done.wait(), 30)
    receiver.assert_complete({"p": n})
    assert pub.stats.reconnects >= 1 and sub.stats.reconnects >= 1
    assert receiver.deliveries >= n  # duplicates are allowed, losses are not
    assert pub.connected and sub.connected
    assert outage < 10


@needs_mosquitto
async def test_session_survives_offline_period(mosquitto, make_transport) -> None:
    """Messages published while the subscriber is away arrive when it comes back with the same
    client id, without subscribing again (persistent session)."""
    first = Receiver(1)
    sub = MqttTransport("offline-sub", mosquitto.address, first)
    await sub.connect()
    await sub.subscribe("i40/o/to/offline-sub/#")
    await sub.close()
    pub = await make_transport("offline-pub", mosquitto.address)
    for i in range(200):
        await pub.publish("i40/o/to/offline-sub/offline-pub", message("p", i))
    await pub.flush(5)
    again = Receiver(200)
    await make_transport("offline-sub", mosquitto.address, again)
    await asyncio.wait_for(again.done.wait(), 10)
    again.assert_complete({"p": 200})


async def test_handler_exceptions_do_not_kill_the_connection(mosquitto, make_transport) -> None:
    handled: list[int] = []

    async def flaky(topic: str, payload: bytes) -> None:
        seq = int(payload)
        handled.append(seq)
        if seq % 3 == 0:
            raise RuntimeError(f"handler failure on {seq}")

    sub = await make_transport("flaky-sub", mosquitto.address, flaky)
    await sub.subscribe("flaky/#")
    pub = await make_transport("flaky-pub", mosquitto.address)
    for i in range(100):
        await pub.publish("flaky/x", str(i).encode())
    await pub.flush(5)
    for _ in range(200):
        if len(handled) >= 100:
            break
        await asyncio.sleep(0.01)
    assert handled == list(range(100))
    assert sub.stats.handler_errors == 34
    assert sub.connected and sub.stats.reconnects == 0


@needs_mosquitto
async def test_puback_goes_out_after_the_handler(mosquitto, make_transport) -> None:
    """Kill the connection while the handler holds a message: the broker must deliver it again,
    which it does only because no PUBACK was sent before the handler returned."""
    release = asyncio.Event()
    holding = asyncio.Event()
    deliveries: list[bytes] = []

    async def slow(topic: str, payload: bytes) -> None:
        deliveries.append(payload)
        if payload == b"hold" and not release.is_set():
            holding.set()
            await release.wait()

    sub = await make_transport("puback-sub", mosquitto.address, slow)
    await sub.subscribe("puback/#")
    pub = await make_transport("puback-pub", mosquitto.address)
    await pub.publish("puback/x", b"hold")
    await asyncio.wait_for(holding.wait(), 5)
    sub._client._connection._transport.abort()  # the network goes away mid-handler
    release.set()
    for _ in range(500):
        if deliveries.count(b"hold") >= 2 and sub.connected:
            break
        await asyncio.sleep(0.01)
    assert deliveries.count(b"hold") == 2
    assert sub.stats.reconnects == 1


@needs_mosquitto
async def test_back_pressure_beyond_the_receive_maximum(tmp_path: Path, make_transport) -> None:
    """mosquitto announces receive maximum 5: plain gmqtt raises OverflowError, the transport
    waits for free slots and neither raises nor loses anything."""
    with MosquittoProcess(tmp_path / "small", max_inflight_messages=5) as broker:
        raw = gmqtt.Client("raw-pub")
        await raw.connect(broker.host, broker.port)
        with pytest.raises(OverflowError):
            for _ in range(10):
                raw.publish("bp/raw", b"x", qos=1)
        await raw.disconnect()

        n = 2_000
        receiver = Receiver(n)
        sub = await make_transport("bp-sub", broker.address, receiver)
        await sub.subscribe("bp/#")
        pub = await make_transport("bp-pub", broker.address, max_inflight=16)
        assert (
            pub.window == 3
        )  # receive maximum 5, minus one id gmqtt never hands out, minus one for SUBSCRIBE
        peak = 0

        async def one(i: int) -> None:
            nonlocal peak
            await pub.publish("bp/x", message("p", i))
            peak = max(peak, pub.inflight)

        await asyncio.gather(*(one(i) for i in range(n)))
        await asyncio.wait_for(receiver.done.wait(), 30)
        receiver.assert_complete({"p": n})
        assert peak <= 3
        # subscribing while the window is full still works (one packet id is kept for it)
        await asyncio.gather(*(pub.publish("bp2/y", b"z") for _ in range(50)), pub.subscribe("bp-pub/#"))

        # even when packet ids run out under the window (two held elsewhere, as by SUBSCRIBEs
        # whose SUBACK is pending), publishers wait for acknowledgements and keep their order
        await pub.flush(5)
        stolen = [pub._id_generator.next_id(), pub._id_generator.next_id()]
        more = Receiver(300)
        sub._on_message = more
        await asyncio.gather(*(pub.publish("bp/x", message("q", i)) for i in range(300)))
        await asyncio.wait_for(more.done.wait(), 30)
        more.assert_complete({"q": 300})
        for mid in stolen:
            pub._id_generator.free_id(mid)


async def test_mqtt_311_fallback_against_amqtt(embedded_broker: EmbeddedBroker, make_transport) -> None:
    transport_module._V311_ONLY.clear()
    address = replace(embedded_broker.address, protocol="auto")  # no hint: probe MQTT 5 first
    t0 = time.monotonic()
    received: list[bytes] = []

    async def handler(topic: str, payload: bytes) -> None:
        received.append(payload)

    sub = await make_transport("fallback-sub", address, handler, v5_probe_timeout=0.5)
    assert sub.mqtt_version == "3.1.1"
    assert time.monotonic() - t0 < 5
    await sub.subscribe("fallback/#")
    # a second transport in this process remembers the broker and skips the probe
    t1 = time.monotonic()
    pub = await make_transport("fallback-pub", address)
    assert time.monotonic() - t1 < 0.4 and pub.mqtt_version == "3.1.1"
    await pub.publish("fallback/x", b"hello")
    for _ in range(200):
        if received:
            break
        await asyncio.sleep(0.01)
    assert received == [b"hello"]


async def test_close_flushes(mosquitto, make_transport) -> None:
    n = 500
    receiver = Receiver(n)
    sub = await make_transport("close-sub", mosquitto.address, receiver)
    await sub.subscribe("close/#")
    pub = MqttTransport("close-pub", mosquitto.address, receiver)
    await pub.connect()
    for i in range(n):
        await pub.publish("close/x", message("p", i))
    assert pub.inflight > 0
    await pub.close()
    assert pub.stats.acked == n and pub.inflight == 0
    await asyncio.wait_for(receiver.done.wait(), 10)
    receiver.assert_complete({"p": n})
    with pytest.raises(TransportClosed):
        await pub.publish("close/x", b"late")


async def test_unsubscribe_and_validation(mosquitto, make_transport) -> None:
    got: list[str] = []

    async def handler(topic: str, payload: bytes) -> None:
        got.append(topic)

    t = await make_transport("val-1", mosquitto.address, handler)
    await t.subscribe("val/a/#", "val/b/+")
    await t.publish("val/a/1", b"x")
    await t.publish("val/b/2", b"x")
    await t.unsubscribe("val/a/#")
    await t.publish("val/a/3", b"x")
    await t.publish("val/b/4", b"x")
    await t.flush(5)
    for _ in range(100):
        if len(got) >= 3:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert got == ["val/a/1", "val/b/2", "val/b/4"]
    with pytest.raises(ValueError):
        await t.publish("val/+/x", b"x")
    with pytest.raises(TypeError):
        await t.publish("val/x", "text")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await t.subscribe("val/a#")


async def test_connect_gives_up_after_retries() -> None:
    t = MqttTransport("nobody", BrokerAddress(port=free_port(), protocol="5"), Receiver(0), connect_retries=3)
    t0 = time.monotonic()
    with pytest.raises(OSError):
        await t.connect()
    assert time.monotonic() - t0 < 3
    assert t.stats.connect_failures == 3


@needs_mosquitto
async def test_wrong_credentials_fail_fast(tmp_path: Path) -> None:
    pw = write_password_file(tmp_path / "pw", {"alice": "secret"})
    with MosquittoProcess(tmp_path / "m", password_file=pw, allow_anonymous=False) as broker:
        bad = MqttTransport("alice", broker.address_for("alice", "wrong"), Receiver(0))
        with pytest.raises(ConnectRefused) as info:
            await bad.connect()
        assert info.value.code in (134, 135)
        good = MqttTransport("alice", broker.address_for("alice", "secret"), Receiver(0))
        await good.connect()
        await good.close()


def test_broker_address_url_round_trip() -> None:
    a = BrokerAddress.from_url("mqtt://agent-1:p%40ss@broker.local:1884")
    assert (a.host, a.port, a.username, a.password, a.uses_tls) == (
        "broker.local",
        1884,
        "agent-1",
        "p@ss",
        False,
    )
    b = BrokerAddress.from_url("mqtts://h?ca=/etc/ca.pem&cert=/c.pem&key=/k.pem&protocol=3.1.1")
    assert (b.port, b.tls_ca, b.tls_cert, b.tls_key, b.protocol, b.uses_tls) == (
        8883,
        "/etc/ca.pem",
        "/c.pem",
        "/k.pem",
        "3.1.1",
        True,
    )
    assert BrokerAddress.from_url(b.url()) == b
    assert "***" in str(a) and "p%40ss" not in str(a)
    assert BrokerAddress.from_url("tcp://[::1]:1883").host == "::1"
    with pytest.raises(ValueError):
        BrokerAddress.from_url("http://x")


@given(
    user=st.text(min_size=1, max_size=20).filter(lambda s: "\x00" not in s),
    password=st.text(max_size=20),
    port=st.integers(1, 65535),
)
def test_broker_address_round_trip_property(user: str, password: str, port: int) -> None:
    address = BrokerAddress(host="example.org", port=port, username=user, password=password)
    assert BrokerAddress.from_url(address.url()) == address


@pytest.fixture(autouse=True)
def _fresh_v311_cache() -> None:
    transport_module._V311_ONLY.clear()
