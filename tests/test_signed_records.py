"""Signed, hash-chained step records and `twinbid verify` (issue 21).

A real demo run (embedded broker, real agents, real AAS servers) writes the product AASX files;
the tests then tamper with those packages the way a forger would — one byte of a step's value,
a record re-signed by another key, steps reordered or removed — and run the real CLI on them.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from basyx.aas import model

from agents.aas import record_chain
from agents.aas.docjson import child_text
from agents.aas.io import element_from_json, read_aasx, to_jsonable, write_aasx
from protocol import signing
from registry.descriptors import SIGNING_KEY_EXT

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "scenarios" / "demo.yaml"


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twinbid.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("signed") / "demo"
    proc = _cli("run", str(DEMO), "--out", str(out), "-q", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("*.db*", "broker", "assets", "*.lock"))
    return out


def _refused(target: Path, *needles: str) -> str:
    proc = _cli("verify", str(target))
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    assert "REFUSED" in text, text
    for needle in needles:
        assert needle in text, text
    return text


def test_every_aasx_of_the_demo_verifies(demo_run: Path) -> None:
    proc = _cli("verify", str(demo_run))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verified: 10 product AASX" in proc.stdout
    for package in sorted((demo_run / "aas").glob("*.aasx")):
        single = _cli("verify", str(package))
        assert single.returncode == 0, single.stdout + single.stderr
    # Not vacuous: every completed record is signed by its resource and sealed by its product.
    doc = _documentation(demo_run / "aas" / "bracket-1.aasx")
    records = [to_jsonable(e) for e in doc.submodel_element]
    assert records and all(child_text(r, "Outcome") == "completed" for r in records)
    assert all(child_text(r, n) for r in records for n in signing.SIGNED_CHILDREN)


def _documentation(package: Path) -> model.Submodel:
    objects = read_aasx(package).objects
    return next(o for o in objects if isinstance(o, model.Submodel) and o.id_short == "ProcessDocumentation")


def test_one_byte_changed_in_a_step_record_is_refused(demo_run: Path, tmp_path: Path) -> None:
    """Flip one byte inside Step002's Started value in the package's XML part, repack, verify."""
    package = _copy(demo_run, tmp_path) / "aas" / "bracket-1.aasx"
    with zipfile.ZipFile(package) as z:
        parts = {i.filename: z.read(i.filename) for i in z.infolist()}
    name = next(n for n in parts if n.endswith("data.xml"))
    xml = parts[name]
    doc = xml.index(b"<aas:idShort>ProcessDocumentation</aas:idShort>")  # not the plan's Step002
    step = xml.index(b"<aas:idShort>Step002</aas:idShort>", doc)
    end = xml.index(b"<aas:idShort>Step003</aas:idShort>", step)
    pattern = re.compile(rb"<aas:idShort>Started</aas:idShort>.*?<aas:value>(\d)", re.S)
    started = pattern.search(xml, step, end)
    assert started is not None
    at = started.start(1)
    flipped = xml[:at] + bytes([ord("0") + (xml[at] - ord("0") + 1) % 10]) + xml[at + 1 :]
    assert len(flipped) == len(xml) and sum(a != b for a, b in zip(flipped, xml, strict=True)) == 1
    parts[name] = flipped
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, data in parts.items():
            z.writestr(n, data)
    package.write_bytes(buf.getvalue())
    _refused(package, "bracket-1 step 2", "resource signature")
    _refused(package.parent.parent, "bracket-1 step 2")


def _rewrite(package: Path, change) -> None:
    """Read the package, let ``change`` alter {step: record JSON}, write it back as basyx would."""
    objects = list(read_aasx(package).objects)
    doc = next(o for o in objects if isinstance(o, model.Submodel) and o.id_short == "ProcessDocumentation")
    records = {int(e.id_short[4:]): to_jsonable(e) for e in doc.submodel_element}
    records = change(records)
    for element in list(doc.submodel_element):
        doc.submodel_element.remove(element)
    for step in sorted(records):
        doc.submodel_element.add(element_from_json(records[step]))
    package.unlink()
    write_aasx(package, objects)


def _set(record: dict, **values: str) -> dict:
    out = dict(record)
    out["value"] = [
        {**c, "value": values[c["idShort"]]} if c["idShort"] in values else c for c in record["value"]
    ]
    return out


def test_a_record_signed_by_another_key_is_refused(demo_run: Path, tmp_path: Path) -> None:
    """A forger re-signs step 2 with a resource name and a key of its own making (another run's secret)."""
    run = _copy(demo_run, tmp_path)
    package = run / "aas" / "bracket-1.aasx"
    secret = "a forger's secret, not the run's"

    def forge(records: dict) -> dict:
        record = _set(records[2], Finished="1.0")
        resource = child_text(record, "Resource") or ""
        signed = record_chain.sign_completion(secret, "bracket-1", 2, record)
        records[2] = signed
        assert child_text(signed, "SignerKey") == signing.public_key_text(secret, resource)
        return records

    _rewrite(package, forge)
    _refused(package, "bracket-1 step 2", "product seal")  # the AASX alone: the seal no longer holds
    _refused(run, "bracket-1 step 2", "not")  # with the run's keys: not the resource's key


def test_a_chain_re_sealed_by_another_key_is_refused_against_the_runs_keys(
    demo_run: Path, tmp_path: Path
) -> None:
    """A forger who re-signs and re-seals the whole chain with its own keys passes only without keys.json."""
    run = _copy(demo_run, tmp_path)
    package = run / "aas" / "bracket-1.aasx"
    secret = "a forger's secret, not the run's"

    def forge(records: dict) -> dict:
        records[2] = _set(records[2], Finished="1.0")
        for step in sorted(records):
            body = record_chain.sign_completion(secret, "bracket-1", step, records[step])
            previous = record_chain.previous_hash("bracket-1", records, step)
            records[step] = record_chain.seal_record(secret, "bracket-1", step, body, previous)
        return records

    _rewrite(package, forge)
    _refused(run, "bracket-1 step 1", "key")


def test_reordered_steps_are_refused(demo_run: Path, tmp_path: Path) -> None:
    package = _copy(demo_run, tmp_path) / "aas" / "bracket-1.aasx"

    def swap(records: dict) -> dict:
        a, b = dict(records[2]), dict(records[3])
        a["idShort"], b["idShort"] = "Step003", "Step002"
        records[2], records[3] = b, a
        return records

    _rewrite(package, swap)
    _refused(package, "bracket-1 step 2")


@pytest.mark.parametrize("removed", [2, 4])
def test_a_removed_step_is_refused(demo_run: Path, tmp_path: Path, removed: int) -> None:
    package = _copy(demo_run, tmp_path) / "aas" / "bracket-1.aasx"

    def remove(records: dict) -> dict:
        del records[removed]
        return records

    _rewrite(package, remove)
    _refused(package, "bracket-1 step")


def test_the_product_refuses_a_completion_not_signed_by_its_writer() -> None:
    """What a product accepts is what verifies later: a completion signed by another key is refused."""
    secret = "the run's secret, sixteen+ chars"
    from agents.aas.docjson import completion

    body = completion(2, 3.0, 5.0, "mill-fast")
    good = record_chain.sign_completion(secret, "bracket-1", 2, body)
    key = signing.public_key_text(secret, "mill-fast")
    assert record_chain.signature_problem("bracket-1", 2, good, key) is None
    assert "not mill-fast's" in (
        record_chain.signature_problem("bracket-1", 2, good, signing.public_key_text(secret, "mill-slow"))
        or ""
    )
    other = record_chain.sign_completion("another secret entirely!", "bracket-1", 2, body)
    assert record_chain.signature_problem("bracket-1", 2, other, key) is not None
    assert "no resource signature" in (record_chain.signature_problem("bracket-1", 2, body, key) or "")
    wrong_product = record_chain.signature_problem("gear-1", 2, good, key)
    assert wrong_product is not None and "does not match" in wrong_product


LONG_STEPS = """
name: signed
namespace: signed
clock: {kind: accelerated, time_scale: 200}
transport: {default_time: 0}
bidding: {reply_window: 0.3}
resources:
  - {kind: workstation, name: mill-1, location: a, capabilities: [{name: milling, duration: 10, cost_rate: 1}]}
  - {kind: workstation, name: mill-2, location: b, capabilities: [{name: milling, duration: 14, cost_rate: 1}]}
product_types:
  - {name: gear, plan: [{capability: milling}, {capability: milling}]}
orders:
  - {type: gear, quantity: 1, priority: 1, release: 1}
"""


async def test_a_live_product_refuses_its_awardees_completion_signed_by_another_key(tmp_path: Path) -> None:
    """Real broker, AAS server and agents: while step 1 is awarded, its awardee's own token PUTs a
    completion signed with another key: 403, noted, nothing changed; the real completion (signed
    with the awardee's key) is then accepted, and the product's records verify."""
    import asyncio

    import httpx
    from conftest import HAVE_MOSQUITTO
    from fuzzing import LivePlant

    from agents.aas.build import step_id_short
    from agents.aas.docjson import completion
    from agents.aas.ids import submodel_id
    from agents.product.driver import ManufacturingDriver
    from registry.identifiers import b64url_encode
    from scenarios.loader import load_scenario_text

    scenario = load_scenario_text(LONG_STEPS)
    async with LivePlant(
        scenario,
        tmp_path,
        broker="mosquitto" if HAVE_MOSQUITTO else None,
        clock="accelerated",
        time_scale=200,
    ) as plant:
        product = plant.agent("gear-1")
        driver = product.role(ManufacturingDriver)
        for _ in range(400):
            if driver.awardee(1) is not None:
                break
            await asyncio.sleep(0.02)
        awardee = driver.awardee(1)
        assert awardee is not None, "step 1 was never awarded"
        body = completion(1, 1.0, 2.0, awardee)
        forged = record_chain.sign_completion("a forger's secret, not the run's", "gear-1", 1, body)
        sm = b64url_encode(submodel_id("gear-1", "ProcessDocumentation", scenario.namespace))
        url = f"{plant.node.base_url}/submodels/{sm}/submodel-elements/{step_id_short(1)}"
        async with httpx.AsyncClient(timeout=10) as http:
            refused = await http.put(url, json=forged, headers=plant.node.tokens.headers(awardee))
            unsigned = await http.put(url, json=body, headers=plant.node.tokens.headers(awardee))
        assert refused.status_code == 403, refused.text
        assert "not " + awardee + "'s" in refused.text
        assert unsigned.status_code == 403 and "no resource signature" in unsigned.text
        assert product.counters["note:documentation-refused"] == 2
        await plant.until_done(120)
        records = driver.docs.records
        assert [child_text(records[s], "Outcome") for s in (1, 2)] == ["completed", "completed"]
        assert child_text(records[1], "Started") != "1.0"  # the forged times never landed
        keys = {
            n: {signing.public_key_text(plant.node.signing_secret, n)} for n in ("gear-1", "mill-1", "mill-2")
        }
        assert record_chain.check_records(records, keys=keys) is None
        # each agent's public key is published in its shell and in its registry descriptor
        mill = plant.agent(awardee)
        shell = plant.node.store.get_shell(mill.aas_id)
        published = {e.name: e.value for e in shell.extension}
        assert published[SIGNING_KEY_EXT] == signing.public_key_text(plant.node.signing_secret, awardee)
        descriptor = await plant.node.registry.get(mill.aas_id)
        extensions = {e["name"]: e["value"] for e in descriptor["extensions"]}
        assert extensions[SIGNING_KEY_EXT] == published[SIGNING_KEY_EXT]


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", ["ft06", "chaos", "aircraft-sensor"])
def test_every_aasx_of_a_shipped_scenario_verifies(tmp_path: Path, name: str) -> None:
    out = tmp_path / name
    proc = _cli("run", str(ROOT / "scenarios" / f"{name}.yaml"), "--out", str(out), "-q", timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    checked = _cli("verify", str(out))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"verified: {len(list((out / 'aas').glob('*.aasx')))} product AASX" in checked.stdout
