"""Private mosquitto brokers: config generator, password/ACL files, and a process launcher.

Used by the tests (a broker per test on a free port), by ``twinbid run`` when asked for
``mosquitto``, and by the benchmarks.  The settings that matter for twinbid, and why:

* ``set_tcp_nodelay true`` - off by default; with Nagle on, a request/response between agents
  with their own connections took ~88 ms instead of ~1 ms.
* ``max_queued_messages`` - mosquitto silently *drops* QoS 1 messages beyond this many queued
  for one client (default 1000).  A burst of calls for proposal to a slow agent hits it; the
  default here is 100,000.
* ``max_inflight_messages`` - the receive maximum mosquitto announces to MQTT 5 clients and the
  number of unacknowledged QoS 1 messages it sends a client at once (default 20).
* ``persistence`` - sessions, subscriptions and queued messages survive a broker restart (saved
  on a clean shutdown and every ``autosave_interval`` seconds).
* ``per_listener_settings false`` - one password file and one ACL for every listener.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import getpass
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol import lifeline
from protocol.transport import BrokerAddress

__all__ = [
    "MosquittoError",
    "MosquittoProcess",
    "MosquittoTLS",
    "acl_file_text",
    "acl_rules_text",
    "find_mosquitto",
    "free_port",
    "mosquitto_config",
    "password_hash",
    "wait_for_port",
    "write_acl_file",
    "write_password_file",
]

_SEARCH_PATH = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin", "/opt/homebrew/sbin")


class MosquittoError(RuntimeError):
    """mosquitto could not be found or did not start."""


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary (``$MOSQUITTO`` wins; /usr/sbin is often not on PATH)."""
    env = os.environ.get("MOSQUITTO")
    if env:
        return env if os.access(env, os.X_OK) else None
    found = shutil.which("mosquitto")
    if found:
        return found
    for directory in _SEARCH_PATH:
        candidate = os.path.join(directory, "mosquitto")
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0 and read it back)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 10.0, *, alive: Any = None) -> None:
    """Block until something accepts TCP connections on host:port (or raise ``TimeoutError``).

    ``alive`` is an optional callable returning False once the server process died, to fail fast.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if alive is not None and not alive():
                raise MosquittoError(f"process serving {host}:{port} exited") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.1f}s") from None
            time.sleep(0.02)


@dataclass(frozen=True)
class MosquittoTLS:
    """TLS settings of the listener (PEM files)."""

    certfile: str
    keyfile: str
    cafile: str | None = None
    require_certificate: bool = False
    use_identity_as_username: bool = False


def mosquitto_config(
    port: int,
    *,
    host: str = "127.0.0.1",
    persistence_dir: str | Path | None = None,
    password_file: str | Path | None = None,
    acl_file: str | Path | None = None,
    allow_anonymous: bool = True,
    max_queued_messages: int = 100_000,
    max_inflight_messages: int = 100,
    max_packet_size: int = 16 * 1024 * 1024,
    autosave_interval: int = 60,
    session_expiry: str | None = "1d",
    tls: MosquittoTLS | None = None,
    log_dest: str | None = None,
    user: str | None = None,
    extra: Iterable[str] = (),
) -> str:
    """Text of a mosquitto 2.0 config for one listener.

    ``max_inflight_messages`` defaults to 100 (mosquitto: 20): it is also the receive maximum
    offered to MQTT 5 clients, hence the publishing window of ``MqttTransport``; 100 lets one
    connection move well over 15,000 QoS 1 messages a second on loopback while still bounding
    the burst.  ``session_expiry`` becomes ``persistent_client_expiration`` (sessions of clients
    that never come back are dropped after that long; None keeps them for ever).  ``user`` is
    the account mosquitto switches to when started as root (give the current user so it can
    read the generated files).
    """
    if max_inflight_messages < 0 or max_queued_messages < 0:
        raise ValueError("limits must be >= 0")
    lines = [
        "# generated by protocol.mosquitto.mosquitto_config",
        "per_listener_settings false",
        f"listener {int(port)} {host}",
        "set_tcp_nodelay true",
        f"allow_anonymous {'true' if allow_anonymous else 'false'}",
        f"max_queued_messages {int(max_queued_messages)}",
        "max_queued_bytes 0",
        f"max_inflight_messages {int(max_inflight_messages)}",
        "queue_qos0_messages false",
        "allow_zero_length_clientid false",
        "sys_interval 0",
    ]
    if max_packet_size:
        lines.append(f"max_packet_size {int(max_packet_size)}")
    if session_expiry:
        lines.append(f"persistent_client_expiration {session_expiry}")
    if persistence_dir is not None:
        location = str(Path(persistence_dir).resolve())
        lines += [
            "persistence true",
            f"persistence_location {location.rstrip('/')}/",
            "persistence_file mosquitto.db",
            f"autosave_interval {int(autosave_interval)}",
        ]
    else:
        lines.append("persistence false")
    if password_file is not None:
        lines.append(f"password_file {Path(password_file).resolve()}")
    if acl_file is not None:
        lines.append(f"acl_file {Path(acl_file).resolve()}")
    if tls is not None:
        lines += [f"certfile {tls.certfile}", f"keyfile {tls.keyfile}"]
        if tls.cafile:
            lines.append(f"cafile {tls.cafile}")
        lines.append(f"require_certificate {'true' if tls.require_certificate else 'false'}")
        if tls.use_identity_as_username:
            lines.append("use_identity_as_username true")
    if log_dest is not None:
        lines.append(f"log_dest {log_dest}")
    lines += ["log_type error", "log_type warning", "log_type notice", "connection_messages false"]
    if user is not None:
        lines.append(f"user {user}")
    lines.extend(extra)
    return "\n".join(lines) + "\n"


def password_hash(password: str, *, salt: bytes | None = None, iterations: int = 101) -> str:
    """A mosquitto 2 password hash: ``$7$<iterations>$<salt b64>$<PBKDF2-HMAC-SHA512 b64>``.

    The same format ``mosquitto_passwd`` writes (12-byte salt, 64-byte key).
    """
    salt = salt if salt is not None else secrets.token_bytes(12)
    key = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, dklen=64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"


def write_password_file(path: str | Path, users: Mapping[str, str], *, use_tool: bool | None = None) -> Path:
    """Write a mosquitto password file for ``{user: password}``.

    Uses ``mosquitto_passwd -b`` when available (``use_tool=None``), else hashes in Python (same
    format, verified against mosquitto 2.0 by the tests).  User names must not contain ':'.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for name in users:
        if not name or ":" in name or "\n" in name:
            raise ValueError(f"invalid user name {name!r}")
    tool = shutil.which("mosquitto_passwd") if use_tool is not False else None
    if use_tool and tool is None:
        raise MosquittoError("mosquitto_passwd not found")
    if tool is not None:
        path.write_text("")
        for name, password in users.items():
            subprocess.run([tool, "-b", str(path), name, password], check=True, capture_output=True)
    else:
        path.write_text("".join(f"{name}:{password_hash(pw)}\n" for name, pw in users.items()))
    path.chmod(0o600)
    return path


