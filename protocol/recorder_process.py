"""The recorder in a process of its own, for a run's launcher.

Why: in the launcher the recorder's paho network thread and writer thread hold the GIL for
every message of the plant, on the same interpreter as the launcher's share of the agents; each
time the event loop waits for the GIL back, a negotiation hop waits with it. In its own process it
costs the agents nothing but a core's time slice.

``RecorderProcess(...).start()`` / ``.stop()`` / ``.count`` stand in for :class:`Recorder`'s. The
child is ``python -m protocol.recorder_process``: it reads its settings as one JSON line on its
standard input (the broker password never shows on a command line), prints ``READY`` once
subscribed, and on a ``STOP <settle> <max_wait>`` line stops like ``Recorder.stop`` and prints
``STOPPED <count>``. Its standard input closing — the launcher died — stops it too, so a killed
run leaves no recorder behind. It ignores SIGINT and SIGTERM: a Ctrl-C, and a service manager's
SIGTERM (systemd's KillMode=control-group), reach the whole process group, and the launcher
decides when recording ends (after the agents have spoken).
"""

from __future__ import annotations

import dataclasses
import json
import os
import selectors
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from protocol.transport import BrokerAddress

_ROOT = str(Path(__file__).resolve().parents[1])  # `protocol` importable whatever the cwd


class RecorderProcess:
    """A :class:`~protocol.recorder.Recorder` in a child process (see the module docstring)."""

    def __init__(self, broker: BrokerAddress, ns: str, out: Path, **options: Any) -> None:
        """The arguments of :class:`~protocol.recorder.Recorder` (its keyword options as they are)."""
        self.settings: dict[str, Any] = {
            "broker": dataclasses.asdict(broker),
            "ns": ns,
            "out": str(out),
            "options": {k: str(v) if isinstance(v, Path) else v for k, v in options.items()},
        }
        self.count = 0  # messages recorded, known once stopped
        self.earlier = 0  # messages recorded by children that died (restart)
        self._lines_before: int | None = None  # lines the log held before this run's first child
        self.process: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 30.0) -> RecorderProcess:
        if self._lines_before is None:
            self._lines_before = _whole_lines(Path(self.settings["out"]))
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)
        )
        self.process = subprocess.Popen(
            [sys.executable, "-m", "protocol.recorder_process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(self.settings) + "\n")
        self.process.stdin.flush()
        line = self._read_line(timeout)
        if line != "READY":
            self._kill()
            raise ConnectionError(f"the recorder process did not start: {line or 'it exited'}")
        return self

    @property
    def died(self) -> bool:
        """The child ended without being stopped (killed, crashed)."""
        return self.process is not None and self.process.poll() is not None

    def restart(self, timeout: float = 30.0) -> RecorderProcess:
        """A new child after this one died: same client id and persistent session, so the broker
        kept what it received meanwhile (a broker with persistence). A dead child may have left
        half a line at the end of the log: it is cut off, and the whole lines are counted."""
        self._kill()
        self.process = None
        self.earlier = _whole_lines(Path(self.settings["out"]), cut=True) - (self._lines_before or 0)
        return self.start(timeout)

    def stop(self, settle: float = 0.3, max_wait: float = 60.0) -> None:
        proc = self.process
        if proc is None:
            return
        try:
            assert proc.stdin is not None
            proc.stdin.write(f"STOP {settle} {max_wait}\n")
            proc.stdin.flush()
            line = self._read_line(max_wait + 30)
            if line.startswith("STOPPED "):
                self.count = self.earlier + int(line.split()[1])
            proc.stdin.close()
            proc.wait(30)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            self._kill()
        self.process = None

    def _read_line(self, timeout: float) -> str:
        """The child's next line, or '' when it exits or says nothing within ``timeout``."""
        proc = self.process
        assert proc is not None and proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                return ""
        return proc.stdout.readline().strip()

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def _whole_lines(path: Path, *, cut: bool = False) -> int:
    """How many whole lines ``path`` holds; with ``cut``, a partial last line is removed."""
    try:
        with path.open("rb+") as f:
            data = f.read()
            if cut:
                f.truncate(data.rfind(b"\n") + 1)
    except OSError:
        return 0
    return data.count(b"\n")


def _main() -> None:
    from protocol.recorder import Recorder

    for sig in (signal.SIGINT, signal.SIGTERM):  # for the whole group: the launcher stops us
        signal.signal(sig, signal.SIG_IGN)
    settings = json.loads(sys.stdin.readline())
    options = settings["options"]
    if options.get("db") is not None:
        options["db"] = Path(options["db"])
    recorder = Recorder(BrokerAddress(**settings["broker"]), settings["ns"], Path(settings["out"]), **options)
    try:
        recorder.start()
    except Exception as exc:
        print(f"FAILED {exc}", flush=True)
        sys.exit(1)
    print("READY", flush=True)
    settle, max_wait = 0.3, 60.0
    for line in sys.stdin:  # until STOP, or EOF: the launcher is gone
        parts = line.split()
        if parts and parts[0] == "STOP":
            settle, max_wait = float(parts[1]), float(parts[2])
            break
    recorder.stop(settle, max_wait)
    try:
        print(f"STOPPED {recorder.count}", flush=True)
    except BrokenPipeError:
        # The launcher stopped listening (it is going away): the log is already closed and whole.
        # Point stdout at nothing so the interpreter's own flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    _main()
