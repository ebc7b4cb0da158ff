"""Scenario format: examples, precise error messages, job-shop conversion, round trips, fuzzing."""

from __future__ import annotations

import ast
import copy
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import JOBSHOP_DIR
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scenarios.jobshop import (
    JobShopError,
    flexible_variant,
    jobshop_yaml,
    read_instance,
    scenario_from_jobshop,
)
from scenarios.loader import ScenarioError, dump_scenario, load_scenario, load_scenario_text
from scenarios.schema import Duration, KillFault, Scenario, Warehouse, Workstation

REPO = Path(__file__).parents[1]
SCENARIOS = REPO / "scenarios"
JOBSHOP = JOBSHOP_DIR
EXAMPLES = ["demo.yaml", "aircraft-sensor.yaml", "ft06.yaml"]
DEMO_TEXT = (SCENARIOS / "demo.yaml").read_text(encoding="utf-8")
DEMO_DATA = yaml.safe_load(DEMO_TEXT)
INSTANCES = sorted(JOBSHOP.glob("*.txt"))
INDEX = {e["file"]: e for e in json.loads((JOBSHOP / "index.json").read_text())}


def problems_of(text: str, source: str = "bad.yaml") -> list[str]:
    with pytest.raises(ScenarioError) as info:
        load_scenario_text(text, source=source)
    lines = str(info.value).splitlines()
    assert lines and all(line.startswith(f"{source}: ") for line in lines), lines
    assert len(lines) == len(info.value.problems)
    return lines


def demo_with(mutate: Any) -> str:
    data = copy.deepcopy(DEMO_DATA)
    mutate(data)
    return yaml.safe_dump(data, sort_keys=False)


def assert_problem(lines: list[str], path: str, fragment: str, source: str = "bad.yaml") -> None:
    prefix = f"{source}: {path}: "
    hits = [line for line in lines if line.startswith(prefix)]
    assert hits, f"no problem at {path!r} in:\n" + "\n".join(lines)
    assert any(fragment in line for line in hits), f"{fragment!r} not in:\n" + "\n".join(hits)


# --------------------------------------------------------------------------- the examples


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_load_and_round_trip(name: str) -> None:
    scenario = load_scenario(SCENARIOS / name)
    assert isinstance(scenario, Scenario)
    again = load_scenario_text(dump_scenario(scenario), source="dumped")
    assert again == scenario
    assert dump_scenario(again) == dump_scenario(scenario)
    names = scenario.agent_names()
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"[a-z0-9-]+", n) for n in names)


def test_demo_shape() -> None:
    s = load_scenario(SCENARIOS / "demo.yaml")
    kinds = [r.kind for r in s.resources]
    assert kinds.count("workstation") == 3 and kinds.count("warehouse") == 1
    products = s.product_instances()
    assert 8 <= len(products) <= 12
    assert {p.type for p in products} == {"bracket", "housing"}
    assert {p.priority for p in products} == {1, 5}
    assert s.clock.kind == "virtual"
    assert [p.name for p in products[:3]] == ["bracket-1", "bracket-2", "bracket-3"]
    # interval spreads releases; lead_time is relative to each release
    housing_late = [p for p in products if p.type == "housing" and p.priority == 5]
    assert [p.release for p in housing_late] == [10, 15, 20]
    early = [p for p in products if p.type == "housing" and p.priority == 1]
    assert all(p.due == p.release + 30 for p in early)


def test_aircraft_sensor_shape() -> None:
    s = load_scenario(SCENARIOS / "aircraft-sensor.yaml")
    products = s.product_instances()
    assert len(products) == 100
    assert {p.priority for p in products} == {1, 2, 3, 4, 5}
    assert len({p.release for p in products}) > 20
    caps = s.capabilities()
    for stage in ("cnc-milling", "sensor-assembly", "pressure-calibration", "functional-test"):
        assert len(caps[stage]) >= 2, stage
    assert "retrieve" in caps and "store" in caps
    stations = [r for r in s.resources if isinstance(r, Workstation)]
    rates = {c.cost_rate for r in stations for c in r.capabilities if c.name == "sensor-assembly"}
    assert len(rates) == 2
    assert {w.name for w in s.resources if isinstance(w, Warehouse)} == {"raw-stores", "finished-goods"}
    assert {v.name for v in s.vendors} == {p.vendor for p in products if p.vendor}


