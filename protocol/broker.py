"""Which MQTT broker a run uses, and starting it.

``start_broker(url, workdir)``:

* ``None`` (or ``"embedded"``/``"amqtt"``): an embedded amqtt broker in a child process on a free
  loopback port: zero set-up, MQTT 3.1.1 only, no persistence (see ``protocol.embedded_broker``).
* ``"mosquitto"``: a private mosquitto on a free loopback port with a generated config and
  persistence in ``workdir``.
* an ``mqtt://`` / ``mqtts://`` URL: an external broker; nothing is started or stopped.

With ``credentials=`` (``protocol.credentials.Credentials``) a broker we start admits only the
run's accounts and enforces their topic rules (mosquitto: password file and per-user ACL, reloaded
by SIGHUP when an account is added; embedded: its accounts file, re-read when it changes).  With
``tls=`` (``protocol.mosquitto.MosquittoTLS``) its listener speaks TLS, and the returned address
trusts ``tls.cafile``.  Neither applies to an external broker, whose accounts are its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from protocol import lifeline
from protocol.mosquitto import MosquittoProcess, MosquittoTLS, find_mosquitto, free_port, wait_for_port
from protocol.transport import BrokerAddress

if TYPE_CHECKING:
    from protocol.credentials import Credentials

__all__ = [
    "SLOW_ROUND_TRIP",
    "BrokerStartError",
    "BrokerUnreachable",
    "EmbeddedBroker",
    "RunningBroker",
    "probe_broker",
    "start_broker",
]

_PROJECT_ROOT = Path(__file__).resolve().parent.parent


class BrokerStartError(RuntimeError):
    """A broker process did not come up."""


class BrokerUnreachable(RuntimeError):
    """No MQTT connection to the broker at an address (refused, timed out, not authorised)."""


#: A small message's round trip between two clients (sent, answered) longer than this on loopback
#: means the broker holds small packets back: Nagle's algorithm waiting for the client's delayed
#: acknowledgement, 40-90 ms on Linux, against well under a millisecond with ``set_tcp_nodelay true``.
SLOW_ROUND_TRIP = 0.02


async def probe_broker(address: BrokerAddress, *, rounds: int = 7, step_limit: float = 5.0) -> float | None:
    """Connect to the broker at ``address`` and time a small QoS 1 message answered by a second
    client on a private topic, as agents answer each other; the median round trip in seconds.

    Raises :class:`BrokerUnreachable` when no connection can be made. None when connected but the
    broker would not carry the probe (its ACL refused the private topic): nothing to measure.
    """
    import statistics
    import uuid

    from protocol.transport import MqttTransport, SubscriptionRefused

    tag = uuid.uuid4().hex[:12]
    ping, pong = f"twinbid-probe/{tag}/ping", f"twinbid-probe/{tag}/pong"
    answers: asyncio.Queue[float] = asyncio.Queue()

    async def asker_hears(_topic: str, _payload: bytes) -> None:
        answers.put_nowait(time.perf_counter())

    async def answerer_hears(_topic: str, payload: bytes) -> None:
        await answerer.publish(pong, payload)

    def client(role: str, handler: Any) -> MqttTransport:
        return MqttTransport(
            f"twinbid-probe-{role}-{tag}", address, handler, clean_start=True, session_expiry=0,
            connect_retries=1, connect_timeout=step_limit,
        )  # fmt: skip

    asker, answerer = client("a", asker_hears), client("b", answerer_hears)
    try:
        try:
            await asyncio.wait_for(asker.connect(), step_limit)
        except (OSError, TimeoutError, ConnectionError) as exc:
            reason = str(exc) or type(exc).__name__
            raise BrokerUnreachable(
                f"cannot reach the MQTT broker at {address.url(with_password=False)}: {reason}"
            ) from None
        await asyncio.wait_for(answerer.connect(), step_limit)
        try:
            await asker.subscribe(pong)
            await answerer.subscribe(ping)
        except SubscriptionRefused:
            return None
        times = []
        for _ in range(rounds):
            sent = time.perf_counter()
            await asker.publish(ping, b"twinbid probe")
            times.append(await asyncio.wait_for(answers.get(), step_limit) - sent)
        return statistics.median(times)
    finally:
        for c in (asker, answerer):
            with contextlib.suppress(Exception):
                await c.close(timeout=2.0)


class EmbeddedBroker:
    """amqtt 0.12 in a child process (``python -m protocol.embedded_broker``) on a free port.

    MQTT 3.1.1 only: ``address.protocol`` is ``"3.1.1"`` so ``auto`` transports skip the MQTT 5
    attempt, which amqtt would leave unanswered.
    """

    def __init__(
        self,
        workdir: str | Path | None = None,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        session_expiry: int = 3600,
        start_timeout: float = 20.0,
        python: str | None = None,
        accounts_file: str | Path | None = None,
        tls: MosquittoTLS | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.workdir = (
            Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="twinbid-amqtt-"))
        )
        self.host = host
        self._requested_port = port
        self.port: int = port or 0
        self.session_expiry = session_expiry
        self.start_timeout = start_timeout
        self.python = python or sys.executable
        self.accounts_file = Path(accounts_file).resolve() if accounts_file is not None else None
        self.tls = tls
        self.die_with_parent = die_with_parent  # see protocol.lifeline: a run's broker ends with its launcher
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "amqtt.log"

    @property
    def address(self) -> BrokerAddress:
        if self.tls is not None:
            return BrokerAddress(
                host=self.host, port=self.port, protocol="3.1.1", tls=True, tls_ca=self.tls.cafile
            )
        return BrokerAddress(host=self.host, port=self.port, protocol="3.1.1")

    @property
    def url(self) -> str:
        return self.address.url()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def __repr__(self) -> str:
        return f"<EmbeddedBroker {self.host}:{self.port} {'running' if self.running else 'stopped'}>"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def start(self) -> EmbeddedBroker:
        if self.running:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self._requested_port else 5
        for attempt in range(attempts):
            if not self.port:
                self.port = free_port(self.host)
            try:
                self._spawn()
                return self
            except BrokerStartError:
                if attempt == attempts - 1 or self._requested_port:
                    raise
                self.port = 0  # the port was taken meanwhile: try another one
        raise BrokerStartError("unreachable")  # pragma: no cover

    def _spawn(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH")) if p)
        self._log = open(self.log_path, "ab")
        cmd = [
            self.python,
            "-m",
            "protocol.embedded_broker",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--session-expiry",
            str(self.session_expiry),
        ]
        if self.accounts_file is not None:
            cmd += ["--accounts", str(self.accounts_file)]
        if self.tls is not None:
            cmd += ["--certfile", str(self.tls.certfile), "--keyfile", str(self.tls.keyfile)]
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            start_new_session=True,
            preexec_fn=lifeline.die_with_parent if self.die_with_parent else None,
        )
        try:
            self._wait_ready()
            wait_for_port(self.host, self.port, 5.0, alive=lambda: self.running)
        except Exception as exc:
            self.stop()
            raise BrokerStartError(
                f"embedded broker did not start on {self.host}:{self.port}: {exc}\n{self.log_tail()}"
            ) from None

    def _wait_ready(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + self.start_timeout
        line = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no READY line within {self.start_timeout:.0f}s")
                if not sel.select(remaining):
                    continue
                chunk = os.read(self._proc.stdout.fileno(), 256)
                if not chunk:
                    raise BrokerStartError(f"exited with code {self._proc.wait()}")
                line += chunk
        if not line.startswith(b"READY"):
            raise BrokerStartError(f"unexpected output {line!r}")

    def stop(self, timeout: float = 10.0) -> None:
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()
            self._proc = None
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(5)
        self.stop()

    def reload(self) -> None:
        """Nothing to do: the child reads its accounts file again whenever the file changed."""

    def restart(self) -> EmbeddedBroker:
        """Stop and start again on the same port.  amqtt keeps nothing: sessions are gone."""
        self.stop()
        self._requested_port = self.port
        for _ in range(50):
            try:
                return self.start()
            except BrokerStartError:
                time.sleep(0.1)
        return self.start()

    async def astart(self) -> EmbeddedBroker:
        return await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def arestart(self) -> EmbeddedBroker:
        return await asyncio.to_thread(self.restart)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> EmbeddedBroker:
        return await self.astart()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.astop()


BrokerKind = Literal["embedded", "mosquitto", "external"]


class RunningBroker:
    """The broker a run talks to: ``address`` for the transports, ``stop()``/``restart()``."""

    def __init__(self, kind: BrokerKind, address: BrokerAddress, process: Any = None) -> None:
        self.kind: BrokerKind = kind
        self._address = address
        self.process: EmbeddedBroker | MosquittoProcess | None = process
        # stop/restart (faults, chaos: from threads) and revive (the run's supervisor) take turns:
        # a broker being restarted on purpose is not also revived.
        self._lock = threading.RLock()

    @property
    def address(self) -> BrokerAddress:
        if self.process is not None:
            return self.process.address
        return self._address

    @property
    def url(self) -> str:
        return self.address.url()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def stop(self) -> None:
        """Stop a broker we started; an external broker is left alone."""
        if self.process is not None:
            with self._lock:
                self.process.stop()

    def reload(self) -> None:
        """Make a broker we started read its accounts again (after one was added)."""
        if self.process is not None:
            self.process.reload()

    def restart(self) -> None:
        if self.process is None:
            raise RuntimeError("an external broker cannot be restarted from here")
        with self._lock:
            self.process.restart()

    def revive(self) -> bool:
        """Start a broker we started again, on its port and with its persistence, if it ended
        without being stopped (killed, crashed); True if it did. A stopped one stays stopped."""
        if self.process is None:
            return False
        with self._lock:
            if self.process.pid is None or self.process.running:
                return False
            self.process.restart()
            return True

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def arestart(self) -> None:
        await asyncio.to_thread(self.restart)

    def __enter__(self) -> RunningBroker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RunningBroker {self.kind} {self.address}>"


def start_broker(
    url: str | None,
    workdir: Path,
    *,
    credentials: Credentials | None = None,
    tls: MosquittoTLS | None = None,
    **options: Any,
) -> RunningBroker:
    """Start (or just point at) the broker for a run; see the module docstring.

    ``options`` go to ``MosquittoProcess`` (and from there to ``mosquitto_config``) or to
    ``EmbeddedBroker``.  ``credentials``: only its accounts may connect, each within its grant
    (accounts added later are picked up by the running broker).  ``tls``: a TLS listener.
    """
    workdir = Path(workdir)
    if url is None or url.strip().lower() in ("", "embedded", "amqtt"):
        if credentials is not None:
            options["accounts_file"] = credentials.write_embedded(workdir / "broker" / "accounts.json")
        broker = EmbeddedBroker(workdir / "broker", tls=tls, **options).start()
        running = RunningBroker("embedded", broker.address, broker)
    elif url.strip().lower() == "mosquitto":
        if find_mosquitto() is None:
            raise BrokerStartError(
                "mosquitto is not installed (Debian: apt-get install mosquitto); "
                "leave the broker URL out to use the embedded broker"
            )
        if credentials is not None:
            pw, acl = credentials.write_mosquitto(workdir / "mosquitto" / "auth")
            options.update(password_file=pw, acl_file=acl, allow_anonymous=False)
        if tls is not None:
            options["tls"] = tls
        process = MosquittoProcess(workdir / "mosquitto", **options).start()
        running = RunningBroker("mosquitto", process.address, process)
    else:
        return RunningBroker("external", BrokerAddress.from_url(url))
    if credentials is not None:
        credentials.on_change = running.reload
        if running.kind == "mosquitto" and running.process is not None:
            credentials.broker["reload_pid"] = running.process.pid
        if (credentials.directory / credentials.FILE).exists():
            credentials.save()  # now with where the broker reads the accounts
    return running
