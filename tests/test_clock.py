"""Clocks: ordering, virtual-time quiescence, determinism, acceleration, cancel, stall watchdog."""

from __future__ import annotations

import asyncio
import logging
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shopfloor.clock import (
    DEFAULT_VIRTUAL_ORIGIN_EPOCH_MS,
    AcceleratedClock,
    Clock,
    VirtualClock,
    make_clock,
)

# -- helpers ---------------------------------------------------------------------------------


async def _virtual(**kw) -> VirtualClock:
    clock = make_clock("virtual", **kw)
    assert isinstance(clock, VirtualClock)
    await clock.start()
    return clock


timer_specs = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=20).map(float),  # when (coarse, so ties are common)
        st.tuples(st.integers(min_value=0, max_value=3)),  # order
    ),
    min_size=1,
    max_size=25,
)

# -- ordering --------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(timer_specs)
def test_virtual_timers_fire_in_when_order_seq_order(specs):
    async def run():
        clock = await _virtual()
        fired = []
        for seq, (when, order) in enumerate(specs):
            clock.call_at(when, lambda s=seq: fired.append((clock.now(), s)), order=order)
        await clock.wait_idle()
        await clock.stop()
        return fired

    fired = asyncio.run(run())
    expected = sorted(range(len(specs)), key=lambda s: (specs[s][0], specs[s][1], s))
    assert [s for _, s in fired] == expected
    assert [t for t, _ in fired] == [specs[s][0] for s in expected]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.floats(min_value=0, max_value=50, allow_nan=False), min_size=1, max_size=10),
    st.lists(st.floats(min_value=-20, max_value=20, allow_nan=False), min_size=1, max_size=30),
)
def test_virtual_time_never_runs_backwards(initial, offsets):
    """Timers scheduled in the past (from callbacks, at random offsets) never move time back."""

    async def run():
        clock = await _virtual()
        seen: list[float] = []
        todo = list(offsets)

        def cb():
            seen.append(clock.now())
            if todo:
                clock.call_at(clock.now() + todo.pop(), cb)

        for t in initial:
            clock.call_at(t, cb)
        await clock.wait_idle()
        await clock.stop()
        return seen

    seen = asyncio.run(run())
    assert seen == sorted(seen)
    assert len(seen) == len(initial) + len(offsets)


async def test_same_instant_timers_run_by_order_then_seq():
    clock = await _virtual()
    fired = []
    clock.call_at(5, lambda: fired.append("b1"), order=(1, "b"))
    clock.call_at(5, lambda: fired.append("a"), order=(1, "a"))
    clock.call_at(5, lambda: fired.append("b2"), order=(1, "b"))
    clock.call_at(5, lambda: fired.append("first"), order=(0,))
    clock.call_at(5, lambda: fired.append("none"))  # () sorts before any non-empty order
    clock.call_at(5, lambda: fired.append("str"), order=("x",))  # mixed types: numbers < strings
    clock.call_at(4, lambda: fired.append("earlier"), order=(9,))
    await clock.wait_idle()
    assert fired == ["earlier", "none", "first", "a", "b1", "b2", "str"]
    await clock.stop()


async def test_cancel_virtual_and_accelerated():
    clock = await _virtual()
    fired = []
    t1 = clock.call_at(1, lambda: fired.append(1))
    clock.call_at(2, lambda: fired.append(2))
    t1.cancel()
    t1.cancel()  # idempotent
    assert clock.timers == 1
    await clock.wait_idle()
    assert fired == [2]
    assert clock.now() == 2.0
    await clock.stop()

    acc = make_clock("accelerated", time_scale=1)  # 1 ms per unit
    await acc.start()
    t = acc.call_later(20, lambda: fired.append("acc-cancelled"))
    acc.call_later(30, lambda: fired.append("acc"))
    t.cancel()
    await acc.sleep(60)
    assert fired == [2, "acc"]
    await acc.stop()


# -- quiescence ------------------------------------------------------------------------------


async def test_virtual_clock_waits_for_pending_messages():
    """A message in flight (add_pending) holds simulated time until it is handled."""
    clock = await _virtual()
    trace = []
    clock.call_at(10, lambda: trace.append(("timer", clock.now())))

    async def deliver_later():
        await asyncio.sleep(0.15)  # real delay: a broker round trip
        async with clock.activity():
            clock.done_pending()
            trace.append(("received", clock.now()))
            await asyncio.sleep(0.05)  # the handler works (real time) ...
            clock.call_later(3, lambda: trace.append(("reply-timer", clock.now())))

    clock.add_pending()
    delivery = asyncio.get_running_loop().create_task(deliver_later())
    await asyncio.sleep(0.05)
    assert clock.now() == 0.0 and trace == []
    await clock.wait_idle()
    assert trace == [("received", 0.0), ("reply-timer", 3.0), ("timer", 10.0)]
    assert delivery.done()
    assert clock.stalls == 0
    await clock.stop()


