"""Child-process entry point of the embedded amqtt broker: ``python -m protocol.embedded_broker --port N``.

Started by ``protocol.broker.EmbeddedBroker`` when no broker URL is given.  It runs amqtt 0.12 in
a process of its own (in the agents' event loop it moved only ~1,500 messages a second and
competed with them for the loop), prints ``READY <host> <port>`` on stdout once it listens, and
shuts down cleanly on SIGTERM/SIGINT.

amqtt speaks MQTT 3.1.1 only; it does not answer an MQTT 5 CONNECT at all (it waits for bytes
that never come), so clients must connect with 3.1.1 (``BrokerAddress.protocol`` says so).
amqtt keeps no state on disk: a restart loses sessions and queued messages, and it drops a QoS 1
message it could not get acknowledged within 5 seconds.  Use mosquitto where that matters.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from protocol.credentials import Grant, load_grants, verify_password_hash

log = logging.getLogger("protocol.embedded_broker")


class SessionAuthPlugin(BaseAuthPlugin):
    """Accept every client without marking its session anonymous.

    amqtt's ``AnonymousAuthPlugin`` flags every session it lets in as anonymous, and amqtt
    discards anonymous sessions at disconnect and queues nothing for them while offline, so
    persistent sessions (clean start false), which the transport relies on, would not work.
    """

    @dataclass
    class Config:
        pass

    async def authenticate(self, *, session: Any) -> bool:
        return True


class _Accounts:
    """The accounts file written by ``Credentials.write_embedded``, read again whenever it changes.

    Accounts are added while a run goes on (products ordered by vendors); the file is replaced
    atomically, so a changed modification time or size means a complete new file.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self.users: dict[str, tuple[str, Grant]] = {}

    def current(self) -> dict[str, tuple[str, Grant]]:
        try:
            st = os.stat(self.path)
        except OSError:
            return self.users
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                self.users = load_grants(self.path)
                self._stamp = stamp
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("accounts file %s unreadable, keeping the previous accounts: %s", self.path, exc)
        return self.users


_ACCOUNTS: dict[str, _Accounts] = {}


def _accounts(path: str) -> _Accounts:
    if path not in _ACCOUNTS:
        _ACCOUNTS[path] = _Accounts(path)
    return _ACCOUNTS[path]


class CredentialAuthPlugin(SessionAuthPlugin):
    """Only the run's accounts get in: user name and password checked against PBKDF2 hashes.

    A client without a user name, with an unknown one or a wrong password is refused (CONNACK
    "bad user name or password").  Sessions are not marked anonymous, so persistent sessions work
    as with ``SessionAuthPlugin``.
    """

    @dataclass
    class Config:
        accounts_file: str = ""

    async def authenticate(self, *, session: Any) -> bool:
        users = _accounts(self.config.accounts_file).current()
        entry = users.get(session.username or "")
        if entry is None or not isinstance(session.password, str):
            return False
        return verify_password_hash(session.password, entry[0])


class GrantTopicPlugin(BaseTopicPlugin):
    """The same topic rules as the mosquitto ACL (``protocol.credentials.Grant``).

    amqtt asks on PUBLISH (a refused message is acknowledged but not delivered, as mosquitto does
    over MQTT 3.1.1), on SUBSCRIBE (refused with SUBACK 0x80) and before delivering each message to
    each subscriber (RECEIVE).
    """

    @dataclass
    class Config:
        accounts_file: str = ""

    async def topic_filtering(
        self, *, session: Any = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        if session is None or not topic:
            return False
        entry = _accounts(self.config.accounts_file).current().get(session.username or "")
        if entry is None:
            return False
        grant = entry[1]
        if action == Action.PUBLISH:
            return grant.allows("write", topic)
        if action == Action.SUBSCRIBE:
            return grant.allows("subscribe", topic)
        if action == Action.RECEIVE:
            return grant.allows("read", topic)
        return False


def broker_config(
    host: str,
    port: int,
    session_expiry: int,
    *,
    accounts_file: str | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
) -> dict[str, Any]:
    """amqtt's configuration: one listener; with ``accounts_file`` only the run's accounts, with
    their topic rules; with ``certfile``/``keyfile`` the listener speaks TLS."""
    listener: dict[str, Any] = {"type": "tcp", "bind": f"{host}:{port}"}
    if certfile:
        listener.update(ssl=True, certfile=certfile, keyfile=keyfile)
    plugins: dict[str, Any] = {f"{__name__}.SessionAuthPlugin": {}}
    if accounts_file:
        plugins = {
            f"{__name__}.CredentialAuthPlugin": {"accounts_file": accounts_file},
            f"{__name__}.GrantTopicPlugin": {"accounts_file": accounts_file},
        }
    return {
        "listeners": {"default": listener},
        "session_expiry_interval": session_expiry,
        "plugins": plugins,
    }


def _quiet_client_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # A client that gives up on an unanswered MQTT 5 CONNECT makes amqtt's connection callback
    # fail with OSError; that is expected (see the module docstring), not worth a traceback.
    if isinstance(context.get("exception"), (OSError, ConnectionError)):
        log.debug("client connection error: %s", context.get("exception"))
        return
    loop.default_exception_handler(context)


async def serve(host: str, port: int, session_expiry: int, **security: Any) -> None:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_quiet_client_errors)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    broker = Broker(broker_config(host, port, session_expiry, **security))
    await broker.start()
    print(f"READY {host} {port}", flush=True)
    try:
        await stop.wait()
    finally:
        await broker.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m protocol.embedded_broker", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--session-expiry", type=int, default=3600, help="seconds an offline session is kept")
    parser.add_argument("--accounts", help="accounts file (Credentials.write_embedded): only these log in")
    parser.add_argument("--certfile", help="TLS: the broker's certificate (PEM)")
    parser.add_argument("--keyfile", help="TLS: the broker's private key (PEM)")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("transitions").setLevel(logging.WARNING)
    loop_factory = None
    if not args.no_uvloop:
        try:  # optional, not a dependency: faster when present
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            pass
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(
                serve(
                    args.host,
                    args.port,
                    args.session_expiry,
                    accounts_file=args.accounts,
                    certfile=args.certfile,
                    keyfile=args.keyfile,
                )
            )
    except Exception as exc:  # bind errors and the like: say it on stderr, exit non-zero
        print(f"embedded broker failed: {exc!r}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
