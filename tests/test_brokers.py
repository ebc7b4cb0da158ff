"""Broker launchers, mosquitto config generation, and password/ACL files enforced by mosquitto."""

from __future__ import annotations

import asyncio
import functools
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from protocol.broker import BrokerStartError, EmbeddedBroker, start_broker
from protocol.mosquitto import (
    MosquittoProcess,
    MosquittoTLS,
    acl_file_text,
    find_mosquitto,
    free_port,
    mosquitto_config,
    password_hash,
    write_acl_file,
    write_password_file,
)
from protocol.transport import BrokerAddress, ConnectRefused, MqttTransport, SubscriptionRefused

pytestmark = pytest.mark.timeout(60)
needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto binary not installed")


def _settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            settings.setdefault(key, []).append(value)
    return settings


def test_config_generator(tmp_path: Path) -> None:
    text = mosquitto_config(
        18831,
        persistence_dir=tmp_path / "data",
        password_file=tmp_path / "pw",
        acl_file=tmp_path / "acl",
        allow_anonymous=False,
        max_inflight_messages=5,
        tls=MosquittoTLS(certfile="/c.pem", keyfile="/k.pem", cafile="/ca.pem"),
    )
    s = _settings(text)
    assert s["listener"] == ["18831 127.0.0.1"]
    assert s["set_tcp_nodelay"] == ["true"]
    assert s["per_listener_settings"] == ["false"]
    assert s["allow_anonymous"] == ["false"]
    assert s["max_queued_messages"] == ["100000"]
    assert s["max_inflight_messages"] == ["5"]
    assert s["persistence"] == ["true"]
    assert s["persistence_location"] == [f"{(tmp_path / 'data').resolve()}/"]
    assert s["password_file"] == [str((tmp_path / "pw").resolve())]
    assert s["acl_file"] == [str((tmp_path / "acl").resolve())]
    assert s["certfile"] == ["/c.pem"] and s["keyfile"] == ["/k.pem"] and s["cafile"] == ["/ca.pem"]
    plain = _settings(mosquitto_config(1883))
    assert plain["persistence"] == ["false"] and plain["allow_anonymous"] == ["true"]
    assert "password_file" not in plain and "acl_file" not in plain and "certfile" not in plain
    assert "user" not in plain


def test_acl_text() -> None:
    text = acl_file_text(observers=["observer"])
    assert "user observer\ntopic read i40/#" in text
    for rule in (
        "pattern write i40/+/to/+/%u",
        "pattern write i40/+/cfp/+/%u",
        "pattern write i40/+/events/%u",
        "pattern read i40/+/to/%u/#",
        "pattern read i40/+/cfp/#",
        "pattern read i40/+/events/#",
    ):
        assert rule in text.splitlines()


def test_password_hash_format() -> None:
    h = password_hash("secret", salt=b"0123456789ab")
    assert h.startswith("$7$101$MDEyMzQ1Njc4OWFi$")
    assert len(h.split("$")[-1]) == 88  # 64-byte PBKDF2-SHA512 key, base64


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


async def _connect(address: BrokerAddress, client_id: str, handler=None) -> MqttTransport:
    async def ignore(topic: str, payload: bytes) -> None:
        return None

    t = MqttTransport(client_id, address, handler or ignore, connect_retries=2)
    await t.connect()
    return t


@needs_mosquitto
@pytest.mark.parametrize("use_tool", [True, False], ids=["mosquitto_passwd", "python-pbkdf2"])
async def test_password_file_and_anonymous_refused(tmp_path: Path, use_tool: bool) -> None:
    pw = write_password_file(tmp_path / "pw", {"alice": "s3cret", "bob": "hunter2"}, use_tool=use_tool)
    with MosquittoProcess(tmp_path / "m", password_file=pw, allow_anonymous=False) as broker:
        alice = await _connect(broker.address_for("alice", "s3cret"), "alice")
        await alice.close()
        with pytest.raises(ConnectRefused):
            await _connect(broker.address_for("bob", "wrong"), "bob")
        with pytest.raises(ConnectRefused):
            await _connect(broker.address, "anonymous")  # no user name at all
        with pytest.raises(ConnectRefused):  # the same refusal over MQTT 3.1.1
            await _connect(BrokerAddress(port=broker.port, protocol="3.1.1"), "anonymous311")


