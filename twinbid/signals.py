"""SIGTERM stops a command as Ctrl-C does, from a terminal, a script or a service manager.

``kill PID``, ``timeout``, systemd and docker stop a process with SIGTERM. Python's default for
it is to die on the spot — no record written, children of a run left to their lifelines. Turning
SIGTERM into SIGINT is not enough either: a shell that runs a command in the background (``cmd &``
in a script) starts it with SIGINT ignored, so the re-raised signal is ignored too. Here SIGTERM
cancels the command's main task directly, which is what asyncio does for Ctrl-C: every ``finally``
runs and the command stops its own way.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_stoppable(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, with SIGTERM cancelling ``main`` (raises CancelledError if ``main``
    lets the cancellation out, KeyboardInterrupt on Ctrl-C as ``asyncio.run`` does)."""

    async def guarded() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await main
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    return asyncio.run(guarded())
