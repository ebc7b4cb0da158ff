"""The registry in a process of its own, started and stopped by the launcher.

Why: run inside the launcher, the registry shared one event loop (and one GIL) with the
launcher's share of the agents and the recorder; a swarm of thousands registering and looking
each other up saturated that loop, answers outlasted the clients' timeouts and agents failed to
start. In its own process it has its own loop and, on a machine with more than one core, its own
CPU.

``url = await RegistryProcess(db_url).start()`` ... ``await registry.stop()``. The child is
``python -m registry.process --db URL``: it binds a free port, prints ``READY <url>`` and serves
until its standard input closes — which also happens when the launcher dies, so a killed run
leaves no registry behind. It ignores SIGINT and SIGTERM: a Ctrl-C at the terminal, and a service
manager's SIGTERM (systemd's KillMode=control-group), reach the whole process group, and the
launcher decides when the registry stops (after the agents).
``twinbid registry serve`` is the same service in the foreground.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from protocol.tokens import NS_ENV, SECRET_ENV

READY = "READY "
_ROOT = str(Path(__file__).resolve().parents[1])  # `registry` importable whatever the cwd


class RegistryProcess:
    """A registry child process (see the module docstring); ``base_url`` once started."""

    def __init__(
        self,
        db_url: str | None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        http_secret: str | None = None,
        ns: str | None = None,
    ) -> None:
        self.db_url = db_url
        # the run's token secret reaches the child through its environment (readable by its owner
        # only), never its command line (readable by every local user)
        self.http_secret = http_secret
        self.ns = ns
        self.host = host
        self.port = port
        self.log_level = log_level
        self.base_url = ""
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self, timeout: float = 60.0) -> str:  # noqa: ASYNC109 - a plain deadline
        """Start the child and return its URL once it listens."""
        cmd = [sys.executable, "-m", "registry.process", "--host", self.host, "--port", str(self.port)]
        cmd += ["--log-level", self.log_level]
        if self.db_url:
            cmd += ["--db", self.db_url]
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)
        )
        if self.http_secret and self.ns:
            env.update({SECRET_ENV: self.http_secret, NS_ENV: self.ns})
        self.process = await asyncio.to_thread(
            subprocess.Popen, cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        stdout = self.process.stdout
        assert stdout is not None
        try:
            line = await asyncio.wait_for(asyncio.to_thread(stdout.readline), timeout)
        except TimeoutError:
            await self.stop()
            raise RuntimeError(f"the registry process did not start within {timeout:g} s") from None
        text = line.decode(errors="replace").strip()
        if not text.startswith(READY):
            code = self.process.poll()
            await self.stop()
            raise RuntimeError(f"the registry process failed to start (exit {code}): {text!r}")
        self.base_url = text[len(READY) :]
        return self.base_url

    async def stop(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - a plain deadline
        """Close its standard input (it stops serving and exits); kill it if it does not."""
        proc, self.process = self.process, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            if proc.stdin:
                proc.stdin.close()
        try:
            await asyncio.to_thread(proc.wait, timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)
        if proc.stdout:
            proc.stdout.close()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def died(self) -> bool:
        """The child ended without being stopped (killed, crashed)."""
        return self.process is not None and self.process.poll() is not None

    async def restart(self, attempts: int = 50) -> str:
        """Start it again on the same URL (its descriptors are in its database): agents keep the
        URL they were given. The old socket may linger a moment, so a few tries."""
        if self.base_url:
            self.port = int(self.base_url.rsplit(":", 1)[1].split("/", 1)[0])
        await self.stop()
        for _ in range(attempts - 1):
            try:
                return await self.start()
            except RuntimeError:
                await asyncio.sleep(0.1)
        return await self.start()


async def _child(host: str, port: int, db_url: str | None, log_level: str) -> None:
    from protocol.tokens import tokens_from_env
    from registry.service import RegistryServer

    server = RegistryServer(db_url, log_level=log_level, tokens=tokens_from_env())
    url = await server.start(host, port)
    loop = asyncio.get_running_loop()
    closed = asyncio.Event()

    def watch_stdin() -> None:  # EOF: the launcher asked us to stop, or died
        with contextlib.suppress(OSError, ValueError):
            while sys.stdin.buffer.read(4096):
                pass
        loop.call_soon_threadsafe(closed.set)

    threading.Thread(target=watch_stdin, daemon=True, name="stdin-watch").start()
    sys.stdout.write(f"{READY}{url}\n")
    sys.stdout.flush()
    os.dup2(
        sys.stderr.fileno(), sys.stdout.fileno()
    )  # nobody reads the pipe any more: a full one would block us
    try:
        await closed.wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> None:
    import logging

    ap = argparse.ArgumentParser(description="the registry as a child process (see registry/process.py)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--db", default=None)
    ap.add_argument("--log-level", default="warning")
    args = ap.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):  # for the whole group: the launcher stops us
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=args.log_level.upper())
    asyncio.run(_child(args.host, args.port, args.db, args.log_level))


if __name__ == "__main__":
    main()
