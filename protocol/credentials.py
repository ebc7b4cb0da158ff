"""Per-run MQTT accounts and what each account may do on the broker.

In a bidding system the obvious attack is one participant speaking as another: a forged bid or
a forged acceptance.  The topics carry the sender's short name (``i40/{ns}/to/{receiver}/{sender}``,
``i40/{ns}/cfp/{capability}/{sender}``, ``i40/{ns}/events/{sender}``), so once every agent logs in
under its own name the broker itself can refuse a publication under someone else's name, and the
receiver only has to check that the frame's ``sender`` belongs to the name in the topic.

This module is the one place that says who may do what; the mosquitto files
(``protocol.mosquitto``) and the embedded broker's plugin (``protocol.embedded_broker``) are both
generated from it, so the two brokers enforce the same rules:

* an **agent** writes only ``i40/{ns}/to/+/{me}``, ``i40/{ns}/cfp/+/{me}`` and ``i40/{ns}/events/{me}``;
  it reads its inbox ``i40/{ns}/to/{me}/+``, the calls for proposals of the capabilities it offers
  ``i40/{ns}/cfp/{capability}/+`` and the progress events ``i40/{ns}/events/+``;
* an **observer** (the run's recorder, ``twinbid observe``) reads ``i40/#`` and writes nothing.

Passwords are random (``secrets.token_urlsafe``), made for one run; the brokers store only salted
PBKDF2-SHA512 hashes (mosquitto's ``$7$`` format).  The clear passwords are kept in
``credentials.json`` (mode 0600) in the run's folder, because agent processes of the same run and
the observe commands need them; whoever can read the run folder can act as any agent.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from protocol.mosquitto import acl_rules_text, password_hash
from protocol.tokens import new_secret
from protocol.topics import ROOT, check_name, matches
from protocol.transport import BrokerAddress

__all__ = [
    "Account",
    "Credentials",
    "Grant",
    "PasswordBook",
    "agent_grant",
    "filter_within",
    "observer_grant",
    "verify_password_hash",
]

Access = Literal["read", "write", "subscribe"]

#: The observer account's default user name (the run's recorder and ``twinbid observe``).
OBSERVER = "observer"


@dataclass(frozen=True)
class Grant:
    """Topic filters an account may read (receive and subscribe to) and write (publish to)."""

    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()

    def allows(self, access: Access, topic: str) -> bool:
        """Would the broker let this account do ``access`` on ``topic``?

        ``read``/``write`` take a topic name; ``subscribe`` takes a topic filter, allowed when
        every topic it can match is readable (a filter within one of the read filters).
        """
        if access == "write":
            return _valid_name(topic) and any(matches(f, topic) for f in self.write)
        if access == "read":
            return _valid_name(topic) and any(matches(f, topic) for f in self.read)
        return any(filter_within(topic, f) for f in self.read)


def _valid_name(topic: str) -> bool:
    return bool(topic) and "+" not in topic and "#" not in topic and "\x00" not in topic


def filter_within(requested: str, allowed: str) -> bool:
    """True when every topic matched by the filter ``requested`` is matched by ``allowed``."""
    req, alw = requested.split("/"), allowed.split("/")
    for i, a in enumerate(alw):
        if a == "#":
            return True
        if i >= len(req):
            return False
        r = req[i]
        if r == "#":
            return False  # the request reaches deeper than this allowed level does
        if a != "+" and (r == "+" or r != a):
            return False
    return len(req) == len(alw)


def agent_grant(ns: str, name: str, capabilities: Iterable[str] = ()) -> Grant:
    """What agent ``name`` may do: speak only under its own name, hear its inbox, its calls, events."""
    check_name(ns, "namespace")
    check_name(name, "agent name")
    caps = sorted({check_name(c, "capability") for c in capabilities})
    base = f"{ROOT}/{ns}"
    return Grant(
        read=(f"{base}/to/{name}/+", *(f"{base}/cfp/{c}/+" for c in caps), f"{base}/events/+"),
        write=(f"{base}/to/+/{name}", f"{base}/cfp/+/{name}", f"{base}/events/{name}"),
    )


def observer_grant(ns: str | None = None) -> Grant:
    """An observer reads everything (of one namespace, or of every one) and publishes nothing."""
    return Grant(read=(f"{ROOT}/{ns}/#" if ns else f"{ROOT}/#",), write=())


# --------------------------------------------------------------------------- password hashes


def verify_password_hash(password: str, hashed: str) -> bool:
    """Check ``password`` against a ``$7$`` hash in constant time; a malformed hash never matches."""
    try:
        _, kind, iterations, salt_b64, key_b64 = hashed.split("$")
        if kind != "7" or not 1 <= int(iterations) <= 1_000_000:
            return False
        salt, key = base64.b64decode(salt_b64, validate=True), base64.b64decode(key_b64, validate=True)
    except (ValueError, TypeError):
        return False
    got = hashlib.pbkdf2_hmac(
        "sha512", password.encode(errors="surrogatepass"), salt, int(iterations), len(key)
    )
    return hmac.compare_digest(got, key)


# --------------------------------------------------------------------------- the accounts of a run


@dataclass
class Account:
    name: str
    password: str
    grant: Grant
    kind: Literal["agent", "observer"] = "agent"
    hash: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if not self.hash:
            self.hash = password_hash(self.password)


class PasswordBook(dict[str, str]):
    """``{agent name: password}`` as ``NodeConfig.passwords`` wants it, issuing accounts on demand.

    An agent that was not known when the run started (a product ordered by a vendor through the
    order-taking service) gets its account the moment its node asks for its password: ``get``
    calls ``issue(name)``, which adds the account and makes the broker reload its files.
    """

    def __init__(self, issue: Callable[[str], str] | None = None) -> None:
        super().__init__()
        self._issue = issue

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        if name not in self and self._issue is not None:
            try:
                check_name(name, "agent name")
            except ValueError:
                return default
            return self._issue(name)
        return super().get(name, default)

    def __reduce__(self) -> Any:  # worker processes get a plain dict (no issuing from there)
        return (dict, (dict(self),))


class Credentials:
    """The accounts of one run, and the broker files that enforce them.

    ``add_agent(name, capabilities)`` / ``add_observer()`` issue accounts; ``save()`` writes
    ``credentials.json`` (0600); ``write_mosquitto(dir)`` the password file and ACL;
    ``write_embedded(path)`` the embedded broker's accounts file.  ``on_change`` (set by whoever
    runs the broker) is called after an account was added once the files were written, so a
    running broker can reload them.
    """

    FILE = "credentials.json"

    def __init__(self, ns: str, directory: str | Path, *, observer: str = OBSERVER) -> None:
        self.ns = check_name(ns, "namespace")
        self.directory = Path(directory)
        self.observer = observer
        self.accounts: dict[str, Account] = {}
        self.passwords = PasswordBook(self._issue_on_demand)
        self.on_change: Callable[[], None] | None = None
        #: the run's HTTP token secret (protocol/tokens.py): AAS and registry writes are signed with it
        self.http_secret = new_secret()
        self._outputs: list[Callable[[], None]] = []
        #: Where the broker reads these accounts and how to make it reload them (set by
        #: ``start_broker``, saved with the accounts): lets another process of the run add one.
        self.broker: dict[str, Any] = {}

    # ---------------------------------------------------------------- issuing

    def add_agent(self, name: str, capabilities: Iterable[str] = ()) -> str:
        """Issue (or keep) agent ``name``'s account; return its password."""
        grant = agent_grant(self.ns, name, capabilities)
        old = self.accounts.get(name)
        if old is not None:
            old.grant = Grant(read=tuple(dict.fromkeys((*old.grant.read, *grant.read))), write=grant.write)
            return old.password
        self.accounts[name] = Account(name, secrets.token_urlsafe(24), grant)
        dict.__setitem__(self.passwords, name, self.accounts[name].password)
        return self.accounts[name].password

    def add_observer(self, name: str | None = None) -> str:
        name = name or self.observer
        if name in self.accounts:
            return self.accounts[name].password
        self.accounts[name] = Account(name, secrets.token_urlsafe(24), observer_grant(self.ns), "observer")
        return self.accounts[name].password

    def _issue_on_demand(self, name: str) -> str:
        password = self.add_agent(name)
        self.write()
        if self.on_change is not None:
            self.on_change()
        return password

    # ---------------------------------------------------------------- addresses

    def address(self, base: BrokerAddress, name: str) -> BrokerAddress:
        """``base`` (host, port, TLS) with ``name``'s user name and password."""
        return replace(base, username=name, password=self.accounts[name].password)

    def observer_address(self, base: BrokerAddress) -> BrokerAddress:
        self.add_observer()
        return self.address(base, self.observer)

    def grants(self) -> dict[str, Grant]:
        return {name: a.grant for name, a in self.accounts.items()}

    # ---------------------------------------------------------------- files

    def save(self) -> Path:
        """``credentials.json``: clear passwords for the run's own processes and observers (0600)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / self.FILE
        data = {
            "ns": self.ns,
            "observer": self.observer,
            "broker": self.broker,
            "http_secret": self.http_secret,
            "accounts": {
                n: {"password": a.password, "kind": a.kind, "read": a.grant.read, "write": a.grant.write}
                for n, a in self.accounts.items()
            },
        }
        _write_private(path, json.dumps(data, indent=1))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Credentials:
        """The accounts a run saved (``save()``), from another process of the run.

        Such a process can observe the run (``observer_address``), connect its agents
        (``passwords``) and issue accounts for new ones: the broker's files are rewritten and a
        mosquitto started by the run is told to reload them (SIGHUP to its process).
        """
        directory = Path(directory)
        data = json.loads((directory / cls.FILE).read_text())
        creds = cls(data["ns"], directory, observer=data.get("observer", OBSERVER))
        for name, a in data["accounts"].items():
            grant = Grant(tuple(a["read"]), tuple(a["write"]))
            creds.accounts[name] = Account(name, a["password"], grant, a.get("kind", "agent"))
            if a.get("kind", "agent") == "agent":
                dict.__setitem__(creds.passwords, name, a["password"])
        creds.broker = dict(data.get("broker") or {})
        creds.http_secret = data.get("http_secret") or creds.http_secret
        if creds.broker.get("mosquitto_dir"):
            creds.write_mosquitto(creds.broker["mosquitto_dir"])
        if creds.broker.get("embedded_file"):
            creds.write_embedded(creds.broker["embedded_file"])
        pid = creds.broker.get("reload_pid")
        if pid:
            creds.on_change = lambda: _hangup(int(pid))
        return creds

    def write_mosquitto(self, directory: str | Path) -> tuple[Path, Path]:
        """mosquitto's password file and ACL for these accounts; rewritten on every change."""
        directory = Path(directory)

        def write() -> None:
            directory.mkdir(parents=True, exist_ok=True)
            lines = "".join(f"{n}:{a.hash}\n" for n, a in self.accounts.items())
            _write_private(directory / "passwords", lines)
            _write_private(directory / "acl", acl_rules_text(self.grants()))

        self._outputs.append(write)
        self.broker["mosquitto_dir"] = str(directory.resolve())
        write()
        return directory / "passwords", directory / "acl"

    def write_embedded(self, path: str | Path) -> Path:
        """The embedded broker's accounts file: hashes and grants (read again when it changes)."""
        path = Path(path)

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            data = {
                n: {"hash": a.hash, "read": a.grant.read, "write": a.grant.write}
                for n, a in self.accounts.items()
            }
            _write_private(path, json.dumps(data))

        self._outputs.append(write)
        self.broker["embedded_file"] = str(path.resolve())
        write()
        return path

    def write(self) -> None:
        """Rewrite every file this object wrote so far (after an account was added)."""
        for output in self._outputs:
            output()
        if (self.directory / self.FILE).exists():
            self.save()


