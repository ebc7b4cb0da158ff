"""Broker accounts, topic rules, TLS and the agents' identity checks, against real brokers.

What is shown (docs/security.md): with the run's accounts a client holding agent A's password
cannot publish as B, nor read B's inbox or calls for capabilities A does not offer; an observer
reads everything and publishes nothing; a client without valid credentials cannot connect; an
agent that publishes under its own name but puts another agent's id in the frame is refused by
the receiver, as is a participant speaking in a conversation that is not its own; and a whole run
with accounts (and with TLS) completes.  Brokers are a real mosquitto (per test, free port,
generated config) and the embedded amqtt broker, each in its own process.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import stat
from pathlib import Path

import pytest
from conftest import HAVE_MOSQUITTO
from fuzzing import LivePlant

from protocol.broker import start_broker
from protocol.credentials import Credentials, Grant, agent_grant, filter_within, observer_grant
from protocol.frame import MessageType, Role, make_message, parse_message
from protocol.mosquitto import MosquittoTLS, acl_rules_text
from protocol.transport import BrokerAddress, ConnectRefused, MqttTransport
from scenarios.launcher import RunOptions, run
from scenarios.loader import ScenarioError, load_scenario, load_scenario_text

pytestmark = pytest.mark.timeout(120)
needs_mosquitto = pytest.mark.skipif(not HAVE_MOSQUITTO, reason="mosquitto binary not installed")
BROKERS = [pytest.param("mosquitto", marks=needs_mosquitto), "embedded"]

# ------------------------------------------------------------------------------------- the rules


def test_agent_grant_speaks_only_under_its_own_name() -> None:
    g = agent_grant("plant", "mill", ["milling"])
    assert g.allows("write", "i40/plant/to/p-1/mill")
    assert g.allows("write", "i40/plant/cfp/drilling/mill")
    assert g.allows("write", "i40/plant/events/mill")
    for forged in ("i40/plant/to/p-1/drill", "i40/plant/cfp/milling/p-1", "i40/plant/events/drill",
                   "i40/other/to/p-1/mill", "i40/plant/to/p-1/mill/x", "elsewhere"):  # fmt: skip
        assert not g.allows("write", forged), forged
    assert g.allows("read", "i40/plant/to/mill/p-1")
    assert g.allows("read", "i40/plant/cfp/milling/p-1")
    assert g.allows("read", "i40/plant/events/p-1")
    assert not g.allows("read", "i40/plant/to/drill/p-1")  # someone else's inbox
    assert not g.allows("read", "i40/plant/cfp/drilling/p-1")  # a capability it does not offer
    assert g.allows("subscribe", "i40/plant/to/mill/+")
    assert not g.allows("subscribe", "i40/plant/#")
    assert not g.allows("subscribe", "i40/plant/cfp/+/+")
    assert not g.allows("write", "i40/plant/to/+/mill")  # no wildcards in a topic name
    o = observer_grant("plant")
    assert o.allows("subscribe", "i40/plant/#") and o.allows("read", "i40/plant/to/mill/p-1")
    assert not o.allows("write", "i40/plant/events/observer")


def test_filter_within() -> None:
    assert filter_within("a/b/+", "a/b/+") and filter_within("a/b/c", "a/+/c") and filter_within("a/b", "a/#")
    assert filter_within("a/#", "#")
    assert (
        not filter_within("a/#", "a/+") and not filter_within("a/+", "a/b") and not filter_within("a", "a/b")
    )
    assert not filter_within("a/b/c", "a/b")


def test_acl_has_one_block_per_user_and_no_patterns() -> None:
    text = acl_rules_text({"mill": agent_grant("ns", "mill", ["milling"]), "observer": observer_grant("ns")})
    assert "pattern" not in text
    observer_block = text.split("user observer\n")[1]
    assert observer_block.strip().splitlines() == ["topic read i40/ns/#"]
    with pytest.raises(ValueError):
        acl_rules_text({"bad name": Grant()})


def test_credentials_file_is_private_and_reloads(tmp_path: Path) -> None:
    creds = Credentials("ns", tmp_path)
    pw = creds.add_agent("mill", ["milling"])
    creds.add_observer()
    path = creds.save()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = Credentials.load(tmp_path)
    assert again.passwords["mill"] == pw and again.accounts["mill"].grant == creds.accounts["mill"].grant
    assert "observer" not in again.passwords  # the observer is no agent
    assert len({creds.add_agent(f"p-{i}") for i in range(20)}) == 20  # random, distinct


# ------------------------------------------------------------------------------------- brokers


def _accounts(directory: Path) -> Credentials:
    creds = Credentials("plant", directory)
    creds.add_agent("alice", ["milling"])
    creds.add_agent("bob", ["drilling"])
    creds.add_observer()
    return creds


async def _client(address: BrokerAddress, client_id: str, inbox: list | None = None) -> MqttTransport:
    async def handler(topic: str, payload: bytes) -> None:
        if inbox is not None:
            inbox.append((topic, payload))

    t = MqttTransport(client_id, address, handler, connect_retries=1)
    await t.connect()
    return t


@pytest.mark.parametrize("kind", BROKERS)
async def test_unauthenticated_clients_cannot_connect(tmp_path: Path, kind: str) -> None:
    creds = _accounts(tmp_path / "creds")
    broker = await asyncio.to_thread(lambda: start_broker(kind, tmp_path, credentials=creds))
    try:
        base = broker.address
        ok = await _client(creds.address(base, "alice"), "alice")
        await ok.close()
        from dataclasses import replace

        for label, address in [
            ("anonymous", base),
            ("wrong password", replace(base, username="alice", password="guess")),
            ("unknown user", replace(base, username="mallory", password=creds.passwords["alice"])),
            ("another's password", replace(base, username="bob", password=creds.passwords["alice"])),
        ]:
            with pytest.raises(ConnectRefused):
                await _client(address, f"x-{label.replace(' ', '-')}")
            if kind == "mosquitto":  # the same refusal over MQTT 3.1.1
                with pytest.raises(ConnectRefused):
                    await _client(replace(address, protocol="3.1.1"), f"y-{label.replace(' ', '-')}")
    finally:
        await asyncio.to_thread(broker.stop)


@pytest.mark.parametrize("kind", BROKERS)
async def test_an_agent_cannot_publish_or_read_as_another(tmp_path: Path, kind: str) -> None:
    creds = _accounts(tmp_path / "creds")
    broker = await asyncio.to_thread(lambda: start_broker(kind, tmp_path, credentials=creds))
    clients: list[MqttTransport] = []
    try:
        seen: list = []
        bob_got: list = []
        alice_got: list = []
        observer = await _client(creds.observer_address(broker.address), "rec", seen)
        await observer.subscribe("i40/plant/#")
        bob = await _client(creds.address(broker.address, "bob"), "bob", bob_got)
        await bob.subscribe("i40/plant/to/bob/+", "i40/plant/cfp/drilling/+", "i40/plant/events/+")
        alice = await _client(creds.address(broker.address, "alice"), "alice", alice_got)
        clients += [observer, bob, alice]
        # alice tries to listen in: bob's inbox, and calls for a capability she does not offer
        for f in ("i40/plant/to/bob/+", "i40/plant/cfp/drilling/+"):
            try:
                await alice.subscribe(f)
            except Exception:  # amqtt refuses at once (SUBACK 0x80); mosquitto never delivers
                pass
        await alice.subscribe("i40/plant/to/alice/+")
        # allowed: alice as the sender
        for topic in ("i40/plant/to/bob/alice", "i40/plant/cfp/drilling/alice", "i40/plant/events/alice"):
            await alice.publish(topic, b"genuine")
        # forbidden: alice as bob, or off the tree; the observer publishing anything at all
        for topic in ("i40/plant/to/alice/bob", "i40/plant/cfp/drilling/bob", "i40/plant/events/bob",
                      "i40/plant/to/bob/observer", "i40/other/to/bob/alice", "elsewhere"):  # fmt: skip
            await alice.publish(topic, b"forged")
        await observer.publish("i40/plant/to/bob/observer", b"forged")
        await observer.publish("i40/plant/events/observer", b"forged")
        # bob's own calls and direct messages, which alice must not hear
        await bob.publish("i40/plant/cfp/drilling/bob", b"bob-call")
        await bob.publish("i40/plant/to/bob/bob", b"bob-to-himself")
        await alice.flush(5)
        await observer.flush(5)
        await bob.flush(5)
        if kind == "mosquitto":  # MQTT 5: every forgery is answered "not authorised"
            assert alice.stats.refused == 6 and observer.stats.refused == 2
        await asyncio.sleep(0.5)
        assert sorted(p for _, p in seen).count(b"forged") == 0
        assert sorted(t for t, p in seen if p == b"genuine") == [
            "i40/plant/cfp/drilling/alice", "i40/plant/events/alice", "i40/plant/to/bob/alice",
        ]  # fmt: skip
        assert sorted(t for t, _ in bob_got) == [
            "i40/plant/cfp/drilling/alice", "i40/plant/cfp/drilling/bob", "i40/plant/events/alice",
            "i40/plant/to/bob/alice", "i40/plant/to/bob/bob",
        ]  # fmt: skip
        assert alice_got == []  # nothing of bob's reached her
    finally:
        for c in clients:
            await c.close(timeout=2)
        await asyncio.to_thread(broker.stop)


@pytest.mark.parametrize("kind", BROKERS)
async def test_an_account_added_during_a_run_can_connect(tmp_path: Path, kind: str) -> None:
    """A vendor's product joins a running plant: its node asks for its password, and gets in."""
    creds = _accounts(tmp_path / "creds")
    broker = await asyncio.to_thread(lambda: start_broker(kind, tmp_path, credentials=creds))
    try:
        password = creds.passwords.get("order-7")  # what Node.add_agent does
        assert password and creds.passwords.get("Not A Name") is None
        got: list = []
        t = await _client(creds.address(broker.address, "order-7"), "order-7", got)
        await t.subscribe("i40/plant/to/order-7/+")
        alice = await _client(creds.address(broker.address, "alice"), "alice")
        await alice.publish("i40/plant/to/order-7/alice", b"hello")
        await alice.flush(5)
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.02)
        assert got == [("i40/plant/to/order-7/alice", b"hello")]
        await t.close()
        await alice.close()
    finally:
        await asyncio.to_thread(broker.stop)


