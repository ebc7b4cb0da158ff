"""Child processes that end with the process that started them, however it ends.

A run's launcher starts a broker, a registry, a recorder, a fork server and agent workers. When
the launcher is killed (SIGKILL, OOM killer, a crash) nothing of it runs any more to stop them,
and orphans left behind go on writing to the run's database — a resumed run then works beside
them and executes steps twice. So every child watches its launcher itself:

* :func:`die_with_parent` — for a program we do not write (mosquitto): given as ``preexec_fn``
  to :class:`subprocess.Popen`, it asks the kernel (``prctl(PR_SET_PDEATHSIG)``) to send the
  child a signal when its parent dies. Linux ties that to the parent *thread* that forked: start
  such a child from a thread that lives as long as the process (the main thread, or a worker of
  the event loop's default executor, which lives until the loop closes).
* :func:`exit_with` — for our own Python children, whose parent may not be the launcher (a
  worker is forked by the fork server): a daemon thread waits on a ``pidfd`` of the launcher,
  which becomes readable when the launcher is gone, and ends this process at once.

Both are no-ops where the kernel cannot help (not Linux); the stdin-EOF watch of the recorder and
the registry covers those two anywhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable

__all__ = ["die_with_parent", "exit_with", "process_start_ticks"]

_PR_SET_PDEATHSIG = 1
_prctl: Callable[..., int] | None = None
if sys.platform.startswith("linux"):  # resolved here, in the parent: a preexec_fn should not load libraries
    with contextlib.suppress(OSError, AttributeError):
        _prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """``preexec_fn``: the kernel sends this child ``sig`` when the thread that forked it ends.

    SIGTERM by default: mosquitto saves its persistence on SIGTERM. If the parent is already gone
    between fork and this call (its parent is then no longer the one that forked it), the child
    sends the signal to itself.
    """
    if _prctl is None:
        return
    parent = os.getppid()
    _prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if parent == 1:  # orphaned before the request took effect
        os.kill(os.getpid(), sig)


def exit_with(pid: int, *, code: int = 70, on_gone: Callable[[], None] | None = None) -> bool:
    """End this process (``os._exit(code)``, or ``on_gone()``) as soon as process ``pid`` ends.

    Returns False when ``pid`` is already gone (the caller should stop at once) and True once the
    watch is in place. ``os._exit`` rather than a clean stop: this process's state is in its
    journal (write before send), exactly as after a SIGKILL, and every moment it goes on after its
    launcher died it may act beside the run that resumes it.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except (AttributeError, OSError):  # no pidfd (old kernel, not Linux): poll the pid instead
        fd = None

    def wait() -> None:
        if fd is not None:
            select.select([fd], [], [])
        else:
            while _alive(pid):
                time.sleep(0.2)
        if on_gone is not None:
            on_gone()
        else:
            os._exit(code)

    threading.Thread(target=wait, daemon=True, name=f"exit-with-{pid}").start()
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot, ``/proc/PID/stat`` field 22), or None if no
    such process: with the pid it names one process, whatever later reuses the number."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after its last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        if fields[0] == b"Z":  # a zombie has ended; only its exit status waits to be collected
            return None
        return int(fields[19])
    except (IndexError, ValueError):
        return None
