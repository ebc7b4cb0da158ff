"""`twinbid vendor serve` standalone: the order-taking service in its own process, in front of ANOTHER process's
running plant (its broker, registry and resources).

Three real processes beside the test: ``twinbid run`` (the plant: two workstations, no products of its own, kept
serving by ``stop: {when: max_time}``), ``twinbid vendor serve --broker --registry --no-resources
--clock-origin`` (the service and the vendors' product twins) and ``twinbid submit`` (a vendor). The order is
manufactured by the plant's resources to completion; its documentation and the signed webhooks come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from basyx.aas import model
from typer.testing import CliRunner
from webhook_receiver import Receiver

from agents.aas import build
from agents.aas.io import environment_json, write_aasx
from agents.ordertaking import generate_api_key, hash_api_key
from agents.ordertaking.auth import derive_webhook_secret
from protocol.credentials import run_http_secret
from protocol.mosquitto import free_port
from protocol.signing import SECRET_ENV as SIGNING_SECRET_ENV
from protocol.signing import SECRET_FILE as SIGNING_SECRET_FILE
from protocol.tokens import SECRET_ENV
from twinbid.vendor import app as vendor_app

# An accelerated clock (50 wall ms per unit): the plant and the service must share its time base, or the
# replyBy instants and simulated times of the two processes would not agree. No products of its own: the plant
# only serves, until max_time (~80 wall minutes) or Ctrl-C.
PLANT = """
name: standalone-plant
namespace: solo
clock: {kind: accelerated, time_scale: 50}
transport: {default_time: 0}
bidding: {reply_window: 10, confirm_timeout: 40, backoff: 10}
resources:
  - {kind: workstation, name: ws-turn, location: a, capabilities: [{name: turning, duration: 2, cost_rate: 2}]}
  - {kind: workstation, name: ws-polish, location: b, capabilities: [{name: polishing, duration: 1, cost_rate: 1}]}
product_types:
  - name: gear
    plan:
      - {capability: turning}
      - {capability: polishing}
