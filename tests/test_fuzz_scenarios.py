"""Fuzzing scenario files: whatever the file holds, the loader answers with a clear error or a scenario.

``scenarios/loader.py`` promises that bad input surfaces as one :class:`ScenarioError` listing
``<file>: <field.path>: <what is wrong>`` and never as a traceback.  The cases: the shipped
scenario files mutated as text (lines dropped, swapped, duplicated, re-indented, bytes replaced,
YAML specials inserted) and as data (a value anywhere replaced by hostile YAML values, keys
removed or added, lists emptied or multiplied), plus hypothesis-built documents.  A case crashes
when anything but ``ScenarioError`` escapes, or the error message is empty or a traceback; it
hangs when loading took more than 5 s.
"""

from __future__ import annotations

import copy
import random
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from fuzzing import Tally, fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from scenarios.loader import ScenarioError, load_scenario_text
from scenarios.schema import Scenario

ROOT = Path(__file__).resolve().parents[1]
SEEDS = {p.name: p.read_text() for p in sorted((ROOT / "scenarios").glob("*.yaml"))}
TEXT_CASES, DATA_CASES, HYPOTHESIS_CASES, LONG = 1500, 1200, 300, 10
SLOW = 5.0

pytestmark = pytest.mark.timeout(900)

YAML_SPECIALS = [
    "&a [*a]", "*undefined", "!!python/object:os.system 'echo x'", "!!binary AAAA", "{", "]", "- - - -",
    "? complex key", "<<: *a", "%YAML 9.9", "---", "...", "\t", "\x00", "\ufeff", "~", ".inf", "-.inf",
    ".nan", "0x7fffffffffffffffff", "1e999", "2026-13-45", "yes", "no", "on", "null", "'", '"', "|", ">",
    "&b [*b, *b, *b, *b, *b, *b, *b, *b, *b]", "a" * 10_000,
]  # fmt: skip
HOSTILE_VALUES: list[Any] = [
    None, True, -1, 0, 10**30, -(10**30), 1e308, -0.0, "", " ", "x" * 5000, "../../etc/passwd", "\u0000",
    "mqtt://", "mqtts://:99999", "💥", [], {}, [None], {"": None}, [[[[[]]]]], {"uniform": [5, 1]},
    {"triangular": [1, 2]}, {"normal": [0, -1]}, float("inf"), float("nan"),
]  # fmt: skip


_TRACEBACK = "Traceback (most recent call last)"


def check(tally: Tally, text: str | bytes, source: str = "fuzz.yaml") -> None:
    tally.cases += 1
    started = time.monotonic()
    try:
        result = load_scenario_text(text, source)
    except ScenarioError as exc:
        message = str(exc)
        # A traceback's own first line, not the word: a file may name a field "Traceback" (hypothesis
        # draws the test's own string constants), and the error rightly echoes it.
        if not message.strip() or _TRACEBACK in message or not message.startswith(source):
            tally.crash(f"unclear error {message[:300]!r} for {str(text)[:300]!r}")
        else:
            tally.rejected += 1
    except Exception as exc:  # anything else is a traceback for the user
        tally.crash(f"{type(exc).__name__}: {exc!s:.300} for {str(text)[:300]!r}")
    else:
        if not isinstance(result, Scenario):
            tally.crash(f"returned {type(result).__name__}")
        else:
            tally.accepted += 1
    if time.monotonic() - started > SLOW:
        tally.hangs += 1
        tally.failures.append(f"took {time.monotonic() - started:.1f}s: {str(text)[:300]!r}")