async def test_timer_coroutine_counts_as_busy_until_it_finishes():
    clock = await _virtual()
    trace = []

    async def slow():
        trace.append(("slow-start", clock.now()))
        await asyncio.sleep(0.1)  # real work, not on the clock
        trace.append(("slow-end", clock.now()))

    clock.call_at(1, slow)
    clock.call_at(2, lambda: trace.append(("next", clock.now())))
    await clock.wait_idle()
    assert trace == [("slow-start", 1.0), ("slow-end", 1.0), ("next", 2.0)]
    await clock.stop()


async def test_sleeping_inside_activity_or_timer_coroutine_does_not_deadlock():
    clock = await _virtual(stall_timeout=5)
    trace = []

    async def step(name, d):
        async with clock.activity():
            trace.append((name, "start", clock.now()))
            await clock.sleep(d)  # the activity is suspended while sleeping
            trace.append((name, "end", clock.now()))

    clock.call_at(0, lambda: step("a", 5))
    clock.spawn(step("b", 3))
    t0 = time.monotonic()
    await clock.wait_idle()
    assert time.monotonic() - t0 < 2
    assert ("a", "end", 5.0) in trace and ("b", "end", 3.0) in trace
    assert clock.stalls == 0
    await clock.stop()


async def test_waiting_suspends_activity_for_time_dependent_waits():
    clock = await _virtual(stall_timeout=5)
    fut = asyncio.get_running_loop().create_future()
    clock.call_at(7, lambda: fut.set_result(clock.now()))
    async with clock.activity():
        with clock.waiting():
            assert await fut == 7.0
    await clock.wait_idle()
    assert clock.stalls == 0
    await clock.stop()


async def test_spawned_task_holds_time():
    clock = await _virtual()
    trace = []

    async def work():
        await asyncio.sleep(0.1)
        trace.append(("work", clock.now()))

    clock.call_at(1, lambda: trace.append(("timer", clock.now())))
    clock.spawn(work())
    await clock.wait_idle()
    assert trace == [("work", 0.0), ("timer", 1.0)]
    await clock.stop()


async def test_stall_watchdog_forces_progress(caplog):
    clock = await _virtual(stall_timeout=0.3)
    fired = []
    clock.call_at(5, lambda: fired.append(clock.now()))
    clock.add_pending(2)  # two messages that will never arrive
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="shopfloor.clock"):
        await clock.wait_idle()
    elapsed = time.monotonic() - t0
    assert fired == [5.0]
    assert clock.stalls == 1
    assert 0.25 <= elapsed < 2
    assert any("stalled" in r.message and "2 pending" in r.message for r in caplog.records)
    # One late arrival pays the forgiven debt instead of driving the count negative.
    clock.done_pending()
    assert clock.pending == 0
    await clock.stop()


async def test_wait_idle_is_virtual_only():
    clock = make_clock("real")
    await clock.start()
    with pytest.raises(NotImplementedError):
        await clock.wait_idle()
    # accounting is a cheap no-op on wall clocks
    clock.add_pending(3)
    clock.done_pending(3)
    with clock.activity():
        pass
    async with clock.activity():
        pass
    await clock.stop()


# -- determinism -----------------------------------------------------------------------------


async def _little_simulation(seed: int) -> list[tuple]:
    """Products send jobs to machines through a jittery 'broker'; machines answer after processing.

    The broker's delivery delays are random *real* delays from an unseeded generator, so the order
    of arrival in wall time varies from run to run; the virtual trace must not.
    """
    clock = await _virtual(stall_timeout=10)
    rng = random.Random(seed)
    jitter = random.Random()  # deliberately unseeded
    loop = asyncio.get_running_loop()
    trace: list[tuple] = []
    inflight: set[asyncio.Task] = set()
    queues: dict[str, list[str]] = {"m1": [], "m2": []}
    busy = {"m1": False, "m2": False}
    proc = {(p, m): rng.uniform(1, 10) for p in range(6) for m in queues}

    def send(to, payload):
        clock.add_pending()

        async def deliver():
            await asyncio.sleep(jitter.uniform(0, 0.01))
            async with clock.activity():
                clock.done_pending()
                await handle(to, payload)

        inflight.add(task := loop.create_task(deliver()))
        task.add_done_callback(inflight.discard)

    async def machine_run(m):
        while queues[m]:
            job = queues[m].pop(0)
            p = int(job[1:])
            trace.append((round(clock.now(), 9), m, "start", job))
            await clock.sleep(proc[(p, m)])
            trace.append((round(clock.now(), 9), m, "end", job))
            send(f"p{p}", ("done", m))
        busy[m] = False

    async def handle(to, payload):
        await asyncio.sleep(jitter.uniform(0, 0.003))  # handlers take real time
        if to in queues:
            queues[to].append(payload)
            trace.append((round(clock.now(), 9), to, "queued", payload))
            if not busy[to]:
                busy[to] = True
                clock.spawn(machine_run(to))
        else:
            trace.append((round(clock.now(), 9), to, "got", payload))

    for p in range(6):
        release = float(rng.randint(0, 5))
        m = rng.choice(sorted(queues))
        clock.call_at(release, lambda p=p, m=m: send(m, f"p{p}"), order=(p,))
    await clock.wait_idle()
    stalls = clock.stalls
    await clock.stop()
    assert stalls == 0
    return trace