@needs_mosquitto
async def test_acl_forbids_publishing_under_another_name(tmp_path: Path) -> None:
    users = {"alice": "a", "bob": "b", "observer": "o"}
    pw = write_password_file(tmp_path / "pw", users)
    acl = write_acl_file(tmp_path / "acl", observers=["observer"])
    with MosquittoProcess(tmp_path / "m", password_file=pw, acl_file=acl, allow_anonymous=False) as broker:
        seen: list[tuple[str, bytes]] = []
        bob_inbox: list[str] = []

        async def observe(topic: str, payload: bytes) -> None:
            seen.append((topic, payload))

        async def bob_handler(topic: str, payload: bytes) -> None:
            bob_inbox.append(topic)

        observer = await _connect(broker.address_for("observer", "o"), "observer", observe)
        await observer.subscribe("i40/#")
        bob = await _connect(broker.address_for("bob", "b"), "bob", bob_handler)
        await bob.subscribe("i40/plant/to/bob/#", "i40/plant/cfp/#")
        alice_inbox: list[str] = []

        async def alice_handler(topic: str, payload: bytes) -> None:
            alice_inbox.append(topic)

        alice = await _connect(broker.address_for("alice", "a"), "alice", alice_handler)
        # alice tries to read bob's inbox: mosquitto 2.0 accepts the SUBSCRIBE (the file ACL is
        # checked per message at delivery) but never delivers bob's messages to her
        try:
            await alice.subscribe("i40/plant/to/bob/#")
        except SubscriptionRefused:  # pragma: no cover - stricter brokers refuse at once
            pass

        # allowed: alice as the sender
        await alice.publish("i40/plant/to/bob/alice", b"ok-direct")
        await alice.publish("i40/plant/cfp/milling/alice", b"ok-cfp")
        await alice.publish("i40/plant/events/alice", b"ok-event")
        # forbidden: alice pretending to be bob or carol
        await alice.publish("i40/plant/to/bob/bob", b"forged-direct")
        await alice.publish("i40/plant/cfp/milling/bob", b"forged-cfp")
        await alice.publish("i40/plant/events/carol", b"forged-event")
        await alice.publish("elsewhere/x", b"off-tree")
        await alice.flush(5)
        assert alice.stats.refused == 4  # MQTT 5 PUBACK "not authorised" for each forgery
        # the observer reads everything but, like everyone, writes only under its own name
        await observer.publish("i40/plant/to/bob/alice", b"observer-forged")
        await observer.flush(5)
        assert observer.stats.refused == 1

        await asyncio.sleep(0.3)
        payloads = sorted(p for _, p in seen)
        assert payloads == [b"ok-cfp", b"ok-direct", b"ok-event"]
        assert sorted(bob_inbox) == ["i40/plant/cfp/milling/alice", "i40/plant/to/bob/alice"]
        assert alice_inbox == []
        for t in (alice, bob, observer):
            await t.close()


@needs_mosquitto
def test_mosquitto_process_restart_keeps_port_and_state(tmp_path: Path) -> None:
    proc = MosquittoProcess(tmp_path / "m")
    with proc:
        port = proc.port
        assert proc.running and proc.url == f"mqtt://127.0.0.1:{port}?protocol=5"
        proc.restart()
        assert proc.running and proc.port == port
        assert (proc.persistence_dir / "mosquitto.db").exists()  # saved on the clean stop
        proc.restart(crash=True)
        assert proc.running and proc.port == port
    assert not proc.running
    assert "set_tcp_nodelay true" in proc.config_path.read_text()


@needs_mosquitto
def test_mosquitto_process_reports_a_bad_config(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="mosquitto did not start"):
        MosquittoProcess(tmp_path / "bad", extra=["no_such_option 1"]).start()


def test_embedded_broker_lifecycle(tmp_path: Path) -> None:
    broker = EmbeddedBroker(tmp_path / "amqtt")
    with broker:
        assert broker.running and broker.address.protocol == "3.1.1"
        with socket.create_connection((broker.host, broker.port), timeout=2):
            pass
        port = broker.port
        broker.restart()
        assert broker.running and broker.port == port
    assert not broker.running


def test_start_broker_kinds(tmp_path: Path) -> None:
    external = start_broker("mqtt://user:pw@10.0.0.5:1999", tmp_path)
    assert external.kind == "external" and external.address.port == 1999 and external.process is None
    external.stop()  # nothing to stop
    with pytest.raises(RuntimeError):
        external.restart()

    with start_broker(None, tmp_path / "e") as embedded:
        assert embedded.kind == "embedded" and embedded.process is not None and embedded.process.running
    assert not embedded.process.running

    if find_mosquitto() is not None:
        with start_broker("mosquitto", tmp_path / "m") as mosq:
            assert mosq.kind == "mosquitto" and mosq.address.protocol == "5"
            mosq.restart()
            assert mosq.process.running
    else:
        with pytest.raises(BrokerStartError):
            start_broker("mosquitto", tmp_path / "m")


def _make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 (openssl CLI)."""
    directory.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    run = functools.partial(subprocess.run, check=True, capture_output=True)
    run(
        [
            "openssl",
            "req",
            "-x509",
            *ec,
            "-keyout",
            ca_key,
            "-out",
            ca,
            "-days",
            "1",
            "-subj",
            "/CN=twinbid-test-ca",
        ]
    )
    run(["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"])
    sign = ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial"]
    run([*sign, "-out", cert, "-days", "1", "-extfile", ext])
    return ca, cert, key


@needs_mosquitto
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
async def test_tls_listener_and_mqtts_url(tmp_path: Path) -> None:
    ca, cert, key = _make_certificates(tmp_path / "certs")
    tls = MosquittoTLS(certfile=str(cert), keyfile=str(key))
    with MosquittoProcess(tmp_path / "m", tls=tls) as broker:
        address = BrokerAddress.from_url(f"mqtts://127.0.0.1:{broker.port}?ca={ca}&protocol=5")
        got: list[bytes] = []

        async def handler(topic: str, payload: bytes) -> None:
            got.append(payload)

        t = await _connect(address, "tls-client", handler)
        await t.subscribe("tls/#")
        await t.publish("tls/x", b"over TLS")
        for _ in range(200):
            if got:
                break
            await asyncio.sleep(0.01)
        assert got == [b"over TLS"]
        await t.close()
        # without the CA the server certificate is not trusted: refused at once, no retries
        untrusted = MqttTransport(
            "tls-untrusted", BrokerAddress(port=broker.port, tls=True, protocol="5"), handler
        )
        with pytest.raises(ssl.SSLCertVerificationError):
            await untrusted.connect()