def acl_file_text(
    *,
    observers: Iterable[str] = (),
    admins: Iterable[str] = (),
    root: str = "i40",
    anonymous_read: bool = False,
) -> str:
    """ACL of the architecture page: an agent writes only with its own name as the sender.

    Pattern rules (``%u`` = the user name, which is the agent's short name) let every agent:
    write ``i40/+/to/+/%u``, ``i40/+/cfp/+/%u``, ``i40/+/events/%u``; read its own inbox
    ``i40/+/to/%u/#``, every call for proposal ``i40/+/cfp/#`` and every event ``i40/+/events/#``.
    ``observers`` additionally read everything under ``i40/#``; ``admins`` read and write all of
    it.  The patterns apply to every user, so an observer too may write under its own name (never
    under another's).
    """
    r = root
    lines = ["# generated by protocol.mosquitto.acl_file_text"]
    if anonymous_read:
        lines.append(f"topic read {r}/#")
    for name in admins:
        lines += [f"user {name}", f"topic readwrite {r}/#"]
    for name in observers:
        lines += [f"user {name}", f"topic read {r}/#"]
    lines += [
        "",
        "# every authenticated agent, by its user name",
        f"pattern write {r}/+/to/+/%u",
        f"pattern write {r}/+/cfp/+/%u",
        f"pattern write {r}/+/events/%u",
        f"pattern read {r}/+/to/%u/#",
        f"pattern read {r}/+/cfp/#",
        f"pattern read {r}/+/events/#",
    ]
    return "\n".join(lines) + "\n"


def acl_rules_text(grants: Mapping[str, Any]) -> str:
    """An ACL with one block per user and no pattern rules: ``{user: grant}``.

    ``grant`` has ``read`` and ``write`` tuples of topic filters (``protocol.credentials.Grant``).
    Unlike the patterns of ``acl_file_text``, which apply to every user, per-user blocks let an
    observer read everything while writing nothing, and let each agent read only the calls for
    proposals of the capabilities it offers.  A user without a block may do nothing at all.
    """
    lines = ["# generated by protocol.mosquitto.acl_rules_text"]
    for name, grant in grants.items():
        if not name or any(c in name for c in " \n\r\t#+"):
            raise ValueError(f"invalid user name {name!r}")
        lines += ["", f"user {name}"]
        read, write = list(grant.read), list(grant.write)
        lines += [f"topic readwrite {t}" for t in read if t in write]
        lines += [f"topic read {t}" for t in read if t not in write]
        lines += [f"topic write {t}" for t in write if t not in read]
    return "\n".join(lines) + "\n"


