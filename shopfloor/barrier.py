"""One virtual time for a plant split over several processes: a conservative time barrier.

A virtual clock (``shopfloor/clock.py``) jumps to its next timer as soon as its own process is
quiet. Split over processes that is wrong twice over: a process would move on while another is
still answering it, and each process would fire its timers in its own order. The schedule then
depends on how the plant is split and on the machine's speed. Here every process keeps a
:class:`SplitVirtualClock` (a participant) and one :class:`TimeBarrier` (the coordinator, in the
launcher) decides, for the whole plant, when time moves and which timer fires next:

* each participant, whenever it has settled quiet, reports ``(gen, quiet, sent, received, head)``:
  a generation that changes with every local event, whether it is quiet, how many deliveries it
  has sent to agents in other processes and received from them, and the sort key of its next
  timer;
* when every participant reports quiet and the plant's deliveries balance (sent == received),
  the coordinator probes all of them once more; if every answer is unchanged (same generation,
  still quiet), nothing happened between the reports and the probe, so at the probe's instant the
  whole plant was quiet with nothing in flight (Mattern's counting argument: the counts cannot
  balance while a message travels, and nobody can wake up without a message or a timer);
* it then grants exactly one timer, the plant's earliest by ``(when, order, step, share, seq)``,
  and tells every participant the new time. One timer at a time with global quiescence between
  timers is what a single virtual clock does, so the same scenario gives the same schedule with
  one process or several. ``step`` (how many timers the plant has fired when a timer was
  scheduled) stands in for the single clock's scheduling sequence across processes.

The coordinator is sans-I/O: :meth:`TimeBarrier.receive` takes a participant's message and returns
the messages to send (``(share, message)``; share ``None`` means every participant). The
participant's link is any callable that carries a tuple to the coordinator; ``PipeLink`` is the one
over a multiprocessing connection that the launcher's worker processes use.

What a split clock cannot see it refuses rather than guesses (see docs/shopfloor.md): deliveries
are counted per process from the agents' subscriptions, so agents must not appear or subscribe
after start-up; the launcher refuses kills and order intake in a split virtual run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .clock import VirtualClock

__all__ = ["PipeLink", "Report", "SplitVirtualClock", "TimeBarrier"]

log = logging.getLogger(__name__)

#: A participant's state: (generation, quiet, sent, received, head); head is the next timer's key or None.
Report = tuple[int, bool, int, int, tuple | None]
Outgoing = list[tuple[int | None, tuple]]


@dataclass
class TimeBarrier:
    """The coordinator: knows every participant's last report, probes, grants one timer at a time.

    Messages in: ``("filters", share, [topic filters])`` once a participant's agents are all up,
    ``("report", share, report)``, ``("answer", share, probe, report)``.
    ``("at", share, step)`` (the share's clock reads the new time).
    Messages out: ``("table", {share: filters})`` once all filters are in, ``("probe", n)``,
    ``("advance", step, when, share)`` (everybody's time is ``when``; ``share`` will fire its next
    timer), and ``("fire", step)`` to that share once every share is at the new time.
    """

    shares: frozenset[int]
    stall_timeout: float = 30.0
    latest: dict[int, Report | None] = field(default_factory=dict)
    filters: dict[int, list[str]] = field(default_factory=dict)
    step: int = 0
    now: float = 0.0
    probe: int = 0
    probing: dict[int, Report] | None = None
    answered: set[int] = field(default_factory=set)
    granting: tuple[int, int] | None = None  # (step, share) until every share is at the new time
    acked: set[int] = field(default_factory=set)
    #: True while the whole plant is quiet with no timer left (nothing will ever happen again)
    idle: bool = False
    #: how many times the watchdog forgave deliveries that never arrived
    stalls: int = 0
    debt: int = 0  # deliveries forgiven by the watchdog
    _last_progress: float = field(default_factory=time.monotonic)

    @property
    def started(self) -> bool:
        return set(self.filters) >= self.shares

    def receive(self, message: tuple) -> Outgoing:
        kind, share = message[0], message[1]
        if share not in self.shares:
            log.error("time barrier: message from unknown share %r ignored", share)
            return []
        self._last_progress = time.monotonic()
        if kind == "filters":
            self.filters[share] = list(message[2])
            if self.started:
                return [(None, ("table", dict(self.filters)))]
            return []
        if kind == "report":
            self.latest[share] = message[2]
            self.idle = False  # a report means something changed there
            if self.probing is not None and message[2] != self.probing[share]:
                self.probing = None  # something happened: this probe cannot confirm quiescence
            return self._maybe_probe()
        if kind == "answer":
            probe, report = message[2], message[3]
            if self.probing is None or probe != self.probe:
                return []  # an answer to a probe already given up
            self.latest[share] = report
            if report != self.probing[share]:
                self.probing = None
                return self._maybe_probe()
            self.answered.add(share)
            if self.answered >= self.shares:
                return self._grant()
            return []
        if kind == "at":
            if self.granting is None or message[2] != self.granting[0]:
                return []
            self.acked.add(share)
            if self.acked >= self.shares:
                step, fire = self.granting
                self.granting = None
                return [(fire, ("fire", step))]
            return []
        log.error("time barrier: unknown message %r ignored", kind)
        return []

    def _balanced(self) -> bool:
        reports = [self.latest.get(s) for s in self.shares]
        if any(r is None or not r[1] for r in reports):
            return False
        sent = sum(r[2] for r in reports)  # type: ignore[index]
        received = sum(r[3] for r in reports)  # type: ignore[index]
        return sent == received + self.debt

    def _maybe_probe(self) -> Outgoing:
        if self.probing is not None or self.granting is not None or not self.started or not self._balanced():
            return []
        self.probing = {s: self.latest[s] for s in self.shares}  # type: ignore[misc]
        self.answered = set()
        self.probe += 1
        return [(None, ("probe", self.probe))]

    def _grant(self) -> Outgoing:
        assert self.probing is not None
        heads = [(r[4], s) for s, r in self.probing.items() if r[4] is not None]
        self.probing = None
        if not heads:
            self.idle = True
            return []
        self.idle = False
        key, share = min(heads)
        self.step += 1
        self.now = max(self.now, key[0])
        # The granted share reports afresh once its timer has run; until then nothing else moves.
        self.latest[share] = None
        self.granting, self.acked = (self.step, share), set()
        return [(None, ("advance", self.step, self.now, share))]

    def check_stall(self) -> Outgoing:
        """Called now and then: a plant that stays quiet but unbalanced for ``stall_timeout`` wall
        seconds lost a delivery (or counted one twice); forgive it loudly and move on, as the
        single virtual clock's watchdog does."""
        if time.monotonic() - self._last_progress < self.stall_timeout or self.probing is not None:
            return []
        reports = [self.latest.get(s) for s in self.shares]
        if not self.started or any(r is None or not r[1] for r in reports):
            return []
        sent = sum(r[2] for r in reports)  # type: ignore[index]
        received = sum(r[3] for r in reports)  # type: ignore[index]
        if sent == received + self.debt:
            return []
        self.stalls += 1
        log.warning(
            "time barrier stalled at t=%.3f: %d deliveries sent to other processes, %d received, no "
            "progress for %.1f wall s; forcing progress (stall #%d)",
            self.now, sent, received + self.debt, self.stall_timeout, self.stalls,
        )  # fmt: skip
        self.debt = sent - received
        self._last_progress = time.monotonic()
        return self._maybe_probe()


class SplitVirtualClock(VirtualClock):
    """A participant: a virtual clock whose timers fire only when the plant's barrier grants them.

    Between grants it behaves like a :class:`VirtualClock` (activities, pending deliveries inside
    the process, settling), and additionally counts deliveries to and from other processes
    (:meth:`count_sent`, :meth:`count_received`). Give it its link with :meth:`attach` before
    :meth:`start`, and call :meth:`ready` with its agents' topic filters once they are all up.
    """

    def __init__(
        self, share: int, *, origin_epoch_ms: int | None = None, stall_timeout: float = 30.0
    ) -> None:
        super().__init__(origin_epoch_ms=origin_epoch_ms, stall_timeout=stall_timeout)
        self.share = share
        self._link: Callable[[tuple], None] | None = None
        self._sent = 0
        self._received = 0
        self._step = 0
        self._fire = False
        self._routed = False
        self._last_report: Report | None = None
        #: called with {share: topic filters} of every process once the barrier has them all
        self.on_table: Callable[[dict[int, list[str]]], None] | None = None

    def attach(self, link: Callable[[tuple], None], share: int | None = None) -> None:
        self._link = link
        if share is not None:
            self.share = share

    # -- counting deliveries across processes --------------------------------------------------
    def count_sent(self, n: int) -> None:
        if n:
            self._sent += n
            self._changed()

    def count_received(self, n: int = 1) -> None:
        if n:
            self._received += n
            self._changed()

    def ready(self, filters: Iterable[str]) -> None:
        """Every agent of this process is up and subscribed: tell the barrier what they listen to."""
        self._send(("filters", self.share, sorted(filters)))  # one entry per subscriber

    async def wait_idle(self) -> None:
        raise NotImplementedError("a split virtual clock is idle only plant-wide: ask its TimeBarrier")

    # -- timers ----------------------------------------------------------------------------
    def _next_seq(self) -> tuple[int, int]:
        # (plant step, local seq): comparable across processes by the plant step, which is what a
        # single clock's sequence number orders by.
        return (self._step, next(self._seq))

    def _head(self) -> tuple | None:
        if self.next_timer_at() is None:
            return None
        t = self._heap[0]
        return (t.when, t.sort_key(), t.seq[0], self.share, t.seq[1])

    def _report(self) -> Report:
        return (self._gen, self._quiet(), self._sent, self._received, self._head())

    def _send(self, message: tuple) -> None:
        if self._link is None:
            raise RuntimeError("SplitVirtualClock: no link to the time barrier (call attach() first)")
        self._link(message)

    # -- messages from the barrier ---------------------------------------------------------
    def receive(self, message: tuple) -> None:
        kind = message[0]
        if kind == "probe":
            self._send(("answer", self.share, message[1], self._report()))
        elif kind == "advance":
            _, step, when, _share = message
            self._step = step
            if when > self._now:
                self._now = when
            # Acknowledged before the granted share fires: nobody may see a message of the next
            # instant while its own clock still reads the last one.
            self._send(("at", self.share, step))
        elif kind == "fire":
            self._fire = True
            self._changed()
        elif kind == "table":
            if self.on_table is not None:
                self.on_table(message[1])
            self._routed = True
            self._changed()

    # -- driver (VirtualClock._drive calls this whenever the process is quiet and settled) -------
    async def _on_quiet(self) -> None:
        assert self._wake is not None
        if self._fire:
            self._fire = False
            timer = self._pop_timer()
            self._last_report = None  # the barrier waits for a fresh report after every grant
            if timer is None:  # cannot happen: the grant named our head, and we were quiet since
                log.error("time barrier granted share %d a timer it does not have", self.share)
                return
            self.timers_fired += 1
            self._invoke(timer)
            self._changed()
            return
        if self._routed:
            report = self._report()
            if report != self._last_report:
                self._last_report = report
                self._send(("report", self.share, report))
        self._wake.clear()
        if not self._fire:
            await self._wake.wait()


class PipeLink:
    """A participant's end of a ``multiprocessing`` connection to the barrier, on the event loop."""

    def __init__(self, conn: Any, clock: SplitVirtualClock) -> None:
        self.conn = conn
        self.clock = clock
        self._loop: asyncio.AbstractEventLoop | None = None

    def __call__(self, message: tuple) -> None:
        with contextlib.suppress(OSError, EOFError):  # the launcher went away: the run is ending
            self.conn.send(message)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.conn.fileno(), self._readable)

    def stop(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.conn.fileno())
            self._loop = None

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                self.clock.receive(self.conn.recv())
        except (OSError, EOFError):
            self.stop()