def mutate_text(text: str, rng: random.Random) -> str | bytes:
    lines = text.splitlines()
    for _ in range(rng.choice((1, 1, 2, 3, 5))):
        if not lines:
            break
        i = rng.randrange(len(lines))
        op = rng.random()
        if op < 0.2:
            del lines[i]
        elif op < 0.3:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op < 0.4:
            lines.insert(i, lines[i])
        elif op < 0.5:
            lines[i] = " " * rng.choice((1, 2, 3, 7)) + lines[i]
        elif op < 0.75:
            line = lines[i]
            k = rng.randrange(len(line) + 1)
            lines[i] = line[:k] + rng.choice(YAML_SPECIALS) + line[k + rng.randint(0, 20) :]
        elif op < 0.9 and ":" in lines[i]:
            key = lines[i].split(":", 1)[0]
            lines[i] = f"{key}: {rng.choice(YAML_SPECIALS)}"
        else:
            lines[i] = lines[i][: rng.randrange(len(lines[i]) + 1)]
    out = "\n".join(lines)
    if rng.random() < 0.1:
        data = bytearray(out.encode())
        for _ in range(rng.randint(1, 5)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    return out


def mutate_data(doc: Any, rng: random.Random) -> Any:
    spots: list[tuple[Any, Any]] = []
    queue = [doc]
    while queue:
        node = queue.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            spots.append((node, k))
            queue.append(v)
    for _ in range(rng.choice((1, 1, 2, 4))):
        if not spots:
            break
        container, key = rng.choice(spots)
        op = rng.random()
        if op < 0.5:
            container[key] = rng.choice(HOSTILE_VALUES)
        elif op < 0.65 and isinstance(container, dict):
            container.pop(key, None)
        elif op < 0.75 and isinstance(container, dict):
            container[rng.choice(["bogus", "nmae", "resources", "order", "x" * 200])] = rng.choice(
                HOSTILE_VALUES
            )
        elif op < 0.9 and isinstance(container.get(key) if isinstance(container, dict) else None, list):
            container[key] = container[key] * rng.choice((0, 0, 2, 2, 3, 40))
        else:
            container[key] = {"uniform": [rng.choice(HOSTILE_VALUES), 1]}
    return doc


def _dump(doc: Any) -> str:
    try:
        return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
    except yaml.YAMLError:
        return str(doc)


def run_text(n: int, seed: int) -> Tally:
    rng = random.Random(seed)
    tally = Tally("scenario-files-text")
    for _ in range(n):
        name, text = rng.choice(sorted(SEEDS.items()))
        check(tally, mutate_text(text, rng), name)
    return tally


def run_data(n: int, seed: int) -> Tally:
    rng = random.Random(seed)
    tally = Tally("scenario-files-data")
    docs = {name: yaml.safe_load(text) for name, text in SEEDS.items()}
    for _ in range(n):
        name = rng.choice(sorted(docs))
        doc = copy.deepcopy(docs[name])
        check(tally, _dump(mutate_data(doc, rng)), name)
    return tally


YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=15), inner, max_size=4),
    max_leaves=15,
)


def run_hypothesis(n: int) -> Tally:
    tally = Tally("scenario-files-hypothesis")
    keys = [
        "name",
        "namespace",
        "broker",
        "security",
        "clock",
        "resources",
        "product_types",
        "orders",
        "faults",
    ]

    @fuzz_settings(n)
    @given(
        doc=st.dictionaries(st.sampled_from(keys) | st.text(max_size=10), YAML_VALUES, max_size=8)
        | YAML_VALUES
    )
    def fuzz(doc: Any) -> None:
        check(tally, _dump(doc))

    fuzz()
    return tally


def test_a_field_named_like_a_traceback_is_an_unknown_field_not_a_crash() -> None:
    """Found by the long fuzz run: a file with a field called "Traceback" got the clear error it
    should (unknown field, allowed ones listed, line), and the checker took the echoed name for a
    traceback (the checker now looks for a traceback's first line)."""
    tally = Tally("scenario-files-regression")
    check(tally, "name: {}\nTraceback: 1\norders:\n- - false\n")
    assert (tally.rejected, tally.crashed) == (1, 0)
    try:
        load_scenario_text("name: {}\nTraceback: 1\n", "fuzz.yaml")
    except ScenarioError as exc:
        assert "fuzz.yaml: Traceback: unknown field 'Traceback'" in str(exc)
    else:
        raise AssertionError("an unknown field was accepted")


def test_fuzz_scenario_text() -> None:
    tally = run_text(TEXT_CASES, seed=9)
    tally.check()
    assert tally.rejected > tally.cases // 3


def test_fuzz_scenario_data() -> None:
    tally = run_data(DATA_CASES, seed=9)
    tally.check()
    assert tally.rejected > tally.cases // 2


def test_fuzz_scenario_hypothesis() -> None:
    run_hypothesis(HYPOTHESIS_CASES).check()


@pytest.mark.fuzz_long
@pytest.mark.timeout(7200)
def test_fuzz_scenarios_long() -> None:
    run_text(TEXT_CASES * LONG, seed=1234).check()
    run_data(DATA_CASES * LONG, seed=1234).check()
    run_hypothesis(HYPOTHESIS_CASES * LONG).check()