SECRET_FILE = "http_secret"


def save_http_secret(directory: str | Path, secret: str) -> Path:
    """Keep a run's token secret for its other processes when it has no accounts (0600)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_private(directory / SECRET_FILE, secret)
    return directory / SECRET_FILE


def run_http_secret(out: str | Path) -> str | None:
    """The token secret of the run whose output folder (or ``plant.json``) is ``out``, if saved."""
    out = Path(out)
    folder = (out if out.is_dir() else out.parent) / "broker"
    try:
        return json.loads((folder / Credentials.FILE).read_text()).get("http_secret")
    except (OSError, ValueError):
        pass
    try:
        return (folder / SECRET_FILE).read_text().strip() or None
    except OSError:
        return None


def load_grants(path: str | Path) -> dict[str, tuple[str, Grant]]:
    """Read an embedded-broker accounts file: ``{user: (hash, grant)}``."""
    data: Mapping[str, Any] = json.loads(Path(path).read_text())
    return {n: (a["hash"], Grant(tuple(a["read"]), tuple(a["write"]))) for n, a in data.items()}


def _hangup(pid: int) -> None:
    """Tell a mosquitto to reload its password file and ACL; give it a moment to do so."""
    import signal
    import time

    try:  # the pid may be stale (the broker restarted): never signal anything but a mosquitto
        if b"mosquitto" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return
        os.kill(pid, signal.SIGHUP)
    except OSError:
        return
    time.sleep(0.1)


def _write_private(path: Path, text: str) -> None:
    """Write atomically (a broker may read the file at any moment), readable by the owner only."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
