"""The schedule-quality baselines (bench/jobshop_baselines.py) and a smoke run of the benchmark."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import JOBSHOP_DIR

import scenarios.jobshop as scenarios_jobshop
from scenarios.jobshop import flexible_variant, random_instance, random_like, scenario_from_jobshop

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import jobshop_baselines as jb

ROOT = Path(__file__).resolve().parents[1]
JOBSHOP = JOBSHOP_DIR
FT06 = JOBSHOP / "ft06.txt"


def _classic(*jobs: list[tuple[int, int]], machines: int) -> jb.Problem:
    return jb.Problem("t", machines, tuple(tuple(((m, d),) for m, d in job) for job in jobs))


def _non_delay_violations(problem: jb.Problem, schedule: list[jb.ScheduledOp]) -> list[str]:
    """Operations that waited while their machine stood idle (a non-delay schedule has none)."""
    by_key = {(s.job, s.op): s for s in schedule}
    out = []
    for s in schedule:
        ready = by_key[(s.job, s.op - 1)].end if s.op else 0.0
        busy = sorted((o.start, o.end) for o in schedule if o.machine == s.machine and o is not s)
        t = ready
        for a, b in busy:
            if a <= t < b:
                t = b
        if t < s.start:
            out.append(f"job {s.job} op {s.op} waits from {ready} to {s.start}, machine idle at {t}")
    return out


# --------------------------------------------------------------------------- dispatching


@pytest.mark.parametrize("rule", list(jb.RULES))
def test_rules_on_ft06_give_feasible_non_delay_schedules_no_better_than_the_optimum(rule: str) -> None:
    problem = jb.problem_from_instance(FT06)
    result = jb.dispatch(problem, rule)
    assert jb.validate(problem, result.schedule) == []
    assert len(result.schedule) == problem.n_operations == 36
    assert result.makespan == jb.makespan_of(result.schedule)
    assert result.makespan >= problem.optimum == 55
    assert result.makespan >= jb.lower_bound(problem)
    assert _non_delay_violations(problem, result.schedule) == []
    assert jb.dispatch(problem, rule).schedule == result.schedule  # deterministic


def test_rules_on_every_instance_are_feasible_and_bounded_by_the_optimum() -> None:
    for path in sorted(JOBSHOP.glob("*.txt")):
        problem = jb.problem_from_instance(path)
        for rule, result in jb.dispatch_all(problem).items():
            assert jb.validate(problem, result.schedule) == [], (path.name, rule)
            assert result.makespan >= (problem.optimum or 0), (path.name, rule)


def test_the_rules_pick_as_documented() -> None:
    # At 0 every job starts on its own machine. At 5 (machine 0 free again, job 1 done with it)
    # three operations can start: job 0 on machine 0 (arrived at 2, 3 long, 3 left), job 1 on
    # machine 2 (arrived at 5, 1 long, 1 left), job 2 on machine 0 (arrived at 1, 1 long, 1 left).
    problem = _classic([(1, 2), (0, 3)], [(0, 5), (2, 1)], [(2, 1), (0, 1)], machines=3)
    order = {
        rule: [
            s.job
            for s in sorted(jb.dispatch(problem, rule).schedule, key=lambda s: s.start)
            if s.machine == 0
        ]
        for rule in jb.RULES
    }
    assert all(jobs[0] == 1 for jobs in order.values())
    # FIFO: job 2 arrived first; SPT: jobs 1 and 2 (1 long, job 1 by index, on machine 2), then
    # job 2 before job 0 on machine 0; MWKR: job 0 has the most work left.
    assert order["FIFO"] == [1, 2, 0]
    assert order["SPT"] == [1, 2, 0]
    assert order["MWKR"] == [1, 0, 2]


def test_fifo_breaks_ties_by_job_index_and_spt_by_duration() -> None:
    problem = _classic([(0, 4)], [(0, 2)], [(0, 3)], machines=1)
    fifo = sorted(jb.dispatch(problem, "FIFO").schedule, key=lambda s: s.start)
    spt = sorted(jb.dispatch(problem, "SPT").schedule, key=lambda s: s.start)
    assert [s.job for s in fifo] == [0, 1, 2]
    assert [s.job for s in spt] == [1, 2, 0]
    assert jb.makespan_of(fifo) == jb.makespan_of(spt) == 9


def test_flexible_operation_goes_to_the_machine_finishing_earliest() -> None:
    # Job 0 occupies machine 0 until 10; job 1's only operation can use machine 0 (2 long) or
    # machine 1 (6 long): machine 1 finishes at 6, machine 0 only at 12.
    only_m0: tuple[jb.Option, ...] = ((0, 10),)
    m0_or_m1: tuple[jb.Option, ...] = ((0, 2), (1, 6))
    problem = jb.Problem("t", 2, ((only_m0,), (m0_or_m1,)))
    schedule = {s.job: s for s in jb.dispatch(problem, "FIFO").schedule}
    assert (schedule[1].machine, schedule[1].start, schedule[1].end) == (1, 0.0, 6.0)
    assert jb.validate(problem, list(schedule.values())) == []


@pytest.mark.parametrize("k", [2, 3])
def test_flexible_variants_of_ft06(k: int) -> None:
    scenario = flexible_variant(FT06, k, 0)
    problem = jb.problem_from_scenario(scenario)
    assert problem.flexible and problem.upper_bound == 55
    assert all(len(options) == k for job in problem.jobs for options in job)
    classic = jb.problem_from_instance(FT06)
    for job, flex_job in zip(classic.jobs, problem.jobs, strict=True):
        for (original,), options in zip(job, flex_job, strict=True):
            assert original in options  # the original machine and duration stay an option
    for rule, result in jb.dispatch_all(problem).items():
        assert jb.validate(problem, result.schedule) == [], rule
        assert result.makespan >= jb.lower_bound(problem)


def test_problem_from_the_classic_scenario_is_the_instance() -> None:
    from_scenario = jb.problem_from_scenario(scenario_from_jobshop(FT06))
    from_file = jb.problem_from_instance(FT06)
    assert from_scenario.jobs == from_file.jobs
    assert from_scenario.optimum == 55 and not from_scenario.flexible


# --------------------------------------------------------------------------- validation


def test_validator_rejects_infeasible_schedules() -> None:
    problem = _classic([(0, 3), (1, 2)], [(1, 4), (0, 1)], machines=2)
    good = [
        jb.ScheduledOp(0, 0, 0, 0, 3),
        jb.ScheduledOp(0, 1, 1, 4, 6),
        jb.ScheduledOp(1, 0, 1, 0, 4),
        jb.ScheduledOp(1, 1, 0, 4, 5),
    ]
    assert jb.validate(problem, good) == []

    def broken(i: int, **change: float) -> list[jb.ScheduledOp]:
        s = list(good)
        s[i] = jb.ScheduledOp(**{**s[i].__dict__, **change})
        return s

    overlap = broken(1, start=3, end=5)  # machine 1 still busy with job 1 until 4
    assert any("overlaps" in e for e in jb.validate(problem, overlap))
    precedence = broken(3, start=2, end=3)  # before job 1's first operation ends
    assert any("before operation 0 ends" in e for e in jb.validate(problem, precedence))
    assert any("its duration there is" in e for e in jb.validate(problem, broken(0, end=2)))
    assert any("cannot do it" in e for e in jb.validate(problem, broken(0, machine=1, start=10, end=13)))
    assert any("not scheduled" in e for e in jb.validate(problem, good[:3]))
    assert any("more than once" in e for e in jb.validate(problem, [*good, good[0]]))
    assert any("before the release" in e for e in jb.validate(problem, broken(1, start=-1, end=1)))


def test_validator_rejects_a_shifted_dispatch_schedule() -> None:
    problem = jb.problem_from_instance(FT06)
    schedule = jb.dispatch(problem, "MWKR").schedule
    last = max(schedule, key=lambda s: s.end)
    moved = [
        s if s is not last else jb.ScheduledOp(s.job, s.op, s.machine, 0, s.end - s.start) for s in schedule
    ]
    assert jb.validate(problem, moved) != []


# --------------------------------------------------------------------------- CP-SAT


def test_cpsat_proves_55_on_ft06() -> None:
    problem = jb.problem_from_instance(FT06)
    result = jb.solve_cpsat(problem, time_limit=10)
    assert (result.status, result.makespan, result.bound) == ("optimal", 55, 55)
    assert result.wall_seconds < 10
    assert jb.validate(problem, result.schedule) == []
    assert jb.makespan_of(result.schedule) == 55


def test_cpsat_on_a_flexible_variant_beats_the_rules_and_the_classic_optimum() -> None:
    problem = jb.problem_from_scenario(flexible_variant(FT06, 2, 0))
    rules = jb.dispatch_all(problem)
    best_rule = min(rules.values(), key=lambda r: r.makespan)
    result = jb.solve_cpsat(problem, time_limit=10, hint=best_rule.schedule)
    assert result.status in ("optimal", "feasible")
    assert jb.validate(problem, result.schedule) == []
    assert result.bound <= result.makespan <= min(best_rule.makespan, 55)
    assert result.bound >= jb.lower_bound(problem)


def test_cpsat_without_ortools_is_skipped_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ortools.sat.python", None)
    monkeypatch.setitem(sys.modules, "ortools.sat.python.cp_model", None)
    assert not jb.cpsat_available()
    result = jb.solve_cpsat(_classic([(0, 1)], machines=1), time_limit=1)
    assert result.status == "skipped" and result.makespan is None and "ortools" in result.note


# --------------------------------------------------------------------------- random instances


def test_random_instance_is_a_seeded_job_shop_of_the_asked_shape() -> None:
    inst = random_instance(10, 5, seed=3, low=5, high=99)
    assert (inst.n_jobs, inst.n_machines, inst.optimum) == (10, 5, None)
    for job in inst.jobs:
        assert sorted(m for m, _ in job) == list(range(5))  # every machine once
        assert all(5 <= d <= 99 for _, d in job)
    assert random_instance(10, 5, seed=3, low=5, high=99) == inst  # same seed, same instance
    assert random_instance(10, 5, seed=4, low=5, high=99).jobs != inst.jobs
    problem = jb.problem_from_instance(inst)
    assert jb.validate(problem, jb.dispatch(problem, "FIFO").schedule) == []
    with pytest.raises(ValueError, match="low <= high"):
        random_instance(2, 2, seed=0, low=9, high=1)


def test_random_like_keeps_a_public_instance_size_and_duration_range() -> None:
    ft10 = jb.problem_from_instance(JOBSHOP / "ft10.txt")
    public = scenarios_jobshop.read_instance(JOBSHOP / "ft10.txt")
    rand = random_like(public, 1)
    durations = [d for job in public.jobs for _, d in job]
    assert rand.name == "ft10-r1" and (rand.n_jobs, rand.n_machines) == (10, 10) == (
        ft10.n_jobs,
        ft10.n_machines,
    )
    assert all(min(durations) <= d <= max(durations) for job in rand.jobs for _, d in job)
    assert rand.jobs != public.jobs
    assert random_like(public, 1) == rand and random_like(public, 2).jobs != rand.jobs
    # two public instances of one size and range get different random ones
    la01, la02 = (scenarios_jobshop.read_instance(JOBSHOP / f) for f in ("la01.txt", "la02.txt"))
    assert (la01.n_jobs, la01.n_machines) == (la02.n_jobs, la02.n_machines)
    assert random_like(la01, 1).jobs != random_like(la02, 1).jobs


# --------------------------------------------------------------------------- the benchmark itself


def test_benchmark_smoke_run_on_ft06(capsys: pytest.CaptureFixture[str]) -> None:
    import bench_jobshop

    assert bench_jobshop.main(["--instances", "ft06", "--flexible", "2", "--time-limit", "2", "--json"]) == 0
    out = capsys.readouterr().out
    assert "Classic instances" in out and "machine:" in out
    figures = json.loads(out.strip().splitlines()[-1])
    (row,) = figures["classic"]
    assert row["optimum"] == 55 and row["FIFO"] >= 55
    swarm = row["twinbid"]
    assert swarm["ok"] and swarm["feasible"] is True, swarm
    assert swarm["makespan"] >= 55
    # The resources' urgency queue (issue #11): never worse than FIFO; 59 since it came in (MWKR 61).
    assert swarm["makespan"] <= min(row["FIFO"], 59)
    (flex,) = figures["flexible"]
    assert flex["twinbid"]["feasible"] is True, flex["twinbid"]
    if jb.cpsat_available():
        assert flex["cpsat"]["best"] <= flex["twinbid"]["makespan"]
    # A random job shop of ft06's size (seed 1 by default), beside the public one.
    (rand,) = figures["random"]
    assert rand["instance"] == "ft06-r1" and rand["size"] == "6x6" and rand["like"] == "ft06"
    assert rand["twinbid"]["ok"] and rand["twinbid"]["feasible"] is True, rand["twinbid"]
    if jb.cpsat_available():
        assert rand["cpsat"]["best"] <= min(rand["twinbid"]["makespan"], rand["FIFO"])
        assert rand["twinbid_gap"] == bench_jobshop.gap(rand["twinbid"]["makespan"], rand["cpsat"]["best"])
    assert set(figures["sets"]) == {"public", "random"}
    assert figures["sets"]["random"]["instances"] == 1
    assert "Public and random sets side by side" in out
