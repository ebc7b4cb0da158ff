"""Simulated time for twinbid: one abstract :class:`Clock`, three kinds.

Everything time-dependent in the agents (processing times, transport times, bid deadlines,
schedules, the documentation) is expressed in *simulated time units* (a float; one unit is
nominally one second) and goes through a clock, never through ``time.time()`` or
``asyncio.sleep()`` directly. That is what lets the same agent code run

* ``real``        -- 1 unit = 1 wall second (plants, demos);
* ``accelerated`` -- ``time_scale`` wall *milliseconds* per unit (10 -> 100 units per wall second),
                     so a shift of production runs in minutes;
* ``virtual``     -- discrete-event: simulated time jumps to the next due timer as soon as nothing
                     is in flight and nobody is busy. A run's schedule then does not depend on how fast
                     the machine is, and two runs of the same scenario give the same trace.

The virtual clock needs to know when the system is quiet. It cannot see MQTT messages travelling
through a broker, so the agents tell it (see ``docs/shopfloor.md``):

* a publisher calls :meth:`Clock.add_pending` with the number of local handlers that will receive
  the message *before* publishing it;
* a receiver enters :meth:`Clock.activity` and *then* calls :meth:`Clock.done_pending`, and stays in
  the activity until its handler has finished;
* a timer callback that returns a coroutine, a task started with :meth:`Clock.spawn`, and a sleeper
  that has just been woken count as busy automatically; a task waiting in :meth:`Clock.sleep` does
  not (its activities are suspended while it sleeps, so holding ``activity()`` across a clock sleep
  cannot deadlock).

For the real and accelerated clocks all of this is a cheap no-op, so agents call it unconditionally.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import inspect
import itertools
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "CLOCK_KINDS",
    "DEFAULT_VIRTUAL_ORIGIN_EPOCH_MS",
    "AcceleratedClock",
    "Clock",
    "RealClock",
    "Timer",
    "VirtualClock",
    "make_clock",
]

log = logging.getLogger(__name__)

#: 2026-01-01T00:00:00Z -- the calendar origin of virtual time unless a scenario gives another.
DEFAULT_VIRTUAL_ORIGIN_EPOCH_MS = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1000)

CLOCK_KINDS = ("real", "accelerated", "virtual")

Callback = Callable[[], object]


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _check_time(value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return value


def _order_key(value: object) -> tuple:
    """A total, deterministic sort key for ``order`` tuples, even with mixed element types:
    None < numbers < strings < bytes < tuples (element-wise) < anything else (by type name, repr)."""
    if value is None:
        return (0,)
    if isinstance(value, bool | int | float):
        return (1, value)
    if isinstance(value, str):
        return (2, value)
    if isinstance(value, bytes):
        return (3, value)
    if isinstance(value, tuple | list):
        return (4, tuple(_order_key(v) for v in value))
    return (5, type(value).__name__, repr(value))


class Timer:
    """A scheduled callback. ``when`` is in simulated time units; :meth:`cancel` is idempotent.

    Timers order by ``(when, order, seq)``: ``order`` is a caller-chosen tuple that breaks ties
    between timers due at the same instant (e.g. ``(priority, agent_name)``), ``seq`` is the
    scheduling sequence number, so ties that remain are broken first-scheduled-first. Tuples
    compare element-wise; elements of different types compare None < numbers < strings < bytes <
    tuples < anything else, so any mix is a deterministic total order. ``()`` sorts first.
    """

    __slots__ = ("_clock", "_handle", "_key", "callback", "cancelled", "fired", "order", "seq", "when")

    def __init__(self, clock: Clock, when: float, callback: Callback, order: tuple, seq: int) -> None:
        self._clock = clock
        self.when = when
        self.callback = callback
        self.order = tuple(order)
        self._key: tuple | None = None  # computed at the first comparison (only the virtual clock sorts)
        self.seq = seq
        self.cancelled = False
        self.fired = False
        self._handle: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        if self.cancelled or self.fired:
            return
        self.cancelled = True
        self._clock._cancel(self)

    def __lt__(self, other: Timer) -> bool:
        if self.when != other.when:
            return self.when < other.when
        mine, theirs = self.sort_key(), other.sort_key()
        if mine != theirs:
            return mine < theirs
        return self.seq < other.seq

    def sort_key(self) -> tuple:
        key = self._key
        if key is None:
            key = self._key = _order_key(self.order)
        return key

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else "fired" if self.fired else "scheduled"
        return f"<Timer when={self.when!r} order={self.order!r} seq={self.seq} {state}>"


class Clock(ABC):
    """Simulated time. See the module docstring and ``docs/shopfloor.md`` for the contract."""

    kind: str

    def __init__(self, *, origin_epoch_ms: int | None) -> None:
        self._origin_epoch_ms = origin_epoch_ms
        self._seq = itertools.count()
        self._tasks: set[asyncio.Task] = set()
        self._started = False
        self._stopped = False

    # -- time ------------------------------------------------------------------------------
    @abstractmethod
    def now(self) -> float:
        """Simulated time in units; 0.0 at :meth:`start` (unless a shared wall origin was given)."""

    @property
    def origin_epoch_ms(self) -> int:
        """Calendar epoch milliseconds of simulated time 0."""
        assert self._origin_epoch_ms is not None
        return self._origin_epoch_ms

    def epoch_ms(self, t: float | None = None) -> int:
        """Calendar epoch milliseconds of simulated time ``t`` (default: now). 1 unit = 1000 ms."""
        if t is None:
            t = self.now()
        return self.origin_epoch_ms + round(t * 1000.0)

    def from_epoch_ms(self, ms: int) -> float:
        """Inverse of :meth:`epoch_ms` (up to the millisecond)."""
        return (ms - self.origin_epoch_ms) / 1000.0

    @property
    def started(self) -> bool:
        return self._started

    # -- timers ----------------------------------------------------------------------------
    @abstractmethod
    def call_at(self, when: float, callback: Callback, *, order: tuple = ()) -> Timer:
        """Run ``callback()`` at simulated time ``when``.

        The callback may be a plain function or return an awaitable; the clock then runs it as a
        task (which, on the virtual clock, counts as busy until it finishes).
        """

    def call_later(self, delay: float, callback: Callback, *, order: tuple = ()) -> Timer:
        return self.call_at(self.now() + max(0.0, _check_time(delay, "delay")), callback, order=order)

    async def sleep(self, delay: float) -> None:
        await self.sleep_until(self.now() + max(0.0, _check_time(delay, "delay")))

    @abstractmethod
    async def sleep_until(self, when: float) -> None:
        """Return at simulated time ``when`` (at once, or at the next quiet instant, if it is past)."""

    # -- activity accounting (virtual clock only; cheap no-ops otherwise) ---------------------
    def add_pending(self, n: int = 1) -> None:
        """``n`` more things are in flight (e.g. a message published to ``n`` local handlers)."""
        return None  # nothing to account outside the virtual clock

    def done_pending(self, n: int = 1) -> None:
        """``n`` things in flight have arrived (call it *inside* the receiver's activity)."""
        return None  # nothing to account outside the virtual clock

    def activity(self) -> contextlib.AbstractContextManager[Any]:
        """``with clock.activity():`` / ``async with clock.activity():`` -- counts as busy."""
        return contextlib.nullcontext()

    def waiting(self) -> contextlib.AbstractContextManager[Any]:
        """``with clock.waiting(): await something``: the current task's activities are suspended
        while it waits for something that needs simulated time to advance (a reply with a deadline,
        a queue fed by timers). :meth:`sleep` does this by itself."""
        return contextlib.nullcontext()

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str | None = None) -> asyncio.Task:
        """Start ``coro`` as a task the clock keeps a reference to (and, on the virtual clock, counts
        as busy until it finishes, except while it waits on the clock)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._track(task)
        return task

    @property
    def pending(self) -> int:
        return 0

    @property
    def busy(self) -> int:
        return 0

    # -- lifecycle -------------------------------------------------------------------------
    @abstractmethod
    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Stop the clock and cancel the tasks it started (timer coroutines, spawned tasks)."""
        self._stopped = True
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_idle(self) -> None:
        """Virtual clock: return when no timer is left and nothing is pending or running."""
        raise NotImplementedError(f"wait_idle() is only defined for the virtual clock, not {self.kind!r}")

    def wall_elapsed(self) -> float:
        """Wall seconds since :meth:`start` (for run reports that give wall time beside simulated)."""
        return 0.0 if not self._started else time.monotonic() - self._wall_start

    # -- helpers ---------------------------------------------------------------------------
    def _track(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("clock task %s failed", task.get_name(), exc_info=task.exception(), stack_info=False)

    def _invoke(self, timer: Timer) -> asyncio.Task | None:
        """Run a timer's callback; wrap a returned awaitable in a tracked task."""
        timer.fired = True
        try:
            result = timer.callback()
        except Exception:
            log.exception("timer callback %r failed", timer.callback)
            return None
        if inspect.isawaitable(result):
            return self._start_awaitable(result)
        return None

    def _start_awaitable(self, aw: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(aw)
        self._track(task)
        return task

    @abstractmethod
    def _cancel(self, timer: Timer) -> None: ...

    def __repr__(self) -> str:
        return f"<{type(self).__name__} kind={self.kind} now={self.now():.3f}>"


class _WallClock(Clock):
    """Real and accelerated clocks: simulated time is a linear function of the loop's clock."""

    def __init__(
        self,
        kind: str,
        seconds_per_unit: float,
        *,
        origin_epoch_ms: int | None = None,
        wall_origin_ms: int | None = None,
    ) -> None:
        super().__init__(origin_epoch_ms=origin_epoch_ms)
        if not seconds_per_unit > 0:
            raise ValueError("time scale must be > 0")
        self.kind = kind
        self.seconds_per_unit = float(seconds_per_unit)
        self._wall_origin_ms = wall_origin_ms
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_t0 = 0.0
        self._frozen: float | None = None
        self._unstarted: list[Timer] = []
        self._scheduled: set[Timer] = set()
        self._started_event: asyncio.Event | None = None
        if self._origin_epoch_ms is None:  # provisional until start()
            self._origin_epoch_ms = wall_origin_ms if wall_origin_ms is not None else _wall_ms()
        self._origin_given = origin_epoch_ms is not None

    @property
    def wall_origin_ms(self) -> int | None:
        """Wall-clock epoch ms at which simulated time 0 happened (known after start())."""
        return self._wall_origin_ms

    def now(self) -> float:
        if self._frozen is not None:
            return self._frozen
        if not self._started or self._loop is None:
            return 0.0
        return (self._loop.time() - self._loop_t0) / self.seconds_per_unit

    async def start(self) -> None:
        if self._started:
            return
        loop = asyncio.get_running_loop()
        self._loop = loop
        wall_now = _wall_ms()
        if self._wall_origin_ms is None:
            self._wall_origin_ms = wall_now
        # The loop time at which simulated time 0 happened (in the past if a shared origin was given).
        self._loop_t0 = loop.time() - (wall_now - self._wall_origin_ms) / 1000.0
        if not self._origin_given:
            self._origin_epoch_ms = self._wall_origin_ms
        self._wall_start = time.monotonic()
        self._started = True
        for timer in self._unstarted:
            if not timer.cancelled:
                self._schedule(timer)
        self._unstarted.clear()
        if self._started_event is not None:
            self._started_event.set()

    async def stop(self) -> None:
        if self._started and self._frozen is None:
            self._frozen = self.now()
        for timer in [*self._unstarted, *self._scheduled]:
            timer.cancel()
        await super().stop()

    def call_at(self, when: float, callback: Callback, *, order: tuple = ()) -> Timer:
        timer = Timer(self, _check_time(when, "when"), callback, order, next(self._seq))
        if self._started:
            self._schedule(timer)
        else:
            self._unstarted.append(timer)
        return timer

    def _schedule(self, timer: Timer) -> None:
        assert self._loop is not None
        timer._handle = self._loop.call_at(
            self._loop_t0 + timer.when * self.seconds_per_unit, self._fire, timer
        )
        self._scheduled.add(timer)

    def _fire(self, timer: Timer) -> None:
        self._scheduled.discard(timer)
        if not timer.cancelled:
            self._invoke(timer)

    def _cancel(self, timer: Timer) -> None:
        if timer._handle is not None:
            timer._handle.cancel()
            self._scheduled.discard(timer)
        elif self._unstarted:
            with contextlib.suppress(ValueError):
                self._unstarted.remove(timer)

    async def _wait_started(self) -> None:
        if self._started:
            return
        if self._started_event is None:
            self._started_event = asyncio.Event()
        await self._started_event.wait()

    async def sleep_until(self, when: float) -> None:
        when = _check_time(when, "when")
        await self._wait_started()
        assert self._loop is not None
        delay = self._loop_t0 + when * self.seconds_per_unit - self._loop.time()
        await asyncio.sleep(max(0.0, delay))


class RealClock(_WallClock):
    """1 simulated unit = 1 wall second."""

    def __init__(self, *, origin_epoch_ms: int | None = None, wall_origin_ms: int | None = None) -> None:
        super().__init__("real", 1.0, origin_epoch_ms=origin_epoch_ms, wall_origin_ms=wall_origin_ms)


class AcceleratedClock(_WallClock):
    """``time_scale`` wall milliseconds per simulated unit (``time_scale=10`` -> 100 units/s)."""

    def __init__(
        self,
        time_scale: float,
        *,
        origin_epoch_ms: int | None = None,
        wall_origin_ms: int | None = None,
    ) -> None:
        if not time_scale > 0:
            raise ValueError("time_scale (wall ms per simulated unit) must be > 0")
        self.time_scale = float(time_scale)
        super().__init__(
            "accelerated",
            self.time_scale / 1000.0,
            origin_epoch_ms=origin_epoch_ms,
            wall_origin_ms=wall_origin_ms,
        )


class _Activity:
    """Context manager (sync and async) marking the current task busy on a virtual clock."""

    __slots__ = ("_clock", "_label", "_tokens")

    def __init__(self, clock: VirtualClock, label: str) -> None:
        self._clock = clock
        self._label = label
        self._tokens: list[int] = []

    def __enter__(self) -> _Activity:
        self._tokens.append(self._clock._acquire(self._label, _current_task()))
        return self

    def __exit__(self, *exc: object) -> None:
        self._clock._release(self._tokens.pop())

    async def __aenter__(self) -> _Activity:
        return self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__(*exc)


class _Waiting:
    """Suspends the current task's busy tokens while it waits (sync and async context manager)."""

    __slots__ = ("_clock", "_saved")

    def __init__(self, clock: VirtualClock) -> None:
        self._clock = clock
        self._saved: list[list[tuple[int, str]]] = []

    def __enter__(self) -> _Waiting:
        self._saved.append(self._clock._suspend(_current_task()))
        return self

    def __exit__(self, *exc: object) -> None:
        self._clock._resume(_current_task(), self._saved.pop())

    async def __aenter__(self) -> _Waiting:
        return self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__(*exc)


def _current_task() -> asyncio.Task | None:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


class VirtualClock(Clock):
    """Discrete-event clock for single-process runs.

    A driver task (started by :meth:`start`) repeats: wait until nothing is pending and nobody is
    busy; let the event loop settle (yield a few times and re-check, because a handler may be
    scheduled but not yet running); pop the earliest timer by ``(when, order, seq)``; advance
    ``now`` to its ``when`` (never backwards); run it. One timer at a time, with quiescence between
    timers, so the order of effects is deterministic.

    If something stays pending or busy with no progress for ``stall_timeout`` wall seconds, a
    warning names it and the clock forgives it and moves on (``stalls`` counts this), so a lost
    message can never hang a run. A forgiven pending count is booked as a debt: late
    ``done_pending`` calls that would drive the count below zero pay the debt instead.

    Over several processes each one runs a ``SplitVirtualClock`` (``shopfloor/barrier.py``), whose
    timers fire only when the plant-wide time barrier grants them.
    """

    kind = "virtual"

    def __init__(
        self,
        *,
        origin_epoch_ms: int | None = None,
        stall_timeout: float = 30.0,
        settle_rounds: int = 3,
        max_settle_rounds: int = 100,
    ) -> None:
        super().__init__(
            origin_epoch_ms=DEFAULT_VIRTUAL_ORIGIN_EPOCH_MS if origin_epoch_ms is None else origin_epoch_ms
        )
        if not stall_timeout > 0:
            raise ValueError("stall_timeout must be > 0")
        self.stall_timeout = float(stall_timeout)
        self.settle_rounds = max(1, int(settle_rounds))
        self.max_settle_rounds = max(self.settle_rounds, int(max_settle_rounds))
        self._now = 0.0
        self._heap: list[Timer] = []
        self._live_timers = 0
        self._pending = 0
        self._pending_debt = 0
        self._busy: dict[int, tuple[str, asyncio.Task | None]] = {}
        self._task_tokens: dict[asyncio.Task, set[int]] = {}
        self._token_ids = itertools.count(1)
        self._gen = 0
        self._last_progress = time.monotonic()
        self._wake: asyncio.Event | None = None
        self._driver: asyncio.Task | None = None
        self._idle_waiters: list[asyncio.Future] = []
        #: number of times the stall watchdog forced progress
        self.stalls = 0
        #: number of timers run
        self.timers_fired = 0

    # -- time ------------------------------------------------------------------------------
    def now(self) -> float:
        return self._now

    def resume_at(self, t: float) -> None:
        """Continue a stopped run: simulated time starts at `t` instead of 0 (before `start`)."""
        if self._driver is not None:
            raise RuntimeError("resume_at() must be called before start()")
        self._now = max(self._now, float(t))

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def busy(self) -> int:
        return len(self._busy)

    def _changed(self) -> None:
        self._gen += 1
        self._last_progress = time.monotonic()
        if self._wake is not None:
            self._wake.set()

    # -- timers ----------------------------------------------------------------------------
    def call_at(self, when: float, callback: Callback, *, order: tuple = ()) -> Timer:
        timer = Timer(self, _check_time(when, "when"), callback, order, self._next_seq())
        heapq.heappush(self._heap, timer)
        self._live_timers += 1
        self._changed()
        return timer

    def _next_seq(self) -> Any:
        return next(self._seq)

    def _cancel(self, timer: Timer) -> None:
        # Lazily removed from the heap when popped.
        self._live_timers -= 1
        self._changed()

    def _pop_timer(self) -> Timer | None:
        while self._heap:
            timer = heapq.heappop(self._heap)
            if not timer.cancelled:
                self._live_timers -= 1
                return timer
        return None

    @property
    def timers(self) -> int:
        """Number of scheduled, not yet fired, not cancelled timers."""
        return self._live_timers

    def next_timer_at(self) -> float | None:
        while self._heap and self._heap[0].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0].when if self._heap else None

    async def sleep_until(self, when: float) -> None:
        when = _check_time(when, "when")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()

        def wake() -> None:
            if not fut.done():
                # The sleeper counts as busy from now until it has resumed (it runs in a later loop
                # iteration, which the driver could not otherwise tell from "nobody left").
                fut.set_result(self._acquire("sleep", None))

        timer = self.call_at(when, wake)
        task = _current_task()
        saved = self._suspend(task)
        try:
            token = await fut
        except BaseException:
            timer.cancel()
            self._resume(task, saved)
            if fut.done() and not fut.cancelled():
                self._release(fut.result())
            raise
        self._resume(task, saved)
        self._release(token)

    # -- activity accounting ---------------------------------------------------------------
    def add_pending(self, n: int = 1) -> None:
        if n < 0:
            raise ValueError("n must be >= 0")
        if n:
            self._pending += n
            self._changed()

    def done_pending(self, n: int = 1) -> None:
        if n < 0:
            raise ValueError("n must be >= 0")
        if not n:
            return
        self._pending -= n
        if self._pending < 0:
            excess = -self._pending
            self._pending = 0
            paid = min(excess, self._pending_debt)
            self._pending_debt -= paid
            if excess > paid:
                log.warning(
                    "virtual clock: done_pending() without matching add_pending() (%d too many)",
                    excess - paid,
                )
        self._changed()

    def activity(self, label: str = "activity") -> _Activity:
        return _Activity(self, label)

    def waiting(self) -> _Waiting:
        return _Waiting(self)

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str | None = None) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._track_busy(task, name or "spawned task")
        return task

    def _start_awaitable(self, aw: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(aw)
        self._track_busy(task, "timer coroutine")
        return task

    def _track_busy(self, task: asyncio.Task, label: str) -> None:
        token = self._acquire(label, task)
        self._track(task)
        task.add_done_callback(lambda _t: self._release(token))

    def _acquire(self, label: str, owner: asyncio.Task | None) -> int:
        token = next(self._token_ids)
        self._busy[token] = (label, owner)
        if owner is not None:
            self._task_tokens.setdefault(owner, set()).add(token)
        self._changed()
        return token

    def _release(self, token: int) -> None:
        entry = self._busy.pop(token, None)
        if entry is None:  # already forgiven by the watchdog, or suspended
            return
        owner = entry[1]
        if owner is not None:
            tokens = self._task_tokens.get(owner)
            if tokens is not None:
                tokens.discard(token)
                if not tokens:
                    del self._task_tokens[owner]
        self._changed()

    def _suspend(self, task: asyncio.Task | None) -> list[tuple[int, str]]:
        if task is None:
            return []
        tokens = self._task_tokens.pop(task, None)
        if not tokens:
            return []
        saved = []
        for token in sorted(tokens):
            entry = self._busy.pop(token, None)
            if entry is not None:
                saved.append((token, entry[0]))
        if saved:
            self._changed()
        return saved

    def _resume(self, task: asyncio.Task | None, saved: list[tuple[int, str]]) -> None:
        if task is None or not saved:
            return
        mine = self._task_tokens.setdefault(task, set())
        for token, label in saved:
            self._busy[token] = (label, task)
            mine.add(token)
        self._changed()

    def _quiet(self) -> bool:
        return self._pending == 0 and not self._busy

    # -- driver ----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._started:
            return
        self._wake = asyncio.Event()
        self._wall_start = time.monotonic()
        self._last_progress = time.monotonic()
        self._started = True
        self._driver = asyncio.get_running_loop().create_task(self._drive(), name="virtual-clock-driver")

    async def stop(self) -> None:
        self._stopped = True
        if self._driver is not None:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._driver
            self._driver = None
        for fut in self._idle_waiters:
            if not fut.done():
                fut.cancel()
        self._idle_waiters.clear()
        await super().stop()

    async def wait_idle(self) -> None:
        if not self._started or self._driver is None:
            raise RuntimeError("wait_idle(): the virtual clock is not running (call start() first)")
        fut = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(fut)
        self._changed()
        await fut

    async def _drive(self) -> None:
        assert self._wake is not None
        while True:
            if not self._quiet():
                await self._wait_quiet()
                continue
            if await self._settle():
                await self._on_quiet()

    async def _on_quiet(self) -> None:
        """The process is quiet and settled: run the next timer (or wait for something to happen)."""
        assert self._wake is not None
        timer = self._pop_timer()
        if timer is None:
            self._notify_idle()
            self._wake.clear()
            if self._quiet() and self._live_timers == 0 and not self._idle_waiters:
                await self._wake.wait()
            return
        if timer.when > self._now:
            self._now = timer.when
        self.timers_fired += 1
        self._invoke(timer)

    async def _wait_quiet(self) -> None:
        """Wait for pending == 0 and nobody busy; force progress after ``stall_timeout`` without any."""
        assert self._wake is not None
        while not self._quiet():
            self._wake.clear()
            remaining = self._last_progress + self.stall_timeout - time.monotonic()
            if remaining <= 0:
                self._force_progress()
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wake.wait()

    def _force_progress(self) -> None:
        self.stalls += 1
        labels = sorted({label for label, _ in self._busy.values()})
        log.warning(
            "virtual clock stalled at t=%.3f: %d pending, %d busy %s, no progress for %.1f wall s; "
            "forcing progress (stall #%d)",
            self._now,
            self._pending,
            len(self._busy),
            labels,
            self.stall_timeout,
            self.stalls,
        )
        self._pending_debt += self._pending
        self._pending = 0
        self._busy.clear()
        self._task_tokens.clear()
        self._changed()

    async def _settle(self) -> bool:
        """Yield to the loop a few times; True if still quiet and nothing changed meanwhile."""
        gen = self._gen
        ready = getattr(asyncio.get_running_loop(), "_ready", None)  # CPython: the ready queue
        for rounds in range(1, self.max_settle_rounds + 1):
            await asyncio.sleep(0)
            if self._gen != gen or not self._quiet():
                return False
            if rounds >= self.settle_rounds and not ready:
                return True
        return True

    def _notify_idle(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)


def make_clock(
    kind: str,
    *,
    time_scale: float = 1.0,
    origin_epoch_ms: int | None = None,
    stall_timeout: float = 30.0,
    wall_origin_ms: int | None = None,
) -> Clock:
    """Build a clock of ``kind`` ("real" | "accelerated" | "virtual").

    ``time_scale`` (accelerated only): wall milliseconds per simulated unit.
    ``origin_epoch_ms``: calendar epoch ms of simulated time 0 (virtual default 2026-01-01T00:00:00Z;
    real/accelerated default: the wall time at start()).
    ``stall_timeout`` (virtual only): wall seconds without progress before the watchdog forces it.
    ``wall_origin_ms`` (real/accelerated only): the wall epoch ms at which simulated time 0 happened.
    Give every process of a run -- and a restarted one -- the same value so they share one time
    base; by default it is the wall time at start(), so ``now()`` is 0.0 at start().
    """
    if kind == "virtual":
        return VirtualClock(origin_epoch_ms=origin_epoch_ms, stall_timeout=stall_timeout)
    if kind == "real":
        return RealClock(origin_epoch_ms=origin_epoch_ms, wall_origin_ms=wall_origin_ms)
    if kind == "accelerated":
        return AcceleratedClock(time_scale, origin_epoch_ms=origin_epoch_ms, wall_origin_ms=wall_origin_ms)
    raise ValueError(f"unknown clock kind {kind!r}; expected one of {', '.join(CLOCK_KINDS)}")
