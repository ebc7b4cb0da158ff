"""Shared fixtures: real brokers on free loopback ports, and connected transports.

* ``mosquitto`` - a private mosquitto for one test (generated config, persistence on, in
  ``tmp_path``); yields the ``MosquittoProcess`` (``.address``, ``.url``, ``.restart()``,
  ``await .arestart()``, ``.kill()``).
* ``mosquitto_session`` - one mosquitto shared by the whole session (use distinct client ids and
  topics per test).
* ``embedded_broker`` - the embedded amqtt broker (child process), shared by the session.
* ``make_transport`` - ``await make_transport(client_id, address, handler=None, **kwargs)``
  returns a connected ``MqttTransport`` that is closed after the test.

Without a mosquitto binary the mosquitto fixtures fall back to the embedded broker (MQTT 3.1.1,
no persistence, no ACLs); tests that need mosquitto itself use the ``needs_mosquitto`` mark or
``require_mosquitto(broker)``.  ``free_port()`` lives in ``protocol.mosquitto``.

* ``postgres_schema()`` - a context manager yielding the URL of a private, fresh schema on the
  PostgreSQL server at ``TWINBID_TEST_PG`` (dropped afterwards); it skips the test when no server
  answers.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol.broker import EmbeddedBroker
from protocol.mosquitto import MosquittoProcess, find_mosquitto, free_port
from protocol.transport import BrokerAddress, MessageHandler, MqttTransport

__all__ = ["HAVE_MOSQUITTO", "PG_URL", "free_port", "needs_mosquitto", "postgres_schema", "require_mosquitto"]

#: Data the tests read, vendored into the repository (data/README.md says where it comes from).
DATA_DIR = Path(__file__).resolve().parents[1] / "data"
JOBSHOP_DIR = DATA_DIR / "jobshop"
SPEC_DIR = DATA_DIR / "spec" / "aas-api-v3.1"

PG_URL = os.environ.get("TWINBID_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_URL.replace("postgresql+psycopg", "postgresql"), connect_timeout=2):
            return True
    except Exception:
        return False


@contextlib.contextmanager
def postgres_schema() -> Iterator[str]:
    """A private schema, dropped afterwards, so parallel runs and other tables are never touched."""
    if not _pg_available():
        pytest.skip("no PostgreSQL server answers at " + PG_URL)
    import psycopg

    schema = f"twinbid_test_{uuid.uuid4().hex[:12]}"
    plain = PG_URL.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        sep = "&" if "?" in PG_URL else "?"
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


HAVE_MOSQUITTO = find_mosquitto() is not None
needs_mosquitto = pytest.mark.skipif(not HAVE_MOSQUITTO, reason="mosquitto binary not installed")


def require_mosquitto(broker: object) -> MosquittoProcess:
    """Skip the calling test unless ``broker`` (a fixture value) is a real mosquitto."""
    if not isinstance(broker, MosquittoProcess):
        pytest.skip("needs mosquitto (fell back to the embedded broker)")
    return broker


def _start_broker(directory: Path, **config: Any) -> MosquittoProcess | EmbeddedBroker:
    if HAVE_MOSQUITTO:
        return MosquittoProcess(directory, **config).start()
    return EmbeddedBroker(directory).start()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess | EmbeddedBroker]:
    broker = _start_broker(tmp_path / "mosquitto")
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def mosquitto_session(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MosquittoProcess | EmbeddedBroker]:
    broker = _start_broker(tmp_path_factory.mktemp("mosquitto-session"))
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def embedded_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker(tmp_path_factory.mktemp("amqtt")).start()
    try:
        yield broker
    finally:
        broker.stop()


async def _ignore(topic: str, payload: bytes) -> None:
    return None


@pytest.fixture
async def make_transport() -> AsyncIterator[Callable[..., Awaitable[MqttTransport]]]:
    transports: list[MqttTransport] = []

    async def make(
        client_id: str,
        address: BrokerAddress,
        handler: MessageHandler | None = None,
        **kwargs: Any,
    ) -> MqttTransport:
        transport = MqttTransport(client_id, address, handler or _ignore, **kwargs)
        await transport.connect()
        transports.append(transport)
        return transport

    yield make
    for transport in reversed(transports):
        with contextlib.suppress(Exception):
            await transport.close(timeout=2.0)
