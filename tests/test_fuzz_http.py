"""Fuzzing the HTTP surfaces: every operation of our OpenAPI documents, and AASX uploads.

A live plant (the demo line with a vendor) runs in a thread of its own; its real servers listen
on loopback: the agents' AAS repository (``agents/aas/server.py``), the registry
(``registry/service.py``) and the order-taking service (``agents/ordertaking``).  schemathesis
reads each server's ``/openapi.json`` and generates requests for every operation, both valid
ones (positive mode) and ones that break the schema (negative mode); they are sent over real
HTTP.  A case crashes when the answer is a 5xx or the connection broke, and hangs when no
answer came within 10 s.

AASX uploads: real AASX packages of the plant's finished products are mutated at the zip level
(byte flips, truncation, members replaced, renamed to ``../``, oversized, duplicated) and the XML
inside them at the text level, then POSTed to ``/orders`` with a valid vendor key.  Every answer
must be a clear 4xx (or an accepted order), never a 5xx.
"""

from __future__ import annotations

import io
import random
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from basyx.aas import model
from conftest import HAVE_MOSQUITTO
from fuzzing import LivePlant, PlantThread, Tally, fuzz_settings
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from agents.aas.io import to_jsonable, write_aasx
from agents.ordertaking.auth import generate_api_key, hash_api_key
from agents.ordertaking.upload import AASX_TYPES
from registry.identifiers import b64url_encode
from scenarios import assembly
from scenarios.intake import OrderIntake
from scenarios.loader import load_scenario_text

ROOT = Path(__file__).resolve().parents[1]
REQUEST_TIMEOUT = 10.0
#: Cases per operation and mode in CI (the long run multiplies by LONG); AASX mutations.
PER_OPERATION, AASX_CASES, LONG = 12, 400, 10

pytestmark = pytest.mark.timeout(900)
KEY = generate_api_key("fuzzer")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    text = (ROOT / "scenarios" / "demo.yaml").read_text()
    text += f'\nvendors:\n  - {{name: fuzzer, api_key_hash: "{hash_api_key(KEY, method="sha256")}"}}\n'
    scenario = load_scenario_text(text, "demo+vendor.yaml")
    live = LivePlant(
        scenario, tmp_path_factory.mktemp("fuzz-http"), broker="mosquitto" if HAVE_MOSQUITTO else None
    )

    async def start_intake(p: LivePlant) -> dict[str, Any]:
        await p.until_done(90)
        node = p.node
        assert node is not None
        requester = assembly.requester_config(p.scenario, p.clock_kind, p.time_scale)
        intake = OrderIntake(p.scenario, node, requester, registry_url=p.registry_url)
        orders = await intake.start()
        packages, shells, submodels, paths, bodies = [], [], [], set(), []
        for name in p.products:
            objects = node.store.identifiables(name)
            buf = io.BytesIO()
            write_aasx(buf, objects)
            packages.append(buf.getvalue())
            for obj in objects:
                if isinstance(obj, model.AssetAdministrationShell):
                    shells.append(b64url_encode(obj.id))
                    bodies.append(to_jsonable(obj))
                elif isinstance(obj, model.Submodel):
                    submodels.append(b64url_encode(obj.id))
                    for element in list(obj.submodel_element)[:5]:
                        paths.add(element.id_short)
                        bodies.append(to_jsonable(element))
        return {
            "aas": node.base_url,
            "registry": p.registry_url,
            "orders": orders,
            "intake": intake,
            "aasx": packages,
            "ids": {
                "aasIdentifier": shells,
                "submodelIdentifier": submodels,
                "idShortPath": [*sorted(paths), "Step001.Bids", "a.b[0]", "x[99999999999]"],
            },
            "bodies": bodies[:200],
        }

    thread = PlantThread(live, extra=start_intake).start(timeout=150)
    info = dict(thread.extra_result)
    info["thread"] = thread
    try:
        yield info
    finally:
        thread.call(info["intake"].stop(), 30)
        thread.stop()


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
#: Query parameters of the AAS and registry APIs (Part 2), with hostile values.
QUERY = st.dictionaries(
    st.sampled_from(
        [
            "level",
            "extent",
            "content",
            "limit",
            "cursor",
            "idShort",
            "assetIds",
            "assetKind",
            "assetType",
            "async",
        ]
    ),
    st.sampled_from(
        [
            "deep",
            "core",
            "withBlobValue",
            "value",
            "normal",
            "reference",
            "path",
            "metadata",
            "-1",
            "0",
            "1e9",
            "",
            "%00",
        ]
    )
    | st.text(max_size=20),
    max_size=3,
)


