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
import signal
import sys
from dataclasses import dataclass
from typing import Any

from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin

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


def broker_config(host: str, port: int, session_expiry: int) -> dict[str, Any]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "session_expiry_interval": session_expiry,
        "plugins": {f"{__name__}.SessionAuthPlugin": {}},
    }


def _quiet_client_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # A client that gives up on an unanswered MQTT 5 CONNECT makes amqtt's connection callback
    # fail with OSError; that is expected (see the module docstring), not worth a traceback.
    if isinstance(context.get("exception"), (OSError, ConnectionError)):
        log.debug("client connection error: %s", context.get("exception"))
        return
    loop.default_exception_handler(context)


async def serve(host: str, port: int, session_expiry: int) -> None:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_quiet_client_errors)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    broker = Broker(broker_config(host, port, session_expiry))
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
            runner.run(serve(args.host, args.port, args.session_expiry))
    except Exception as exc:  # bind errors and the like: say it on stderr, exit non-zero
        print(f"embedded broker failed: {exc!r}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
