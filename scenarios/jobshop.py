"""Classic job-shop benchmark instances as scenarios, to measure schedule quality.

Instance format (OR-Library / JSPLIB, see ``data/jobshop/README.md``): ``#`` starts a comment
line; then ``n m`` (jobs, machines); then one line per job with ``m`` pairs ``machine duration``
in processing order, machines numbered from 0.

Conversion (:func:`scenario_from_jobshop`): machine ``k`` becomes workstation ``m<k>`` offering
only capability ``machine-<k>``; job ``j`` becomes product type ``job-<j>`` whose plan has one
step per operation, naming capability ``machine-<k>`` and carrying the operation's duration on
the step (the same machine takes different times for different jobs); one order per job, quantity
1, released at 0, priority 1 (earliest completion). Virtual clock, zero transport, zero set-up,
cost rate 1 everywhere, so the makespan of a run compares directly with the known optimum.

:func:`flexible_variant` makes the flexible job-shop version: each operation may also be done by
other machines (see its docstring for the exact, seeded rule).

:func:`random_instance` draws a job shop of a given size (Taillard's scheme, seeded), and
:func:`random_like` one of a public instance's size and duration range, so schedule quality can
be measured on instances no rule was tuned on.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from scenarios.loader import Problem, ScenarioError, dump_scenario
from scenarios.schema import Scenario, short_name_from

__all__ = [
    "JobShopError",
    "JobShopInstance",
    "flexible_variant",
    "jobshop_yaml",
    "known_optimum",
    "random_instance",
    "random_like",
    "read_instance",
    "scenario_from_jobshop",
]


class JobShopError(ScenarioError):
    """A job-shop instance file is malformed (``<file>: line N: <what is wrong>``)."""


@dataclass(frozen=True)
class JobShopInstance:
    name: str
    n_jobs: int
    n_machines: int
    #: Per job, its operations in order as (machine, duration).
    jobs: tuple[tuple[tuple[int, int], ...], ...]
    #: Proven optimal makespan from the sibling ``index.json``, when listed there.
    optimum: int | None = None
    source: str | None = None

    @property
    def n_operations(self) -> int:
        return sum(len(job) for job in self.jobs)


def read_instance(path: str | PathLike[str]) -> JobShopInstance:
    """Parse an instance file; raises :class:`JobShopError` naming the file and line."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise JobShopError([Problem(source, "", f"cannot read the file: {exc}")]) from None

    def fail(line: int | None, message: str) -> JobShopError:
        return JobShopError([Problem(source, "", message, line)])

    rows: list[tuple[int, list[int]]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            rows.append((number, [int(tok) for tok in stripped.split()]))
        except ValueError:
            bad = next(tok for tok in stripped.split() if not _is_int(tok))
            raise fail(number, f"expected whole numbers, found {bad!r}") from None
    if not rows:
        raise fail(None, "no data: expected a line 'n m' (jobs, machines) and one line per job")
    header_line, header = rows[0]
    if len(header) != 2 or header[0] < 1 or header[1] < 1:
        raise fail(
            header_line, "the first data line must be 'n m': number of jobs and of machines, both >= 1"
        )
    n, m = header
    job_rows = rows[1:]
    if len(job_rows) != n:
        line = job_rows[n][0] if len(job_rows) > n else None
        raise fail(line, f"expected {n} job lines after 'n m', found {len(job_rows)}")
    jobs: list[tuple[tuple[int, int], ...]] = []
    for j, (line, values) in enumerate(job_rows):
        if len(values) != 2 * m:
            raise fail(
                line, f"job {j}: expected {2 * m} numbers ({m} pairs 'machine duration'), found {len(values)}"
            )
        ops = tuple((values[k], values[k + 1]) for k in range(0, len(values), 2))
        for k, (machine, duration) in enumerate(ops):
            if not 0 <= machine < m:
                raise fail(line, f"job {j}, operation {k}: machine {machine} is not in 0..{m - 1}")
            if duration < 0:
                raise fail(line, f"job {j}, operation {k}: negative duration {duration}")
        jobs.append(ops)
    p = Path(path)
    return JobShopInstance(p.stem, n, m, tuple(jobs), known_optimum(p), source)


def known_optimum(path: str | PathLike[str]) -> int | None:
    """The optimum listed for this file in ``index.json`` next to it, if any."""
    p = Path(path)
    try:
        index = json.loads((p.parent / "index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(index, list):
        return None
    for entry in index:
        if isinstance(entry, dict) and (entry.get("file") == p.name or entry.get("name") == p.stem):
            optimum = entry.get("optimum")
            return optimum if isinstance(optimum, int) else None
    return None


def random_instance(
    n_jobs: int, n_machines: int, seed: int | str, *, low: int = 1, high: int = 99, name: str | None = None
) -> JobShopInstance:
    """A random job shop (Taillard's scheme): every job visits every machine once, in an order
    drawn uniformly, each operation taking a whole duration drawn uniformly in ``[low, high]``.

    ``random.Random(seed)`` draws, job by job, first the machine order (a shuffle) and then the
    durations in that order, so the same arguments always give the same instance (a string seed
    too: Python seeds from its SHA-512, not from the salted ``hash``). No optimum is
    known (``optimum=None``): measure against a solver's best (e.g. CP-SAT).
    """
    if n_jobs < 1 or n_machines < 1:
        raise ValueError(f"a job shop needs at least one job and one machine, not {n_jobs}x{n_machines}")
    if not 0 <= low <= high:
        raise ValueError(f"durations must satisfy 0 <= low <= high, not [{low}, {high}]")
    rng = random.Random(seed)
    jobs = []
    for _ in range(n_jobs):
        order = list(range(n_machines))
        rng.shuffle(order)
        jobs.append(tuple((m, rng.randint(low, high)) for m in order))
    label = name or f"rand-{n_jobs}x{n_machines}-s{seed}"
    return JobShopInstance(label, n_jobs, n_machines, tuple(jobs), None, f"random_instance(seed={seed!r})")


def random_like(inst: JobShopInstance, seed: int) -> JobShopInstance:
    """A random job shop of ``inst``'s size whose durations span ``inst``'s own range, named
    ``<inst>-r<seed>`` and drawn from that name, so public instances of one size and range (la01
    and la02: 10x5, 12..98 and 12..99) still get different random ones."""
    durations = [d for job in inst.jobs for _, d in job]
    name = f"{inst.name}-r{seed}"
    return random_instance(
        inst.n_jobs, inst.n_machines, name, low=min(durations), high=max(durations), name=name
    )


def scenario_from_jobshop(
    source: str | PathLike[str] | JobShopInstance, *, name: str | None = None
) -> Scenario:
    """The scenario of a job-shop instance (file or parsed instance); see the module docstring."""
    inst = source if isinstance(source, JobShopInstance) else read_instance(source)
    plans = [
        [{"capability": _cap(machine), "duration": duration} for machine, duration in job]
        for job in inst.jobs
    ]
    return _build(
        inst,
        plans,
        name=name or inst.name,
        description=f"Job-shop instance {inst.name}: {inst.n_jobs} jobs x {inst.n_machines} machines.",
        benchmark={"instance": inst.name, **({"optimum": inst.optimum} if inst.optimum is not None else {})},
        seed=0,
    )


def flexible_variant(
    source: str | PathLike[str] | JobShopInstance,
    alternatives: int = 2,
    seed: int = 0,
    *,
    variation: float = 0.0,
    name: str | None = None,
) -> Scenario:
    """A flexible job-shop scenario: every operation can be done on ``alternatives`` machines.

    For each operation, in job order, a ``random.Random(seed)`` draws ``alternatives - 1`` other
    machines uniformly among the remaining ones. The step lists the original machine first, then
    the drawn ones in increasing machine number. The original machine keeps the original
    duration; each other machine takes ``round(d * f)`` with ``f`` uniform in
    ``[1 - variation, 1 + variation]`` (at least 1 when ``d > 0``). With the default
    ``variation=0`` every machine takes the original duration, so the original schedule is
    still feasible and the instance's optimum is an upper bound (``benchmark.upper_bound``).
    ``alternatives`` may be 1 (the classic instance) up to the number of machines.
    """
    inst = source if isinstance(source, JobShopInstance) else read_instance(source)
    if not 1 <= alternatives <= inst.n_machines:
        raise ValueError(f"alternatives must be in 1..{inst.n_machines} for {inst.name}, not {alternatives}")
    if not 0 <= variation < 1:
        raise ValueError(f"variation must be in [0, 1), not {variation}")
    rng = random.Random(seed)
    plans: list[list[dict[str, Any]]] = []
    for job in inst.jobs:
        steps: list[dict[str, Any]] = []
        for machine, duration in job:
            others = sorted(rng.sample([k for k in range(inst.n_machines) if k != machine], alternatives - 1))
            options: list[dict[str, Any]] = [{"capability": _cap(machine), "duration": duration}]
            for k in others:
                d = duration
                if variation:
                    d = round(duration * rng.uniform(1 - variation, 1 + variation))
                    d = max(d, 1) if duration > 0 else 0
                options.append({"capability": _cap(k), "duration": d})
            steps.append({"alternatives": options})
        plans.append(steps)
    benchmark: dict[str, Any] = {"instance": inst.name}
    if inst.optimum is not None and variation == 0:
        benchmark["upper_bound"] = inst.optimum
    label = f"{inst.name}-flex{alternatives}"
    return _build(
        inst,
        plans,
        name=name or label,
        description=(
            f"Flexible variant of job-shop instance {inst.name}: each operation on "
            f"{alternatives} machines (seed {seed}, duration variation {variation:g})."
        ),
        benchmark=benchmark,
        seed=seed,
    )


def jobshop_yaml(source: str | PathLike[str] | JobShopInstance, *, name: str | None = None) -> str:
    """The scenario file text for an instance: an explanatory comment header plus the YAML.

    ``scenarios/ft06.yaml`` is exactly ``jobshop_yaml("data/jobshop/ft06.txt")``; regenerate
    with ``python -m scenarios.jobshop data/jobshop/ft06.txt > scenarios/ft06.yaml``.
    """
    inst = source if isinstance(source, JobShopInstance) else read_instance(source)
    scenario = scenario_from_jobshop(inst, name=name)
    optimum = f"{inst.optimum}" if inst.optimum is not None else "unknown"
    header = f"""\
Job-shop benchmark {inst.name} ({inst.n_jobs} jobs x {inst.n_machines} machines) as a scenario.
GENERATED by scenarios/jobshop.py from {Path(inst.source or inst.name).name}; do not edit by hand:
  python -m scenarios.jobshop data/jobshop/{Path(inst.source or inst.name).name} > scenarios/{inst.name}.yaml

Conversion (see docs/scenarios.md, "Job-shop instances"):
- machine k -> workstation m<k>, the only resource offering capability machine-<k>;
  the capability has no duration of its own: each plan step carries its operation's duration;
- job j -> product type job-<j>, one plan step per operation in order; one order per job:
  one product (job-<j>-1), released at 0, priority 1 (earliest completion);
- all at one location with zero transport times, zero set-up, cost rate 1 (the defaults,
  so they do not appear below), virtual clock (the default).
Schedule quality: (makespan - benchmark.optimum) / benchmark.optimum; optimum = {optimum}."""
    return dump_scenario(scenario, header=header)


def main(argv: list[str] | None = None) -> int:
    """``python -m scenarios.jobshop FILE [--flexible K --seed S --variation V]``: print the YAML."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m scenarios.jobshop", description=main.__doc__)
    parser.add_argument("instance")
    parser.add_argument("--name")
    parser.add_argument(
        "--flexible", type=int, metavar="K", help="flexible variant, K machines per operation"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variation", type=float, default=0.0)
    args = parser.parse_args(argv)
    try:
        if args.flexible:
            text = dump_scenario(
                flexible_variant(
                    args.instance, args.flexible, args.seed, variation=args.variation, name=args.name
                )
            )
        else:
            text = jobshop_yaml(args.instance, name=args.name)
    except (ScenarioError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


def _build(
    inst: JobShopInstance,
    plans: list[list[dict[str, Any]]],
    *,
    name: str,
    description: str,
    benchmark: dict[str, Any],
    seed: int,
) -> Scenario:
    data = {
        "name": name,
        "description": description,
        "namespace": _namespace(name),
        "clock": {"kind": "virtual"},
        "seed": seed,
        "transport": {"default_time": 0},
        "resources": [
            {
                "kind": "workstation",
                "name": f"m{k}",
                "location": "shop",
                "capabilities": [{"name": _cap(k), "setup": 0, "cost_rate": 1}],
            }
            for k in range(inst.n_machines)
        ],
        "product_types": [{"name": f"job-{j}", "plan": plan} for j, plan in enumerate(plans)],
        "orders": [
            {"type": f"job-{j}", "quantity": 1, "priority": 1, "release": 0} for j in range(inst.n_jobs)
        ],
        "benchmark": benchmark,
    }
    return Scenario.model_validate(data)


def _cap(machine: int) -> str:
    return f"machine-{machine}"


def _namespace(name: str) -> str:
    return short_name_from(name) or "jobshop"


def _is_int(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