def fuzz_openapi(
    base: str,
    surface: str,
    per_operation: int,
    headers: dict[str, str] | None = None,
    *,
    ids: dict[str, list[str]] | None = None,
    bodies: list[Any] | None = None,
    negative: bool = False,
) -> Tally:
    """Every operation of ``base``'s OpenAPI document, over HTTP.

    Cases come from schemathesis (positive and, where the document allows, negative mode).  Our
    documents describe paths but few bodies and queries (the servers read raw requests), so each
    case may also get: path parameters that name real objects (``ids``: parameter -> values), a
    query of the Part 2 parameters with hostile values, and a body (random JSON, or a real
    document from ``bodies`` with one value broken) for writes.
    """
    tally = Tally(surface)
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    session = requests.Session()
    operations = [r.ok() for r in schema.get_all_operations() if r.ok() is not None]
    assert operations, f"{base}/openapi.json lists no operations"
    ids = ids or {}
    real_bodies = st.sampled_from(bodies) if bodies else st.nothing()
    for operation in operations:
        names = [p.name for p in operation.path_parameters]
        strategies = [operation.as_strategy(generation_mode=GenerationMode.POSITIVE)]
        if names and all(n in ids for n in names):
            strategies.append(
                st.fixed_dictionaries({n: st.sampled_from(ids[n]) for n in names}).flatmap(
                    lambda fixed, op=operation: op.as_strategy(path_parameters=fixed)
                )
            )
        if negative:  # only where the document constrains something (else it is unsatisfiable and slow)
            strategies.append(operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
        for strategy in strategies:

            @fuzz_settings(per_operation)
            @given(
                case=strategy,
                query=st.none() | QUERY,
                body=st.none() | JSON_VALUES | real_bodies.flatmap(_broken),
            )
            def run(case: Any, query: Any, body: Any) -> None:
                tally.cases += 1
                kwargs: dict[str, Any] = {}
                if query:
                    kwargs["params"] = {**(case.query or {}), **query}
                if body is not None and case.method.upper() in ("POST", "PUT", "PATCH"):
                    case.body, case.media_type = body, "application/json"
                try:
                    response = case.call(
                        base_url=base, session=session, headers=headers, timeout=REQUEST_TIMEOUT, **kwargs
                    )
                except requests.Timeout:
                    tally.hangs += 1
                    tally.failures.append(f"hang: {case.method} {case.formatted_path}")
                    return
                except requests.ConnectionError as exc:
                    tally.crash(f"{case.method} {case.formatted_path}: connection broke: {exc}")
                    return
                if response.status_code >= 500:
                    tally.crash(
                        f"{case.method} {case.formatted_path} {kwargs} -> {response.status_code}: "
                        f"{response.text[:300]}\n  body: {str(case.body)[:300]}"
                    )
                elif response.status_code >= 400:
                    tally.rejected += 1
                else:
                    tally.accepted += 1

            try:
                run()
            except Unsatisfiable:  # negative mode for an operation whose document constrains nothing
                pass
    return tally


def _broken(document: Any) -> st.SearchStrategy[Any]:
    """A real JSON document with one value replaced by something else."""
    import json as _json

    def breaking(seed: int, junk: Any) -> Any:
        doc = _json.loads(_json.dumps(document))
        spots: list[tuple[Any, Any]] = []
        queue = [doc]
        while queue:
            node = queue.pop()
            items = (
                node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
            )
            for k, v in items:
                spots.append((node, k))
                queue.append(v)
        if spots:
            container, key = spots[seed % len(spots)]
            container[key] = junk
        return doc

    return st.builds(breaking, st.integers(0, 10_000), JSON_VALUES) | st.just(document)


def test_fuzz_http_aas_repository(servers: dict[str, Any]) -> None:
    tally = fuzz_openapi(
        servers["aas"], "http-aas-repository", PER_OPERATION, ids=servers["ids"], bodies=servers["bodies"]
    )
    tally.check()
    assert tally.cases > 200 and tally.rejected > 0 and tally.accepted > 0


def test_fuzz_http_registry(servers: dict[str, Any]) -> None:
    ids = {
        "aasIdentifier": servers["ids"]["aasIdentifier"],
        "submodelIdentifier": servers["ids"]["submodelIdentifier"],
    }
    tally = fuzz_openapi(servers["registry"], "http-registry", PER_OPERATION, ids=ids, negative=True)
    tally.check()
    assert tally.cases > 100 and tally.rejected > 0


def test_fuzz_http_order_taking(servers: dict[str, Any]) -> None:
    authed = fuzz_openapi(
        servers["orders"], "http-order-taking", PER_OPERATION, {"Authorization": f"Bearer {KEY}"}
    )
    authed.check()
    anonymous = fuzz_openapi(servers["orders"], "http-order-taking-anonymous", PER_OPERATION // 2)
    anonymous.check()
    assert anonymous.accepted <= anonymous.cases // 2  # without a key, almost everything is refused


# ------------------------------------------------------------------------------------------ AASX


def mutate_aasx(data: bytes, rng: random.Random) -> bytes:
    """One hostile variant of a real AASX package."""
    op = rng.random()
    if op < 0.2:  # bytes of the zip itself
        b = bytearray(data)
        for _ in range(rng.randint(1, 16)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if op < 0.3:
        return data[: rng.randrange(len(data))]
    src = zipfile.ZipFile(io.BytesIO(data))
    members = [(i.filename, src.read(i.filename)) for i in src.infolist()]
    out = io.BytesIO()
    victim = rng.randrange(len(members))
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for k, (name, content) in enumerate(members):
            if k == victim:
                choice = rng.random()
                if choice < 0.35 and content:  # the XML or JSON inside, damaged
                    text = bytearray(content)
                    i = rng.randrange(len(text))
                    text[i : i + rng.randint(1, 200)] = rng.choice(
                        [
                            b"",
                            b"<",
                            b"&bogus;",
                            b"]]>",
                            b"\x00",
                            b"<!DOCTYPE x [<!ENTITY a 'aaaa'>]>",
                            rng.randbytes(20),
                        ]
                    )
                    content = bytes(text)
                elif choice < 0.5:
                    continue  # a member missing
                elif choice < 0.6:
                    name = rng.choice(["../../evil.xml", "/abs.xml", "a/" * 100 + "deep.xml", "x\x00y"])
                elif choice < 0.7:
                    z.writestr(name, content)  # duplicated
                elif choice < 0.8:
                    content = b"\x00" * rng.choice((10, 5_000_000))  # compresses to almost nothing
                elif choice < 0.9:
                    content = b"<?xml version='1.0'?><environment xmlns='https://admin-shell.io/aas/3/0'/>"
                else:
                    content = rng.randbytes(rng.randint(0, 2000))
            try:
                z.writestr(name, content)
            except ValueError:
                z.writestr(name.replace("\x00", ""), content)
    return out.getvalue()


def _keep(body: bytes) -> None:
    """Save a package that broke the service, to reproduce it (``$TWINBID_FUZZ_KEEP`` folder)."""
    import hashlib
    import os

    folder = os.environ.get("TWINBID_FUZZ_KEEP")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{hashlib.sha256(body).hexdigest()[:16]}.aasx").write_bytes(body)


def fuzz_aasx(servers: dict[str, Any], n: int, seed: int) -> Tally:
    rng = random.Random(seed)
    tally = Tally("http-aasx-uploads")
    session = requests.Session()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": AASX_TYPES[0]}
    for _ in range(n):
        body = mutate_aasx(rng.choice(servers["aasx"]), rng)
        tally.cases += 1
        try:
            r = session.post(
                f"{servers['orders']}/orders", data=body, headers=headers, timeout=REQUEST_TIMEOUT
            )
        except requests.Timeout:
            tally.hangs += 1
            continue
        except requests.ConnectionError as exc:
            tally.crash(f"AASX upload of {len(body)} bytes: connection broke: {exc}")
            _keep(body)
            continue
        if r.status_code >= 500:
            tally.crash(f"AASX upload -> {r.status_code}: {r.text[:300]}")
            _keep(body)
        elif r.status_code >= 400:
            tally.rejected += 1
            assert r.json().get("messages"), r.text  # a clear error, in the API's error format
        else:
            tally.accepted += 1
    return tally


@pytest.mark.filterwarnings("ignore:Duplicate name")  # duplicated zip members are one of the mutations
def test_fuzz_aasx_uploads(servers: dict[str, Any]) -> None:
    tally = fuzz_aasx(servers, AASX_CASES, seed=9)
    tally.check()
    assert tally.rejected > tally.cases // 2


@pytest.mark.fuzz_long
@pytest.mark.timeout(7200)
@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_fuzz_http_long(servers: dict[str, Any]) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    ids, bodies = servers["ids"], servers["bodies"]
    fuzz_openapi(servers["aas"], "http-aas-repository", PER_OPERATION * LONG, ids=ids, bodies=bodies).check()
    fuzz_openapi(servers["registry"], "http-registry", PER_OPERATION * LONG, ids=ids, negative=True).check()
    fuzz_openapi(
        servers["orders"], "http-order-taking", PER_OPERATION * LONG, headers, bodies=bodies, negative=True
    ).check()
    fuzz_aasx(servers, AASX_CASES * LONG, seed=1234).check()


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_aasx_mutations_are_mostly_still_zips() -> None:
    """Most variants must still be zips, or the uploads would never get past the first check."""
    rng = random.Random(1)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("aasx/x.xml", "<a/>")
    zips = sum(zipfile.is_zipfile(io.BytesIO(mutate_aasx(buf.getvalue(), rng))) for _ in range(50))
    assert zips > 25


def test_a_damaged_deflate_stream_is_a_422() -> None:
    """Found by this suite: a flipped byte inside a compressed member raised zlib.error (a 500)."""
    from agents.ordertaking.errors import Rejection
    from agents.ordertaking.upload import UploadLimits, check_aasx

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("aasx/data.xml", "<environment/>" * 500)
    damaged = bytearray(buf.getvalue())
    damaged[60] ^= 0xFF
    damaged[70] ^= 0x55
    with pytest.raises(Rejection) as refused:
        check_aasx(bytes(damaged), UploadLimits())
    assert refused.value.status == 422