stop: {when: max_time, max_time: 100000, wall_timeout: 600}
"""

STEPS = ["manufacturing-accepted", "step-scheduled", "step-completed", "step-scheduled", "step-completed"]


def vendor_aas(n: int) -> list[model.Identifiable]:
    sm = build.submodel(
        f"https://acme.example/sm/{n}/TechnicalData",
        "TechnicalData",
        "https://acme.example/semantics/TechnicalData",
        [build.prop("Material", "steel")],
    )
    shell = build.shell(
        f"https://acme.example/aas/standalone-{n}",
        f"Gear{n}",
        global_asset_id=f"https://acme.example/asset/standalone-{n}",
        asset_type="gear",
        asset_kind=model.AssetKind.INSTANCE,
        submodels=[sm],
    )
    return [shell, sm]


class Processes:
    """Real child processes (stdout and stderr to files), stopped with Ctrl-C (SIGINT), killed if need be."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        with (self.folder / f"{name}.out").open("wb") as out, (self.folder / f"{name}.err").open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "twinbid.cli", *args], stdout=out, stderr=err, env=env, cwd=self.folder
            )
        self.procs[name] = proc
        return proc

    def output(self, name: str) -> str:
        return (self.folder / f"{name}.out").read_text() + (self.folder / f"{name}.err").read_text()

    def wait_for(self, name: str, ready, within: float = 30.0) -> None:
        """Until ``ready()`` is true; fail with the process's output if it died or took too long."""
        deadline = time.monotonic() + within
        while not ready():
            if self.procs[name].poll() is not None:
                pytest.fail(f"{name} exited with {self.procs[name].returncode}:\n{self.output(name)}")
            if time.monotonic() > deadline:
                pytest.fail(f"{name} not ready after {within} s:\n{self.output(name)}")
            time.sleep(0.1)

    def stop(self) -> None:
        for proc in reversed(self.procs.values()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 15
        for proc in reversed(self.procs.values()):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop()
    assert all(p.poll() is not None for p in procs.procs.values())


async def wait_for_status(client: httpx.AsyncClient, order_id: str, within: float = 30.0) -> dict:
    deadline = time.monotonic() + within
    doc: dict = {}
    while time.monotonic() < deadline:
        r = await client.get(f"/orders/{order_id}")
        assert r.status_code == 200, r.text
        doc = r.json()
        if doc["status"] in ("completed", "failed"):
            return doc
        await asyncio.sleep(0.2)
    raise AssertionError(f"order {order_id} still {doc.get('status')}: {doc}")


@pytest.mark.parametrize("join", ["explicit", "plant-accounts"])
async def test_vendor_serve_takes_orders_into_another_process_s_plant(
    tmp_path: Path, mosquitto, processes: Processes, join: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """explicit: the plant on the test's broker, joined with --broker/--registry/--clock-origin.
    plant-accounts: the plant starts its own broker with per-agent accounts (the default), joined
    with --plant OUT: the service's product twins get accounts from the run's credentials."""
    key = generate_api_key("acme")
    (tmp_path / "plant.yaml").write_text(PLANT)
    (tmp_path / "vendors.yaml").write_text(
        f'vendors:\n  - name: acme\n    api_key_hash: "{hash_api_key(key)}"\n'
    )
    receiver = Receiver(derive_webhook_secret(key))
    hook = await receiver.start()
    try:
        # 1. the plant, in its own process, on the test's broker; plant.json says how to join it
        plant_out = tmp_path / "plant"
        own_broker = "mosquitto" if shutil.which("mosquitto") else "embedded"
        broker = mosquitto.url if join == "explicit" else own_broker
        processes.start("plant", "run", "plant.yaml", "--out", str(plant_out), "--broker", broker, "-q")
        plant_file = plant_out / "plant.json"
        await asyncio.to_thread(processes.wait_for, "plant", plant_file.exists)
        await asyncio.sleep(0.2)  # written in one go, but let the writer finish
        info = json.loads(plant_file.read_text())
        assert info["namespace"] == "solo" and info["clock"]["kind"] == "accelerated"
        origin = info["clock"]["wall_origin_ms"]
        assert isinstance(origin, int) and abs(origin - time.time() * 1000) < 60_000

        # 2. the order-taking service, standalone, in another process: no resources of its own
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        if join == "explicit":
            how = ["--broker", info["broker"], "--registry", info["registry"], "--no-resources",
                   "--clock-origin", str(origin)]  # fmt: skip
            # the run's token secret: without it the plant's registry and AAS servers refuse our writes
            monkeypatch.setenv(SECRET_ENV, run_http_secret(plant_out))
            # and its signing secret: our products check its resources' signatures (protocol/signing.py)
            monkeypatch.setenv(SIGNING_SECRET_ENV, (plant_out / SIGNING_SECRET_FILE).read_text())
        else:
            assert (plant_out / "broker" / "credentials.json").exists()  # accounts are on
            how = ["--plant", str(plant_out)]
        processes.start(
            "serve",
            "vendor", "serve", "plant.yaml", "--vendors", "vendors.yaml", "--port", str(port),
            "--out", str(tmp_path / "service"), *how,
        )  # fmt: skip
        await asyncio.to_thread(
            processes.wait_for, "serve", lambda: "order-taking service at" in processes.output("serve")
        )

        # 3. a vendor submits two orders: `twinbid submit` (AASX) and plain HTTP (AAS JSON)
        package = tmp_path / "gear-1.aasx"
        write_aasx(package, vendor_aas(1))
        submit = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "twinbid.cli", "submit", str(package), "--url", base, "--key", key,
             "--priority", "1", "--notify", hook, "--json"],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )  # fmt: skip
        assert submit.returncode == 0, submit.stdout + submit.stderr
        first = json.loads(submit.stdout)
        assert first["status"] == "accepted" and first["productType"] == "gear", first
        async with httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as c:
            r = await c.post(
                "/orders",
                content=environment_json(vendor_aas(2)).encode(),
                headers={"Content-Type": "application/json"},
                params={"priority": "5", "notificationUrl": hook},
            )
            assert r.status_code == 201, r.text
            second = r.json()

            # 4. both manufactured to completion by the plant's resources, documented step by step
            for order in (first, second):
                doc = await wait_for_status(c, order["orderId"])
                assert doc["status"] == "completed", doc
                assert doc["stepsSource"] == "ProcessDocumentation"
                steps = [(s["index"], s["capability"].rsplit("/", 1)[-1], s["outcome"]) for s in doc["steps"]]
                assert steps == [(1, "turning", "completed"), (2, "polishing", "completed")], doc["steps"]
                assert [s["resource"] for s in doc["steps"]] == ["ws-turn", "ws-polish"]
                for s in doc["steps"]:
                    assert s["bids"] and s["winner"], s
                    assert s["started"] is not None and s["finished"] is not None, s
                kinds = [e["type"] for e in doc["events"]]
                assert kinds == [*STEPS, "manufacturing-completed"], kinds
                r = await c.get(f"/orders/{order['orderId']}/aas")
                assert r.status_code == 200 and r.headers["twinbid-aas-source"] == "product"
                names = {sm["idShort"] for sm in r.json()["submodels"]}
                assert {"TechnicalData", "Order", "ProcessPlan", "ProcessDocumentation", "Nameplate"} <= names

        # 5. the vendor's endpoint gets every event, signed, once
        for _ in range(100):  # at most 20 s: the outbox sends in the background
            if sum(e["type"] == "manufacturing-completed" for e in receiver.events) >= 2:
                break
            await asyncio.sleep(0.2)
        assert receiver.bad_signatures == 0
        assert set(receiver.acknowledged.values()) == {1}
        for order in (first, second):
            kinds = [e["type"] for e in receiver.events if e["order"] == order["orderId"]]
            assert kinds == [*STEPS, "manufacturing-completed"], kinds
    finally:
        processes.stop()
        await receiver.stop()

    # 6. the work was done in the plant's process (its machines' logs), none in the service's
    for resource, capability in (("ws-turn", "turning"), ("ws-polish", "polishing")):
        rows = [
            json.loads(line) for line in (plant_out / "assets" / f"{resource}.jsonl").read_text().splitlines()
        ]
        done = {row["product"] for row in rows if row["event"] == "finished" and row["outcome"] == "done"}
        assert done == {first["product"], second["product"]}, rows
        assert all(row["capability"] == capability for row in rows)
    assert not list((tmp_path / "service" / "assets").glob("*.jsonl"))