async def test_simulation_twice_gives_identical_traces():
    a = await _little_simulation(7)
    b = await _little_simulation(7)
    assert len(a) == 6 * 4
    assert a == b


# -- wall clocks and epochs ------------------------------------------------------------------


async def test_accelerated_clock_maps_time_by_scale():
    clock = make_clock("accelerated", time_scale=10)  # 10 wall ms per unit: 100 units per second
    assert isinstance(clock, AcceleratedClock)
    await clock.start()
    w0 = time.monotonic()
    await clock.sleep(20)
    wall = time.monotonic() - w0
    assert 0.19 <= wall < 0.35
    assert clock.now() == pytest.approx(wall * 100, abs=3)
    fired = []
    clock.call_at(clock.now() + 5, lambda: fired.append((clock.now(), time.monotonic())))
    w1 = time.monotonic()
    await clock.sleep(10)
    assert len(fired) == 1
    assert fired[0][1] - w1 == pytest.approx(0.05, abs=0.03)
    # epoch: the calendar origin is the wall start time; 1 unit = 1000 ms of simulated calendar
    assert clock.epoch_ms(0) == clock.origin_epoch_ms
    assert abs(clock.origin_epoch_ms - (time.time() * 1000 - wall * 1000 - 50)) < 500
    assert clock.epoch_ms(12.5) - clock.epoch_ms(0) == 12500
    await clock.stop()
    frozen = clock.now()
    await asyncio.sleep(0.02)
    assert clock.now() == frozen


async def test_shared_wall_origin_gives_one_time_base():
    """Two processes (or a restarted one) given the same wall origin agree on simulated time."""
    origin = time.time_ns() // 1_000_000 - 500  # sim time 0 was half a wall second ago
    a = make_clock("accelerated", time_scale=10, wall_origin_ms=origin)
    await a.start()
    assert a.now() == pytest.approx(50, abs=3)
    await asyncio.sleep(0.05)
    b = make_clock("accelerated", time_scale=10, wall_origin_ms=origin)
    await b.start()
    assert b.now() == pytest.approx(a.now(), abs=1)
    assert a.origin_epoch_ms == b.origin_epoch_ms == origin
    await a.stop()
    await b.stop()


async def test_real_clock_and_timers_before_start():
    clock: Clock = make_clock("real")
    fired = []
    clock.call_at(0.03, lambda: fired.append(clock.now()))  # scheduled before start
    assert clock.now() == 0.0
    await clock.start()
    await clock.sleep(0.06)
    assert len(fired) == 1 and fired[0] == pytest.approx(0.03, abs=0.02)
    assert clock.epoch_ms() == pytest.approx(time.time() * 1000, abs=50)
    await clock.stop()


def test_virtual_epoch_conversions():
    clock = make_clock("virtual")
    assert clock.origin_epoch_ms == DEFAULT_VIRTUAL_ORIGIN_EPOCH_MS == 1767225600000
    assert clock.epoch_ms(0) == 1767225600000
    assert clock.epoch_ms(90.5) == 1767225690500
    assert clock.from_epoch_ms(1767225690500) == 90.5
    other = make_clock("virtual", origin_epoch_ms=1_000_000)
    assert other.epoch_ms(1) == 1_001_000
    assert other.from_epoch_ms(other.epoch_ms(123.456)) == pytest.approx(123.456, abs=1e-3)


def test_make_clock_validates():
    with pytest.raises(ValueError):
        make_clock("sundial")
    with pytest.raises(ValueError):
        make_clock("accelerated", time_scale=0)
    assert make_clock("real").kind == "real"
    assert make_clock("accelerated", time_scale=5).kind == "accelerated"
    assert make_clock("virtual").kind == "virtual"