# --------------------------------------------------------------------------- invalid files


def _set(path: list[Any], value: Any) -> Any:
    def mutate(data: Any) -> None:
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


INVALID = [
    # wrong types
    ("capacity text", _set(["resources", 0, "capacity"], "lots"), "resources[0].capacity", "valid integer"),
    ("seed float", _set(["seed"], 4.5), "seed", "valid integer"),
    ("priority range", _set(["orders", 0, "priority"], 7), "orders[0].priority", "less than or equal to 5"),
    ("bool as number", _set(["orders", 0, "release"], True), "orders[0].release", "valid number"),
    (
        "bad duration",
        _set(["resources", 2, "capabilities", 0, "duration"], {"uniform": [6, 4]}),
        "resources[2].capabilities[0].duration",
        "0 <= lo <= hi",
    ),
    (
        "duration shape",
        _set(["resources", 1, "capabilities", 0, "duration"], {"gamma": [1, 2]}),
        "resources[1].capabilities[0].duration",
        "expected a number",
    ),
    ("short name", _set(["resources", 1, "name"], "Mill Fast"), "resources[1].name", "short name"),
    ("namespace", _set(["namespace"], "my/plant"), "namespace", "short name"),
    ("list not mapping", _set(["clock"], ["virtual"]), "clock", "expected a mapping"),
    (
        "unknown field",
        _set(["resources", 0, "capacty"], 3),
        "resources[0].capacty",
        "did you mean 'capacity'",
    ),
    ("unknown top field", _set(["resource"], []), "resource", "did you mean 'resources'"),
    ("unknown kind", _set(["resources", 3, "kind"], "robot"), "resources[3]", "unknown kind 'robot'"),
    ("clock scale", _set(["clock"], {"kind": "accelerated"}), "clock", "time_scale"),
    ("broker", _set(["broker"], "http://example.org"), "broker", "MQTT URL"),
    # unknown capability in a plan / a step nobody can do
    (
        "unknown capability",
        _set(["product_types", 0, "plan", 2], {"capability": "driling"}),
        "product_types[0].plan[2].capability",
        "unknown capability 'driling'",
    ),
    (
        "nobody can do",
        _set(["product_types", 1, "plan", 2], {"alternatives": ["welding", "painting"]}),
        "product_types[1].plan[2].alternatives",
        "nobody can do this step",
    ),
    (
        "item not stocked",
        _set(["product_types", 0, "plan", 0, "parameters"], {"item": "steel"}),
        "product_types[0].plan[0].parameters.item",
        "no warehouse stocks item 'steel'",
    ),
    (
        "capability and alternatives",
        _set(["product_types", 0, "plan", 1, "alternatives"], ["drilling"]),
        "product_types[0].plan[1]",
        "not both",
    ),
    # duplicates
    (
        "duplicate resource",
        _set(["resources", 2, "name"], "mill-fast"),
        "resources[2].name",
        "duplicate name 'mill-fast'",
    ),
    (
        "resource named like a product",
        _set(["resources", 3, "name"], "housing-2"),
        "resources[3].name",
        "short name of a product instance",
    ),
    (
        "duplicate product type",
        _set(["product_types", 1, "name"], "bracket"),
        "product_types[1].name",
        "duplicate product type",
    ),
    (
        "sanitised type collision",
        _set(["product_types", 1, "name"], "Bracket"),
        "product_types[1].name",
        "same product short names",
    ),
    # references
    (
        "unknown product type",
        _set(["orders", 1, "type"], "hosing"),
        "orders[1].type",
        "unknown product type 'hosing'",
    ),
    ("unknown vendor", _set(["orders", 1, "vendor"], "acme"), "orders[1].vendor", "unknown vendor 'acme'"),
    (
        "unknown location",
        _set(["transport", "legs", 1, "to"], "cell-x"),
        "transport.legs[1].to",
        "unknown location 'cell-x'",
    ),
    (
        "unknown agent",
        _set(["faults"], [{"at": 5, "kill": "nobody"}]),
        "faults[0].kill",
        "unknown agent 'nobody'",
    ),
    ("fault shape", _set(["faults"], [{"at": 5}]), "faults[0]", "restart_broker: true"),
    ("due before release", _set(["orders", 3, "due"], 12), "orders[3]", "before the last instance's release"),
]