def test_serve_refuses_to_join_a_plant_it_cannot_share_time_with(tmp_path: Path) -> None:
    (tmp_path / "plant.yaml").write_text(PLANT)
    key = generate_api_key("acme")
    (tmp_path / "vendors.yaml").write_text(
        f'vendors:\n  - name: acme\n    api_key_hash: "{hash_api_key(key)}"\n'
    )
    common = ["serve", str(tmp_path / "plant.yaml"), "--vendors", str(tmp_path / "vendors.yaml")]
    runner = CliRunner()
    # an accelerated plant without its time base
    result = runner.invoke(vendor_app, [*common, "--registry", "http://127.0.0.1:9", "--no-resources"])
    assert result.exit_code == 2 and "--clock-origin" in result.output, result.output
    # a virtual clock cannot span processes
    (tmp_path / "virtual").mkdir()
    info = {"namespace": "solo", "broker": "mqtt://127.0.0.1:9", "registry": "http://127.0.0.1:9",
            "clock": {"kind": "virtual", "time_scale": None, "wall_origin_ms": None}}  # fmt: skip
    (tmp_path / "virtual" / "plant.json").write_text(json.dumps(info))
    result = runner.invoke(vendor_app, [*common, "--plant", str(tmp_path / "virtual")])
    assert result.exit_code == 2 and "virtual clock" in result.output, result.output
    # another plant's namespace
    info = {**info, "namespace": "elsewhere", "clock": {"kind": "real", "wall_origin_ms": 1}}
    (tmp_path / "virtual" / "plant.json").write_text(json.dumps(info))
    result = runner.invoke(vendor_app, [*common, "--plant", str(tmp_path / "virtual")])
    assert result.exit_code == 2 and "namespace 'elsewhere'" in result.output, result.output
    # no plant.json there
    result = runner.invoke(vendor_app, [*common, "--plant", str(tmp_path)])
    assert result.exit_code == 2 and "cannot read" in result.output, result.output