def write_acl_file(path: str | Path, **kwargs: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(acl_file_text(**kwargs))
    return path


def _default_user() -> str | None:
    """mosquitto drops root privileges to user 'mosquitto', which cannot read our tmp files."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        try:
            return getpass.getuser()
        except Exception:
            return "root"
    return None


class MosquittoProcess:
    """A private mosquitto on a (free) port with a generated config in ``config_dir``.

    ``start()`` waits until the port accepts connections; ``restart()`` keeps port and
    persistence, so sessions and queued messages survive; ``kill()`` is a crash (SIGKILL, only
    what was saved by the last autosave survives).  Blocking methods have ``a``-prefixed
    coroutine twins that run in a thread, so an event loop keeps serving clients meanwhile.
    Keyword arguments are passed to ``mosquitto_config``.
    """

    def __init__(
        self,
        config_dir: str | Path,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        persistence: bool = True,
        binary: str | None = None,
        start_timeout: float = 10.0,
        die_with_parent: bool = False,
        **config: Any,
    ) -> None:
        self.config_dir = Path(config_dir)
        self.host = host
        self._requested_port = port
        self.port: int = port or 0
        self.persistence = persistence
        self.binary = binary or find_mosquitto()
        self.start_timeout = start_timeout
        self.config = config
        self.die_with_parent = die_with_parent  # see protocol.lifeline: a run's broker ends with its launcher
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    # ---------------------------------------------------------------- paths and addresses

    @property
    def config_path(self) -> Path:
        return self.config_dir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.config_dir / "mosquitto.log"

    @property
    def persistence_dir(self) -> Path:
        return self.config_dir / "data"

    @property
    def url(self) -> str:
        return self.address.url()

    @property
    def address(self) -> BrokerAddress:
        return self.address_for()

    def address_for(self, username: str | None = None, password: str | None = None) -> BrokerAddress:
        """Where clients connect; with a TLS listener, over TLS trusting the listener's ``cafile``."""
        tls: MosquittoTLS | None = self.config.get("tls")
        return BrokerAddress(
            host=self.host,
            port=self.port,
            username=username,
            password=password,
            protocol="5",
            tls=tls is not None,
            tls_ca=tls.cafile if tls is not None else None,
        )

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def log_tail(self, lines: int = 20, *, since: int = 0) -> str:
        """The last lines of the broker's log (written after byte offset ``since``)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def __repr__(self) -> str:
        return f"<MosquittoProcess {self.host}:{self.port} {'running' if self.running else 'stopped'}>"

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> MosquittoProcess:
        if self.running:
            return self
        if self.binary is None:
            raise MosquittoError("mosquitto binary not found (install the Debian package 'mosquitto')")
        self.config_dir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if (self._requested_port or self.port) else 5
        for attempt in range(attempts):
            if not self.port:
                self.port = free_port(self.host)
            self._write_config()
            offset = self._log_size()
            try:
                self._spawn(offset)
                return self
            except MosquittoError:
                self._reap()
                if attempt == attempts - 1 or "in use" not in self.log_tail(since=offset):
                    raise
                self.port = 0  # someone took the port between free_port() and bind(): try another
        raise MosquittoError("unreachable")  # pragma: no cover

    def _write_config(self) -> None:
        config = dict(self.config)
        if self.persistence:
            self.persistence_dir.mkdir(parents=True, exist_ok=True)
            config.setdefault("persistence_dir", self.persistence_dir)
        config.setdefault("user", _default_user())
        text = mosquitto_config(self.port, host=self.host, **config)
        self.config_path.write_text(text)

    def _spawn(self, log_offset: int) -> None:
        self._log_file = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal is for us, not for the broker
            preexec_fn=lifeline.die_with_parent if self.die_with_parent else None,
        )
        try:
            wait_for_port(self.host, self.port, self.start_timeout, alive=lambda: self.running)
        except (TimeoutError, MosquittoError) as exc:
            self.stop()
            raise MosquittoError(
                f"mosquitto did not start on {self.host}:{self.port}: {exc}\n{self.log_tail(since=log_offset)}"
            ) from None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (mosquitto saves its persistence file), SIGKILL after ``timeout``."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._reap()

    def kill(self) -> None:
        """Crash the broker (SIGKILL): nothing is saved."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        self._reap()

    def restart(self, *, crash: bool = False) -> MosquittoProcess:
        """Stop (or kill) and start again on the same port with the same persistence."""
        self.kill() if crash else self.stop()
        for _ in range(50):  # the old listening socket can linger for a moment
            offset = self._log_size()
            try:
                return self.start()
            except MosquittoError:
                if "in use" not in self.log_tail(since=offset):
                    raise
                time.sleep(0.1)
        return self.start()

    def _reap(self) -> None:
        if self._log_file is not None:
            with contextlib.suppress(OSError):
                self._log_file.close()
            self._log_file = None
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None

    def reload(self, settle: float = 0.1) -> None:
        """Make the running broker read its password file and ACL again (SIGHUP).

        mosquitto reloads at its next main-loop turn; ``settle`` seconds are given for that, so a
        client of a just-added account that connects right after is not refused.
        """
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGHUP)
            if settle:
                time.sleep(settle)

    async def astart(self) -> MosquittoProcess:
        return await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def arestart(self, *, crash: bool = False) -> MosquittoProcess:
        return await asyncio.to_thread(lambda: self.restart(crash=crash))

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> MosquittoProcess:
        return await self.astart()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.astop()
