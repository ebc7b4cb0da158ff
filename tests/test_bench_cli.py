"""`twinbid bench NAME [--json] [ARGS...]` and `twinbid bench --list`, run as a user runs them (real processes).

The benchmarks are the repository's bench/bench_*.py scripts; a new script there is a new benchmark.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import HAVE_MOSQUITTO

REPO = Path(__file__).resolve().parents[1]
KNOWN = ("aas", "jobshop", "negotiation", "recovery", "registry", "transport")


def twinbid(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "twinbid.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def test_list_shows_every_benchmark_with_its_description() -> None:
    result = twinbid("bench", "--list")
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines())
    scripts = {p.stem.removeprefix("bench_") for p in (REPO / "bench").glob("bench_*.py")}
    assert set(KNOWN) <= scripts == set(lines)
    assert lines["aas"].startswith("AAS server benchmark")
    assert lines["transport"].startswith("Transport benchmark: QoS 1 throughput")


def test_a_real_benchmark_ends_with_its_json_object() -> None:
    broker = "mosquitto" if HAVE_MOSQUITTO else "embedded"
    result = twinbid(
        "bench", "transport", "--json", "--broker", broker,
        "--messages", "300", "--latency-messages", "50", "--rate", "500", "--repeat", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert isinstance(figures, dict) and figures["messages"] == 300
    assert figures[broker]["throughput"] > 0 and figures[broker]["p50_ms"] > 0, figures
    assert figures["machine"]["python"]


def test_new_scripts_arguments_json_exit_codes_and_a_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "bench_scale.py").write_text(
        '"""Scale: how far the swarm grows.\n\nMore text.\n"""\n'
        "import argparse, json, sys\n"
        "if __name__ == '__main__':\n"
        "    p = argparse.ArgumentParser()\n"
        "    p.add_argument('--json', action='store_true')\n"
        "    p.add_argument('--agents', type=int, default=1)\n"
        "    a = p.parse_args()\n"
        "    print('table')\n"
        "    print(json.dumps({'agents': a.agents, 'json': a.json, 'argv': sys.argv[1:]}))\n"
    )
    (tmp_path / "bench_plain.py").write_text(  # always ends with JSON; refuses --json
        "import argparse, sys\n"
        "p = argparse.ArgumentParser()\n"
        "p.add_argument('--fail', type=int, default=0)\n"
        "a = p.parse_args()\n"
        "print('{}')\n"
        "sys.exit(a.fail)\n"
    )
    (tmp_path / "helper.py").write_text('"""not a benchmark"""\n')
    env = {"TWINBID_BENCH_DIR": str(tmp_path)}

    listing = twinbid("bench", "--list", env=env)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines() == ["plain", "scale  Scale: how far the swarm grows."]

    result = twinbid("bench", "scale", "--agents", "7", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "agents": 7,
        "json": True,
        "argv": ["--agents", "7", "--json"],
    }
    # a benchmark without --json is not given it; its own exit code comes back
    assert twinbid("bench", "plain", "--json", env=env).returncode == 0
    failed = twinbid("bench", "plain", "--fail", "3", env=env)
    assert failed.returncode == 3 and failed.stdout.strip() == "{}"
    # arguments after `--` all go to the benchmark, even our own option names
    help_text = twinbid("bench", "scale", "--", "--help", env=env)
    assert help_text.returncode == 0 and "--agents" in help_text.stdout

    unknown = twinbid("bench", "nope", env=env)
    assert unknown.returncode == 2 and "no benchmark 'nope'" in unknown.stderr and "scale" in unknown.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    missing = twinbid("bench", "--list", env={"TWINBID_BENCH_DIR": str(empty)})
    assert missing.returncode == 2
    assert "no benchmarks in" in missing.stderr and "editable" in missing.stderr
