"""An asset's own execution log: append-only JSON Lines, written through per record.

Why the asset keeps a log of its own, apart from the agent's database: it is the *physical truth*.
A restarted agent must learn from the equipment whether a step ran, not from its own records,
which may be one write behind. A real machine keeps that truth in its controller; the simulated
assets keep it here. Every entry is handed to the operating system (written and flushed) before
:meth:`ExecutionLog.append` returns, so an entry the asset acted on is never lost by a SIGKILL of
its process. That is the guarantee the run database gives too (SQLite WAL, synchronous=NORMAL):
neither survives a power cut unless asked to. An ``fsync`` per entry blocked the event loop for a
millisecond or more twice in every step (measured: the informConfirm-to-inform hop of a
zero-duration step went from 6.6 to 3.5 ms without it); ``durable=True`` restores it, for a log
that must survive the machine.

A crash can tear the *last* line (a write that had not returned). On open such a tail, which nobody
was told about, is cut off, so the next entry starts on a line of its own.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["ExecutionLog"]

log = logging.getLogger(__name__)


class ExecutionLog:
    """Append-only JSON Lines file of dict entries; ``path=None`` keeps them in memory only
    (fine for pure simulations, but then nothing survives a crash).

    One writer per file: one asset object in one process.
    """

    def __init__(self, path: str | os.PathLike[str] | None, *, durable: bool = False) -> None:
        self.path = Path(path) if path is not None else None
        self.durable = durable
        self.entries: list[dict[str, Any]] = []
        self._fh = None
        if self.path is not None:
            self._load()

    def _load(self) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        if not created:
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                cut = data.rfind(b"\n") + 1
                log.warning(
                    "%s: dropping a torn last entry (%d bytes) left by a crash", self.path, len(data) - cut
                )
                with open(self.path, "r+b") as fh:
                    fh.truncate(cut)
                    fh.flush()
                    os.fsync(fh.fileno())
                data = data[:cut]
            for lineno, line in enumerate(data.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    log.warning("%s:%d: unreadable entry skipped", self.path, lineno)
                    continue
                if isinstance(entry, dict):
                    self.entries.append(entry)
        self._fh = open(self.path, "ab")
        if created and self.durable:
            self._fsync_dir()

    def _fsync_dir(self) -> None:
        assert self.path is not None
        try:
            fd = os.open(self.path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def append(self, entry: dict[str, Any]) -> None:
        """Append one entry; on disk when this returns."""
        if self._fh is not None:
            line = json.dumps(entry, separators=(",", ":"), sort_keys=True, allow_nan=False)
            self._fh.write(line.encode() + b"\n")
            self._fh.flush()
            if self.durable:
                os.fsync(self._fh.fileno())
        self.entries.append(entry)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(list(self.entries))

    def __len__(self) -> int:
        return len(self.entries)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> ExecutionLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