class BarrierHost:
    """The coordinator on the launcher's event loop: pipes to worker processes, a direct line to
    the launcher's own participant, and the stall watchdog."""

    def __init__(self, barrier: TimeBarrier) -> None:
        self.barrier = barrier
        self._local: dict[int, SplitVirtualClock] = {}
        self._conns: dict[int, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: asyncio.Task | None = None
        #: why the barrier cannot go on (a participant's process went away), or None
        self.failure: str | None = None
        self._closing = False

    def closing(self) -> None:
        """The run is ending: processes that go away now are stopping, not failing."""
        self._closing = True

    def local(self, clock: SplitVirtualClock) -> None:
        self._local[clock.share] = clock
        clock.attach(lambda m: self._loop.call_soon(self._deliver, m) if self._loop else None)

    def add(self, share: int, conn: Any) -> None:
        old = self._conns.pop(share, None)
        if old is not None and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(old.fileno())
        self._conns[share] = conn
        if self._loop is not None:
            self._loop.add_reader(conn.fileno(), self._readable, share, conn)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for share, conn in self._conns.items():
            self._loop.add_reader(conn.fileno(), self._readable, share, conn)
        self._watchdog = self._loop.create_task(self._watch(), name="time-barrier-watchdog")

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        if self._loop is not None:
            for conn in self._conns.values():
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(conn.fileno())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._send(self.barrier.check_stall())

    def _readable(self, share: int, conn: Any) -> None:
        try:
            while conn.poll():
                self._deliver(conn.recv())
        except (OSError, EOFError):
            assert self._loop is not None
            self._loop.remove_reader(conn.fileno())
            if self._conns.get(share) is conn and not self._closing:
                self.failure = f"the process of share {share} went away; the split virtual clock cannot go on"
                log.error("time barrier: %s", self.failure)

    def _deliver(self, message: tuple) -> None:
        self._send(self.barrier.receive(message))

    def _send(self, outgoing: Outgoing) -> None:
        for share, message in outgoing:
            targets = self.barrier.shares if share is None else (share,)
            for s in sorted(targets):
                clock = self._local.get(s)
                if clock is not None:
                    assert self._loop is not None
                    self._loop.call_soon(clock.receive, message)
                    continue
                conn = self._conns.get(s)
                if conn is not None:
                    with contextlib.suppress(OSError, EOFError):
                        conn.send(message)
