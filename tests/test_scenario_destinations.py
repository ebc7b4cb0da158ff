"""Shipped scenarios send nothing beyond loopback, and a vendor key that is not there is an error.

aircraft-sensor used to POST progress to a host outside the machine, and without
``AIRFRAMER_API_KEY`` it started a plant whose order-taking service silently did not start while
`twinbid validate` called the file valid.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from scenarios.launcher import RunOptions, run
from scenarios.loader import ScenarioError, load_scenario_text

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "scenarios").glob("*.yaml"))
LOOPBACK_NAMES = {"localhost"}


def _strings(node: Any, where: str = "") -> list[tuple[str, str]]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in _strings(v, f"{where}.{k}")]
    if isinstance(node, list):
        return [s for i, v in enumerate(node) for s in _strings(v, f"{where}[{i}]")]
    return [(where, node)] if isinstance(node, str) else []


def _loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def test_there_are_shipped_scenarios() -> None:
    assert {p.name for p in SHIPPED} >= {"demo.yaml", "aircraft-sensor.yaml", "ft06.yaml", "chaos.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_scenarios_name_only_loopback_destinations(path: Path) -> None:
    """Every URL anywhere in the file (notify, broker, database, whatever field comes next)."""
    data = yaml.safe_load(path.read_text())
    outside = [
        (where, value)
        for where, value in _strings(data)
        if "://" in value and not _loopback(urlsplit(value.strip()).hostname or "")
    ]
    assert not outside, f"{path.name} sends beyond this machine: {outside}"


TINY = """
name: tiny-vendor-line
namespace: tinyvendor
clock: {kind: virtual}
transport: {default_time: 0}
vendors:
  - {name: acme, api_key_env: TWINBID_TEST_UNSET_KEY_7F3A, OPTIONAL}
resources:
  - {kind: workstation, name: ws-a, location: a, capabilities: [{name: turning, duration: 3, cost_rate: 1}]}
product_types:
  - {name: pin, plan: [{capability: turning}]}
orders:
  - {type: pin, quantity: 2, priority: 1, release: 0, vendor: acme}
stop: {wall_timeout: 120}
"""


def _tiny(tmp_path: Path, optional: bool) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.replace("OPTIONAL", f"optional: {str(optional).lower()}"))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("TWINBID_TEST_UNSET_KEY_7F3A", "AIRFRAMER_API_KEY")
    }
    return subprocess.run(
        [sys.executable, "-m", "twinbid.cli", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_validate_refuses_a_vendor_without_its_key(tmp_path: Path) -> None:
    proc = _cli("validate", str(_tiny(tmp_path, optional=False)))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "vendors[0].api_key_env" in proc.stderr and "TWINBID_TEST_UNSET_KEY_7F3A" in proc.stderr
    assert "'acme'" in proc.stderr and "Traceback" not in proc.stderr


def test_run_refuses_a_vendor_without_its_key_before_starting(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _cli("run", str(_tiny(tmp_path, optional=False)), "--out", str(out), "-q")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "TWINBID_TEST_UNSET_KEY_7F3A" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists(), "a refused run left files behind that would block the retry"


def test_the_launcher_refuses_it_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TWINBID_TEST_UNSET_KEY_7F3A", raising=False)
    scenario = load_scenario_text(_tiny(tmp_path, optional=False).read_text(), "tiny.yaml")
    with pytest.raises(ScenarioError, match="TWINBID_TEST_UNSET_KEY_7F3A"):
        asyncio.run(run(scenario, RunOptions(out=tmp_path / "out", progress=False)))
    assert not (tmp_path / "out").exists()


def test_an_optional_vendor_without_its_key_runs_and_says_so(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("TWINBID_TEST_UNSET_KEY_7F3A", raising=False)
    assert _cli("validate", str(_tiny(tmp_path, optional=True))).returncode == 0
    scenario = load_scenario_text(_tiny(tmp_path, optional=True).read_text(), "tiny.yaml")
    result = asyncio.run(run(scenario, RunOptions(out=tmp_path / "out", progress=False)))
    assert result.kpis["products"]["completed"] == 2
    assert any(
        "acme cannot order over HTTP" in n and "TWINBID_TEST_UNSET_KEY_7F3A" in n for n in result.notices
    )


def test_aircraft_sensor_validates_without_the_airframer_key() -> None:
    proc = _cli("validate", str(ROOT / "scenarios" / "aircraft-sensor.yaml"))
    assert proc.returncode == 0, proc.stderr