@pytest.mark.parametrize(("label", "mutate", "path", "fragment"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_scenario_messages(label: str, mutate: Any, path: str, fragment: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(demo_with(mutate), encoding="utf-8")
    with pytest.raises(ScenarioError) as info:
        load_scenario(bad)
    lines = str(info.value).splitlines()
    assert_problem(lines, path, fragment, source=str(bad))
    assert all(line.startswith(f"{bad}: ") for line in lines)


def test_several_problems_reported_together_with_lines() -> None:
    text = DEMO_TEXT.replace("capacity: 40", "capacity: lots").replace("seed: 42", "seed: many")
    lines = problems_of(text, "demo.yaml")
    assert_problem(lines, "seed", "(got 'many')", "demo.yaml")
    assert_problem(lines, "resources[0].capacity", "(got 'lots')", "demo.yaml")
    line_no = DEMO_TEXT.splitlines().index(
        "seed: 42                        # every random draw of the run derives from it"
    )
    assert any(line.endswith(f"(line {line_no + 1})") for line in lines if ": seed: " in line)


def test_missing_required_fields() -> None:
    lines = problems_of("name: x\nnamespace: x\n")
    assert_problem(lines, "resources", "missing required field")
    assert_problem(lines, "product_types", "missing required field")


def test_bad_yaml_syntax_has_line_and_column() -> None:
    lines = problems_of("name: x\nresources: [\n  - a\n", "broken.yaml")
    assert len(lines) == 1
    assert re.match(r"broken\.yaml: line \d+, column \d+: YAML syntax error: ", lines[0]), lines


def test_empty_file(tmp_path: Path) -> None:
    for text in ("", "# only a comment\n", "---\n", "null\n"):
        (tmp_path / "empty.yaml").write_text(text)
        with pytest.raises(ScenarioError, match=r"empty\.yaml: the file is empty"):
            load_scenario(tmp_path / "empty.yaml")


def test_top_level_not_a_mapping() -> None:
    for text, what in (("- a\n- b\n", "a list"), ("42\n", "a number"), ("just text\n", "text")):
        (line,) = problems_of(text)
        assert "top level must be a mapping" in line and what in line


def test_duplicate_key() -> None:
    lines = problems_of(DEMO_TEXT.replace("seed: 42", "seed: 42\nseed: 43"))
    assert_problem(lines, "seed", "key given twice")


def test_unreadable_and_non_utf8(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "missing.yaml")
    (tmp_path / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ScenarioError, match="not UTF-8"):
        load_scenario(tmp_path / "latin1.yaml")


def test_billion_laughs_and_recursive_alias() -> None:
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        levels.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    problems_of("\n".join(levels) + "\n")
    problems_of("a: &a [*a]\n")


# --------------------------------------------------------------------------- helpers of the schema


def test_helpers() -> None:
    s = load_scenario(SCENARIOS / "demo.yaml")
    assert s.locations() == ["stores", "cell-a", "cell-b", "cell-c"]
    assert s.capabilities()["milling"] == ("mill-fast", "mill-slow")
    assert s.transport.time("cell-b", "cell-a") == 1  # symmetric leg
    assert s.transport.time("stores", "cell-c") == 2  # default
    assert s.transport.time("cell-a", "cell-a") == 0
    assert s.semantic_id("milling") == "https://twinbid.dev/capabilities/milling"
    assert s.broker_mode == "embedded"
    step = s.product_type("housing").plan[2]
    assert step.capabilities == ("assembly", "drilling")
    assert s.processing_time(step, "mill-slow") == Duration.fixed(3)
    assert s.processing_time(step, "stores") is None


def test_duration_sampling_is_seeded_and_bounded() -> None:
    for spec in ({"uniform": [2, 4]}, {"triangular": [1, 2, 5]}, {"normal": [1, 3]}, 3):
        d = Duration.parse(spec)
        a = [d.sample(random.Random(7)) for _ in range(3)]
        assert a == [d.sample(random.Random(7)) for _ in range(3)]
        rng = random.Random(1)
        draws = [d.sample(rng) for _ in range(500)]
        assert min(draws) >= 0
        if isinstance(spec, dict) and "normal" not in spec:
            lo, hi = next(iter(spec.values()))[0], next(iter(spec.values()))[-1]
            assert lo <= min(draws) and max(draws) <= hi
        assert d.to_data() == (float(spec) if isinstance(spec, int) else spec)


def test_faults_may_name_products_and_resources() -> None:
    text = demo_with(
        _set(
            ["faults"],
            [
                {"at": 3, "kill": "housing-5", "restart_after": 1},
                {"at": 4, "kill": "stores"},
                {"at": 5, "restart_broker": True},
            ],
        )
    )
    s = load_scenario_text(text)
    assert isinstance(s.faults[0], KillFault) and s.faults[0].kill == "housing-5"
    assert s.faults[2].restart_broker is True


# --------------------------------------------------------------------------- job-shop conversion


@pytest.mark.parametrize("path", INSTANCES, ids=[p.stem for p in INSTANCES])
def test_jobshop_conversion(path: Path) -> None:
    inst = read_instance(path)
    meta = INDEX[path.name]
    assert (inst.n_jobs, inst.n_machines) == (meta["jobs"], meta["machines"])
    assert inst.optimum == meta["optimum"]
    s = scenario_from_jobshop(path)
    assert len(s.resources) == inst.n_machines
    assert [r.name for r in s.resources] == [f"m{k}" for k in range(inst.n_machines)]
    products = s.product_instances()
    assert len(products) == inst.n_jobs
    assert sum(len(p.plan) for p in products) == inst.n_jobs * inst.n_machines
    assert all(p.release == 0 and p.priority == 1 for p in products)
    caps = s.capabilities()
    assert all(len(owners) == 1 for owners in caps.values())
    for job, p in zip(inst.jobs, products, strict=True):
        assert [(int(st.capability[len("machine-") :]), st.duration.mean) for st in p.plan] == list(job)
        for step, (machine, _) in zip(p.plan, job, strict=True):
            assert caps[step.capability] == (f"m{machine}",)
    assert s.clock.kind == "virtual" and s.transport.default_time == 0
    assert all(c.setup == 0 and c.cost_rate == 1 for r in s.resources for c in r.capabilities)
    assert s.benchmark is not None and s.benchmark.optimum == meta["optimum"]
    assert load_scenario_text(dump_scenario(s)) == s


@pytest.mark.parametrize("k", [2, 3])
def test_flexible_variant(k: int) -> None:
    inst = read_instance(JOBSHOP / "la01.txt")
    flex = flexible_variant(inst, k, seed=5)
    assert flex == flexible_variant(inst, k, seed=5)
    assert flex != flexible_variant(inst, k, seed=6)
    for job, pt in zip(inst.jobs, flex.product_types, strict=True):
        for (machine, duration), step in zip(job, pt.plan, strict=True):
            alts = step.alternatives
            assert alts is not None and len(alts) == k
            assert alts[0].capability == f"machine-{machine}"
            assert len({a.capability for a in alts}) == k
            assert all(a.duration == Duration.fixed(duration) for a in alts)
    assert flex.benchmark is not None and flex.benchmark.upper_bound == inst.optimum
    varied = flexible_variant(inst, k, seed=5, variation=0.2)
    for job, pt in zip(inst.jobs, varied.product_types, strict=True):
        for (_, duration), step in zip(job, pt.plan, strict=True):
            assert step.alternatives[0].duration.mean == duration
            for alt in step.alternatives[1:]:
                assert 0.8 * duration - 0.5 <= alt.duration.mean <= 1.2 * duration + 0.5
    assert load_scenario_text(dump_scenario(varied)) == varied
    with pytest.raises(ValueError):
        flexible_variant(inst, inst.n_machines + 1)


def test_ft06_yaml_is_regenerated_identically() -> None:
    assert load_scenario(SCENARIOS / "ft06.yaml") == scenario_from_jobshop(JOBSHOP / "ft06.txt")
    assert (SCENARIOS / "ft06.yaml").read_text(encoding="utf-8") == jobshop_yaml(JOBSHOP / "ft06.txt")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "no data"),
        ("# c\n2 2\n0 1 1 2\n", "expected 2 job lines"),
        ("2 2\n0 1 1 2\n0 1 1\n", "line 3: job 1: expected 4 numbers"),
        ("2 2\n0 1 1 2\n0 1 5 2\n", "line 3: job 1, operation 1: machine 5 is not in 0..1"),
        ("2 2\n0 1 1 x\n0 1 1 2\n", "line 2: expected whole numbers, found 'x'"),
        ("2\n", "line 1: the first data line must be 'n m'"),
        ("1 1\n0 -3\n", "negative duration"),
        ("1 1\n0 3\n0 3\n", "line 3: expected 1 job lines"),
    ],
)
def test_malformed_jobshop_files(text: str, fragment: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text(text)
    with pytest.raises(JobShopError) as info:
        read_instance(bad)
    assert str(info.value).startswith(f"{bad}: ")
    assert fragment in str(info.value)
    assert isinstance(info.value, ScenarioError)


# --------------------------------------------------------------------------- robustness


def _never_crashes(text: str | bytes) -> None:
    try:
        load_scenario_text(text, source="fuzz.yaml")
    except ScenarioError as exc:
        assert str(exc).startswith("fuzz.yaml: ")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_garbage_gives_only_scenario_errors(text: str | bytes) -> None:
    _never_crashes(text)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(list(DEMO_TEXT)), max_size=20), st.data())