# ------------------------------------------------------------------------------------- TLS


def make_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a certificate for 127.0.0.1 signed by it (the ``cryptography`` package)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("twinbid test CA"))
        .issuer_name(name("twinbid test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


TLS_PLANT = """
name: tls
namespace: tls
broker: {broker}
security:
  tls: {{cert: certs/server.pem, key: certs/server.key, ca: certs/ca.pem}}
clock: {{kind: virtual}}
transport: {{default_time: 0}}
resources:
  - {{kind: workstation, name: mill, location: a, capabilities: [{{name: milling, duration: 2, cost_rate: 1}}]}}
  - {{kind: workstation, name: drill, location: b, capabilities: [{{name: drilling, duration: 1, cost_rate: 1}}]}}
product_types:
  - {{name: part, plan: [{{capability: milling}}, {{capability: drilling}}]}}
orders:
  - {{type: part, quantity: 3, priority: 1, release: 0}}
stop: {{wall_timeout: 60}}
"""


@pytest.mark.parametrize("kind", [pytest.param("mosquitto", marks=needs_mosquitto), "null"])
def test_a_run_over_tls_with_accounts_completes(tmp_path: Path, kind: str) -> None:
    make_ca_and_server_cert(tmp_path / "certs")
    (tmp_path / "plant.yaml").write_text(TLS_PLANT.format(broker=kind))
    scenario = load_scenario(tmp_path / "plant.yaml")  # certificate paths relative to the file
    assert scenario.security.tls is not None and Path(scenario.security.tls.ca).is_absolute()
    result = asyncio.run(run(scenario, RunOptions(out=tmp_path / "out", progress=False)))
    assert result.ok, result.kpis
    assert result.kpis["steps"]["completed"] == 6
    lines = (tmp_path / "out" / "messages.jsonl").read_text().splitlines()
    assert len(lines) >= result.kpis["messages"]["total"]  # the observer account heard everything


@needs_mosquitto
async def test_tls_listener_refuses_plain_and_untrusted_clients(tmp_path: Path) -> None:
    ca, cert, key = make_ca_and_server_cert(tmp_path / "certs")
    creds = _accounts(tmp_path / "creds")
    tls = MosquittoTLS(certfile=str(cert), keyfile=str(key), cafile=str(ca))
    broker = await asyncio.to_thread(lambda: start_broker("mosquitto", tmp_path, credentials=creds, tls=tls))
    try:
        address = creds.address(broker.address, "alice")
        assert address.uses_tls and address.tls_ca == str(ca)
        t = await _client(address, "alice")
        await t.close()
        from dataclasses import replace

        with pytest.raises(Exception):  # noqa: B017 - plain MQTT to a TLS port: no CONNACK ever
            await asyncio.wait_for(_client(replace(address, tls=False, tls_ca=None), "plain"), 5)
        with pytest.raises(Exception):  # noqa: B017 - a client that does not trust the test CA
            await asyncio.wait_for(_client(replace(address, tls_ca=None), "untrusting"), 5)
    finally:
        await asyncio.to_thread(broker.stop)


def test_scenario_tls_errors_are_clear(tmp_path: Path) -> None:
    (tmp_path / "plant.yaml").write_text(TLS_PLANT.format(broker="mosquitto"))
    with pytest.raises(ScenarioError) as err:
        load_scenario(tmp_path / "plant.yaml")
    assert "security.tls.cert: no such file" in str(err.value)
    with pytest.raises(ScenarioError) as err:
        load_scenario_text(TLS_PLANT.format(broker="mqtt://broker.example:1883"))
    assert "security.tls" in str(err.value) and "mqtts://" in str(err.value)
    with pytest.raises(ScenarioError) as err:
        load_scenario_text(TLS_PLANT.format(broker="null").replace("tls: {", "tls: {bogus: 1, "))
    assert "security.tls.bogus" in str(err.value)


# ------------------------------------------------------------------------------------- end to end


def test_the_demo_runs_with_accounts_on_mosquitto(tmp_path: Path) -> None:
    if not HAVE_MOSQUITTO:
        pytest.skip("mosquitto binary not installed")
    from test_end_to_end import DEMO, check_record

    scenario = load_scenario(DEMO)
    assert scenario.security.auth  # on by default
    result = asyncio.run(run(scenario, RunOptions(out=tmp_path, progress=False, broker="mosquitto")))
    check_record(tmp_path, result.kpis, total=10)
    conf = (tmp_path / "mosquitto" / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and "password_file" in conf and "acl_file" in conf
    saved = json.loads((tmp_path / "broker" / "credentials.json").read_text())
    assert set(saved["accounts"]) == {r.name for r in scenario.resources} | {
        p.name for p in scenario.product_instances()
    } | {"observer"}
    assert stat.S_IMODE((tmp_path / "broker" / "credentials.json").stat().st_mode) == 0o600


def test_auth_can_be_turned_off(tmp_path: Path) -> None:
    if not HAVE_MOSQUITTO:
        pytest.skip("mosquitto binary not installed")
    text = TLS_PLANT.format(broker="mosquitto").replace(
        "  tls: {cert: certs/server.pem, key: certs/server.key, ca: certs/ca.pem}", "  auth: false"
    )
    result = asyncio.run(run(load_scenario_text(text), RunOptions(out=tmp_path, progress=False)))
    assert result.ok
    assert "allow_anonymous true" in (tmp_path / "mosquitto" / "mosquitto.conf").read_text()
    assert not (tmp_path / "broker" / "credentials.json").exists()


# ------------------------------------------------------------------------------------- identity


SLOW_STEP = """
name: identity
namespace: identity
clock: {kind: accelerated, time_scale: 500}
transport: {default_time: 0}
bidding: {reply_window: 0.3}
resources:
  - {kind: workstation, name: fast, location: a, capabilities: [{name: milling, duration: 6, cost_rate: 1}]}
  - {kind: workstation, name: slow, location: b, capabilities: [{name: milling, duration: 12, cost_rate: 1}]}
product_types:
  - {name: part, plan: [{capability: milling}]}
orders:
  - {type: part, quantity: 2, priority: 1, release: 2, interval: 1}
"""


@pytest.mark.parametrize("kind", BROKERS)
async def test_forged_senders_and_strangers_are_refused_by_the_receiver(tmp_path: Path, kind: str) -> None:
    """Insiders with valid accounts, on topics the broker allows them, lie in the frame."""
    async with LivePlant(
        load_scenario_text(SLOW_STEP), tmp_path, broker=kind, clock="accelerated", time_scale=500
    ) as plant:
        watched: list = []
        observer = await _client(plant.address(), "watcher", watched)
        await observer.subscribe("i40/identity/#")
        # wait until the first step is booked: the winner has confirmed it (products start at t=2)
        accept = confirm = None
        for _ in range(500):
            for _t, p in watched:
                m = parse_message(p) if p.startswith(b'{"frame"') else None
                if m is not None and m.type is MessageType.ACCEPT_PROPOSAL:
                    accept = m
                if m is not None and m.type is MessageType.INFORM_CONFIRM:
                    confirm = m
            if accept and confirm:
                break
            await asyncio.sleep(0.01)
        assert accept is not None and confirm is not None
        ids = {name: plant.agent(name).aas_id for name in ("fast", "slow", "part-1", "part-2")}
        winner = next(n for n in ("fast", "slow") if ids[n] == accept.receiver)
        loser = "slow" if winner == "fast" else "fast"
        product = next(n for n in ("part-1", "part-2") if ids[n] == accept.sender)
        other_product = "part-2" if product == "part-1" else "part-1"
        before = {k: plant.counter(k) for k in ("note:forged-sender", "note:not-participant")}

        # 1. the loser, on its own topic, claims to be the winner and reports the step done
        liar = await _client(plant.address(loser), f"{loser}-x")
        forged = make_message(
            MessageType.INFORM, sender=ids[winner], sender_role=Role.PROVIDER,
            conversation_id=accept.conversation, receiver=ids[product], in_reply_to=accept.id,
        )  # fmt: skip
        await liar.publish(f"i40/identity/to/{product}/{loser}", forged.to_json())
        # 2. the loser, honest about its name, speaks in a conversation it lost
        stranger = make_message(
            MessageType.INFORM_FAILURE, sender=ids[loser], sender_role=Role.PROVIDER,
            conversation_id=accept.conversation, receiver=ids[product], in_reply_to=accept.id,
        )  # fmt: skip
        await liar.publish(f"i40/identity/to/{product}/{loser}", stranger.to_json())
        # 3. another product cancels the booking in a conversation that is not its own
        other = await _client(plant.address(other_product), f"{other_product}-x")
        cancel = make_message(
            MessageType.REJECT_PROPOSAL, sender=ids[other_product], sender_role=Role.REQUESTER,
            conversation_id=confirm.conversation, receiver=ids[winner], in_reply_to=confirm.in_reply_to,
        )  # fmt: skip
        await other.publish(f"i40/identity/to/{winner}/{other_product}", cancel.to_json())
        for c in (liar, other):
            await c.flush(5)
        for _ in range(300):
            forged_n = plant.counter("note:forged-sender") - before["note:forged-sender"]
            stranger_n = plant.counter("note:not-participant") - before["note:not-participant"]
            if forged_n >= 1 and stranger_n >= 2:
                break
            await asyncio.sleep(0.01)
        assert plant.agent(product).counters["note:forged-sender"] == 1
        assert plant.agent(product).counters["note:not-participant"] == 1
        assert plant.agent(winner).counters["note:not-participant"] == 1
        # none of it changed the outcome: each product completes its step once, at the winner
        await plant.until_done(60)
        from sqlmodel import select

        from agents.persistence.tables import WorkOrderRecord

        with plant.node.db.session() as s:
            done = s.exec(select(WorkOrderRecord).where(WorkOrderRecord.state == "done")).all()
        assert sorted(o.product for o in done) == ["part-1", "part-2"]
        assert next(o.resource for o in done if o.product == product) == winner
        for c in (liar, other, observer):
            await c.close(timeout=2)


@pytest.mark.parametrize("kind", BROKERS)
async def test_another_process_of_the_run_can_add_an_account(tmp_path: Path, kind: str) -> None:
    """``Credentials.load(OUT/broker)`` in another process: observe, and issue an account that works."""
    creds = _accounts(tmp_path / "broker")
    creds.save()
    broker = await asyncio.to_thread(lambda: start_broker(kind, tmp_path, credentials=creds))
    try:
        other = Credentials.load(tmp_path / "broker")  # what a second process would do
        assert other.passwords["alice"] == creds.passwords["alice"]
        password = other.passwords.get("late-product")
        assert (
            password
            and "late-product"
            in json.loads((tmp_path / "broker" / "credentials.json").read_text())["accounts"]
        )
        t = await _client(other.address(broker.address, "late-product"), "late-product")
        await t.close()
        watcher = await _client(other.observer_address(broker.address), "watcher")
        await watcher.subscribe("i40/plant/#")
        await watcher.close()
    finally:
        await asyncio.to_thread(broker.stop)