def test_text_mutations_give_only_scenario_errors(chars: list[str], data: st.DataObject) -> None:
    pos = data.draw(st.integers(0, len(DEMO_TEXT)))
    cut = data.draw(st.integers(0, 30))
    _never_crashes(DEMO_TEXT[:pos] + "".join(chars) + DEMO_TEXT[pos + cut :])


yaml_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**20), 10**20),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
        st.sampled_from(["kind", "workstation", "warehouse", "milling", "bracket", "stores"]),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), children, max_size=4),
    ),
    max_leaves=12,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_structural_mutations_give_only_scenario_errors(data: st.DataObject) -> None:
    doc = copy.deepcopy(DEMO_DATA)
    for _ in range(data.draw(st.integers(1, 4))):
        paths = _paths(doc)
        path = data.draw(st.sampled_from(paths))
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if not path:
            if action == "replace":
                doc = data.draw(yaml_values)
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if action == "replace":
            parent[path[-1]] = data.draw(yaml_values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=8))] = data.draw(yaml_values)
        else:
            parent.append(data.draw(yaml_values))
    try:
        text = yaml.dump(doc, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False)
    except yaml.YAMLError:
        return
    _never_crashes(text)


# --------------------------------------------------------------------------- dependency rule


@pytest.mark.parametrize("module", ["schema.py", "loader.py", "jobshop.py"])
def test_modules_import_only_stdlib_pydantic_yaml(module: str) -> None:
    import sys

    tree = ast.parse((SCENARIOS / module).read_text(encoding="utf-8"))
    allowed = set(sys.stdlib_module_names) | {"pydantic", "pydantic_core", "yaml", "scenarios", "__future__"}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            assert name.split(".")[0] in allowed, f"{module} imports {name}"
            if name.startswith("scenarios."):
                assert name in ("scenarios.schema", "scenarios.loader"), f"{module} imports {name}"
