"""The order-taking service over real HTTP (uvicorn in the test's loop, httpx).

* Vendor orders — one as AAS JSON through ``POST /orders``, one as an AASX package through ``twinbid vendor
  submit`` — run to completion in a live plant (broker, registry, two workstations), with signed webhooks.
* ``TakeOrder`` on the service's own AAS, synchronous and asynchronous, answers checked against the official
  Part 2 OpenAPI files.
* A catalogue of hostile uploads is refused with the right status and a message that says what is wrong,
  and the service keeps serving; keys, other vendors' orders, rate limits, idempotency, restarts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import random
import re
import struct
import time
import zipfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
from basyx.aas import model
from conftest import SPEC_DIR
from typer.testing import CliRunner
from webhook_receiver import Receiver

import agents.ordertaking.tables  # noqa: F401  (registers the tables before create_all)
from agents.aas import build
from agents.aas.io import aasx_bytes, environment_json, read_aasx, read_json, to_json, write_aasx
from agents.aas.verify import verify_objects
from agents.ordertaking import (
    AcceptedOrder,
    OrderRejected,
    OrderTakingConfig,
    OrderTakingService,
    UploadLimits,
    VendorDirectory,
    generate_api_key,
    hash_api_key,
)
from agents.ordertaking.auth import Rate, derive_webhook_secret
from agents.persistence import open_database
from agents.persistence.database import sqlite_url
from agents.persistence.tables import EventRecord
from registry.identifiers import b64url_encode as enc
from scenarios.loader import load_scenario_text
from scenarios.schema import Vendor
from twinbid.vendor import VendorPlant
from twinbid.vendor import app as vendor_app

JSON = "application/json"
AASX = "application/asset-administration-shell-package+xml"

KEYS = {"acme": generate_api_key("acme"), "globex": generate_api_key("globex")}
HASHES = {name: hash_api_key(key) for name, key in KEYS.items()}
SCENARIO_KEY = "initech-" + "k" * 40  # a scenario vendor: sha256 hash, key without the vendor prefix
ENV_KEY = "umbrella-secret-key-0123456789"


def vendors() -> VendorDirectory:
    return VendorDirectory.from_configs(
        [
            {"name": "acme", "api_key_hash": HASHES["acme"]},
            {"name": "globex", "api_key_hash": HASHES["globex"]},
            Vendor(name="initech", api_key_hash=hash_api_key(SCENARIO_KEY, method="sha256")),
            Vendor(name="umbrella", api_key_env="UMBRELLA_KEY"),
        ],
        env={"UMBRELLA_KEY": ENV_KEY},
    )


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


_serial = iter(range(1, 10**6))


def vendor_aas(
    n: int | None = None,
    *,
    asset_type: str | None = "gear",
    global_asset_id: bool = True,
    kind=model.AssetKind.INSTANCE,
) -> list[model.Identifiable]:
    """A vendor's product instance AAS: a shell and one submodel, with the vendor's own ids."""
    n = next(_serial) if n is None else n
    sm = build.submodel(
        f"https://acme.example/sm/{n}/TechnicalData",
        "TechnicalData",
        "https://acme.example/semantics/TechnicalData",
        [build.prop("Material", "steel"), build.prop("Teeth", 24)],
    )
    shell = build.shell(
        f"https://acme.example/aas/{n}",
        f"Gear{n}",
        global_asset_id=f"https://acme.example/asset/{n}" if global_asset_id else "placeholder",
        asset_type=asset_type,
        asset_kind=kind,
        submodels=[sm],
    )
    if not global_asset_id:
        shell.asset_information.specific_asset_id.append(model.SpecificAssetId("serial", "42"))
        shell.asset_information.global_asset_id = None
    return [shell, sm]


def env_bytes(objects: list[model.Identifiable]) -> bytes:
    return environment_json(objects).encode()


@contextlib.asynccontextmanager
async def service(
    tmp_path: Path,
    *,
    config: OrderTakingConfig | None = None,
    on_order: Callable[[AcceptedOrder], Any] | None = None,
    db_name: str = "svc.db",
    **kwargs: Any,
) -> AsyncIterator[tuple[OrderTakingService, str, list[AcceptedOrder]]]:
    db = open_database(sqlite_url(tmp_path / db_name))
    received: list[AcceptedOrder] = []

    async def record(order: AcceptedOrder) -> None:
        received.append(order)
        if on_order is not None:
            await on_order(order)

    svc = OrderTakingService(
        db,
        vendors(),
        {"gear": "plan of gear", "shaft": "plan of shaft"},
        record,
        config=config or OrderTakingConfig(submit_rate=Rate(burst=1000, per_second=1000)),
        **kwargs,
    )
    base = await svc.start()
    try:
        yield svc, base, received
    finally:
        await svc.stop()
        db.dispose()


def texts(response: httpx.Response) -> str:
    body = response.json()
    assert isinstance(body.get("messages"), list) and body["messages"], body
    for m in body["messages"]:
        assert (
            m["messageType"] == "Error"
            and m["code"] == str(response.status_code)
            and m["timestamp"].endswith("Z")
        )
    return " | ".join(m["text"] for m in body["messages"])


# ---------------------------------------------------------------------------------------------------------------------
# a live plant
# ---------------------------------------------------------------------------------------------------------------------

PLANT = """
name: vendor-orders
namespace: vend
clock: {kind: virtual}
transport: {default_time: 0}
bidding: {reply_window: 0.5}
resources:
  - {kind: workstation, name: ws-turn, location: a, capabilities: [{name: turning, duration: 2, cost_rate: 2}]}
  - {kind: workstation, name: ws-polish, location: b, capabilities: [{name: polishing, duration: 1, cost_rate: 1}]}
product_types:
  - name: gear
    plan:
      - {capability: turning}
      - {capability: polishing}
"""


async def wait_for_status(
    client: httpx.AsyncClient, order_id: str, statuses: tuple[str, ...], within: float = 60
) -> dict:
    deadline = time.monotonic() + within
    doc: dict = {}
    while time.monotonic() < deadline:
        r = await client.get(f"/orders/{order_id}")
        assert r.status_code == 200, r.text
        doc = r.json()
        if doc["status"] in statuses:
            return doc
        await asyncio.sleep(0.1)
    raise AssertionError(f"order {order_id} still {doc.get('status')}: {doc}")


async def test_json_and_aasx_orders_run_to_completion_in_a_live_plant(tmp_path: Path, mosquitto) -> None:
    key = KEYS["acme"]
    receiver = Receiver(
        derive_webhook_secret(key), fail_first=2, fail_status=500
    )  # the vendor learns its secret from its key
    hook = await receiver.start()
    plant = VendorPlant(
        load_scenario_text(PLANT, "vendor-orders.yaml"), vendors(), tmp_path / "plant", broker=mosquitto.url
    )
    base = await plant.start()
    try:
        async with httpx.AsyncClient(base_url=base, headers=auth(key), timeout=30) as c:
            # 1. AAS JSON over POST /orders
            json_objects = vendor_aas()
            r = await c.post(
                "/orders",
                content=env_bytes(json_objects),
                headers={"Content-Type": JSON},
                params={
                    "priority": "1",
                    "notificationUrl": hook,
                    "customization": json.dumps({"color": "red"}),
                },
            )
            assert r.status_code == 201, r.text
            first = r.json()
            assert first["status"] == "accepted" and first["productType"] == "gear" and first["priority"] == 1
            assert r.headers["location"] == f"/orders/{first['orderId']}"
            assert re.fullmatch(r"[a-z0-9-]+", first["product"])
            # 2. an AASX package, submitted the way a vendor does it
            aasx_objects = vendor_aas()
            package = tmp_path / "gear.aasx"
            write_aasx(package, aasx_objects)
            args = ["submit", str(package), "--url", base, "--key", key, "--priority", "5", "--notify", hook]
            result = await asyncio.to_thread(CliRunner().invoke, vendor_app, args)
            assert result.exit_code == 0, result.output
            match = re.search(r"order (ord-[0-9a-f]+): accepted \(product ([a-z0-9-]+)", result.output)
            assert match, result.output
            second = {"orderId": match.group(1), "product": match.group(2)}

            for order, objects in ((first, json_objects), (second, aasx_objects)):
                doc = await wait_for_status(c, order["orderId"], ("completed", "failed"))
                assert doc["status"] == "completed", doc
                assert doc["stepsSource"] == "ProcessDocumentation"
                assert [
                    (s["index"], s["capability"].rsplit("/", 1)[-1], s["outcome"]) for s in doc["steps"]
                ] == [
                    (1, "turning", "completed"),
                    (2, "polishing", "completed"),
                ]
                assert [s["resource"] for s in doc["steps"]] == ["ws-turn", "ws-polish"]
                assert all(s["bids"] and s["winner"] for s in doc["steps"])
                kinds = [e["type"] for e in doc["events"]]
                assert kinds[0] == "manufacturing-accepted" and kinds[-1] == "manufacturing-completed", kinds
                assert kinds.count("step-completed") == 2
                # the product's live AAS: the vendor's shell id, asset id and submodel, with ours added
                r = await c.get(f"/orders/{order['orderId']}/aas")
                assert r.status_code == 200 and r.headers["twinbid-aas-source"] == "product"
                live = read_json(r.content).objects
                shell = next(o for o in live if isinstance(o, model.AssetAdministrationShell))
                assert shell.id == objects[0].id
                assert shell.asset_information.global_asset_id == objects[0].asset_information.global_asset_id
                names = {o.id_short for o in live if isinstance(o, model.Submodel)}
                assert {"TechnicalData", "Order", "ProcessPlan", "ProcessDocumentation", "Nameplate"} <= names
                r = await c.get(f"/orders/{order['orderId']}/aas", headers={"Accept": AASX})
                assert r.headers["content-type"].startswith(AASX)
                assert verify_objects(list(read_aasx(r.content).objects)) == []
            order_sm = next(
                o
                for o in read_json((await c.get(f"/orders/{first['orderId']}/aas")).content).objects
                if o.id_short == "Order"
            )
            assert build.element_value(build.child(order_sm, "Priority")) == 1
            r = await c.get("/orders")
            assert {o["orderId"] for o in r.json()["result"]} == {first["orderId"], second["orderId"]}
        assert await plant.service.outbox.flush(30)
    finally:
        await plant.stop()
        await receiver.stop()
    # every event, signed, acknowledged exactly once although the receiver failed its first deliveries
    assert receiver.bad_signatures == 0
    assert receiver.acknowledged and set(receiver.acknowledged.values()) == {1}
    for order in (first, second):
        kinds = [e["type"] for e in receiver.events if e["order"] == order["orderId"]]
        assert kinds == [
            "manufacturing-accepted",
            "step-scheduled",
            "step-completed",
            "step-scheduled",
            "step-completed",
            "manufacturing-completed",
        ], kinds
        assert all(
            e["product"] == order["product"] for e in receiver.events if e["order"] == order["orderId"]
        )


# ---------------------------------------------------------------------------------------------------------------------
# TakeOrder on the service's own AAS (checked against the official OpenAPI files)
# ---------------------------------------------------------------------------------------------------------------------


def blob_argument(data: bytes, content_type: str = JSON) -> dict:
    return {
        "value": {
            "modelType": "Blob",
            "idShort": "aas",
            "contentType": content_type,
            "value": base64.b64encode(data).decode(),
        }
    }


def prop_argument(name: str, value: Any, value_type: str) -> dict:
    return {"value": json.loads(to_json(model.Property(name, value_type=_types[value_type], value=value)))}


_types = {"xs:int": model.datatypes.Int, "xs:string": str}


async def test_take_order_operation_sync_and_async(tmp_path: Path) -> None:
    from registry.conformance import AAS_REPOSITORY, SUBMODEL_REPOSITORY, SpecValidator

    validator = SpecValidator.load(SPEC_DIR, [SUBMODEL_REPOSITORY, AAS_REPOSITORY])
    gate = asyncio.Event()

    async def slow(order: AcceptedOrder) -> None:
        await gate.wait()

    async with service(tmp_path, on_order=slow) as (svc, base, received):
        sm = f"/submodels/{enc(svc.submodel.id)}/submodel-elements"
        async with httpx.AsyncClient(base_url=base, event_hooks={"response": [validator.hook]}) as public:
            # the service's AAS is public and valid V3.1
            r = await public.get(f"/shells/{enc(svc.shell.id)}")
            assert r.status_code == 200
            r = await public.get(f"/submodels/{enc(svc.submodel.id)}")
            assert r.json()["submodelElements"][0]["idShort"] == "TakeOrder"
            assert verify_objects([svc.shell, svc.submodel]) == []
            endpoint = next(e for e in r.json()["submodelElements"] if e["idShort"] == "OrdersEndpoint")
            assert endpoint["value"] == f"{base}/orders"
            r = await public.post(f"{sm}/TakeOrder/invoke", json={"inputArguments": []})
            assert r.status_code == 401
            r = await public.put(
                f"{sm}/MaxUploadBytes", json=json.loads(to_json(build.prop("MaxUploadBytes", 1)))
            )
            # nobody writes the service's AAS over HTTP: no agent token can be presented to it
            assert r.status_code == 401 and "accepts no writes" in texts(r)

        async with httpx.AsyncClient(
            base_url=base, headers=auth(KEYS["acme"]), event_hooks={"response": [validator.hook]}
        ) as c:
            gate.set()
            body = {
                "inputArguments": [
                    blob_argument(env_bytes(vendor_aas())),
                    prop_argument("priority", 2, "xs:int"),
                ],
                "clientTimeoutDuration": "PT10S",
            }
            r = await c.post(f"{sm}/TakeOrder/invoke", json=body)
            assert r.status_code == 200, r.text
            result = r.json()
            assert result["executionState"] == "Completed" and result["success"] is True
            out = {v["value"]["idShort"]: v["value"]["value"] for v in result["outputArguments"]}
            assert (
                out["status"] == "accepted"
                and out["orderId"].startswith("ord-")
                and out["product"] == received[-1].product
            )
            assert received[-1].priority == 2 and received[-1].product_type == "gear"

            # asynchronous: 202 + Location; Running while the plant takes it; then 302 to the result
            gate.clear()
            package = aasx_bytes(vendor_aas())
            body = {
                "inputArguments": [
                    blob_argument(package, AASX),
                    prop_argument("idempotencyKey", "op-1", "xs:string"),
                ],
                "clientTimeoutDuration": "PT60S",
            }
            r = await c.post(f"{sm}/TakeOrder/invoke-async", json=body)
            assert r.status_code == 202, r.text
            status_url = r.headers["location"]
            assert "/operation-status/" in status_url
            r = await c.get(status_url)
            assert r.status_code == 200 and r.json()["executionState"] == "Running"
            gate.set()
            for _ in range(100):
                r = await c.get(status_url)
                if r.status_code == 302:
                    break
                await asyncio.sleep(0.02)
            assert r.status_code == 302
            r = await c.get(r.headers["location"])
            assert r.status_code == 200 and r.json()["executionState"] == "Completed"
            out = {v["value"]["idShort"]: v["value"]["value"] for v in r.json()["outputArguments"]}
            assert out["status"] == "accepted" and received[-1].order_id == out["orderId"]
            assert received[-1].files is not None  # an AASX's supplementary files come along
            # another vendor cannot read the handle
            other = await c.get(status_url, headers=auth(KEYS["globex"]))
            assert other.status_code == 404

            # refusals through the operation: the same checks, the same messages
            r = await c.post(
                f"{sm}/TakeOrder/invoke",
                json={
                    "inputArguments": [
                        blob_argument(env_bytes(vendor_aas())),
                        prop_argument("priority", 9, "xs:int"),
                    ]
                },
            )
            assert r.status_code == 422 and "priority" in texts(r)
            r = await c.post(
                f"{sm}/TakeOrder/invoke", json={"inputArguments": [prop_argument("priority", 1, "xs:int")]}
            )
            assert r.status_code == 422 and "aas: missing" in texts(r)
            r = await c.post(
                f"{sm}/TakeOrder/invoke-async",
                json={
                    "inputArguments": [blob_argument(b"PK\x03\x04junk", AASX)],
                    "clientTimeoutDuration": "PT5S",
                },
            )
            assert r.status_code == 422 and "ZIP" in texts(r)
            r = await c.post(
                f"{sm}/ProductTypes/invoke-async",
                json={"inputArguments": [], "clientTimeoutDuration": "PT5S"},
            )
            assert r.status_code == 405
            r = await c.post(
                f"{sm}/Nothing/invoke-async", json={"inputArguments": [], "clientTimeoutDuration": "PT5S"}
            )
            assert r.status_code == 404
            r = await c.get(f"{sm}/TakeOrder/operation-results/nohandle")
            assert r.status_code == 404
    assert validator.failures == []
    checked = {(c.method, c.status) for c in validator.checked}
    assert {("POST", 202), ("GET", 302), ("POST", 200), ("POST", 422), ("POST", 401)} <= checked


# ---------------------------------------------------------------------------------------------------------------------
# hostile uploads
# ---------------------------------------------------------------------------------------------------------------------

LIMITS = UploadLimits(
    max_json_bytes=256 * 1024,
    max_aasx_bytes=512 * 1024,
    max_uncompressed_bytes=4 * 1024 * 1024,
    max_entries=64,
    max_ratio=100.0,
    ratio_floor_bytes=256 * 1024,
)


def _zip(entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def _package_with(
    extra: list[tuple[str | zipfile.ZipInfo, bytes]] = (),
    transform: Callable[[str, bytes], bytes] | None = None,
) -> bytes:
    """A valid AASX of a vendor AAS, with parts rewritten by ``transform`` and ``extra`` entries added."""
    src = zipfile.ZipFile(io.BytesIO(aasx_bytes(vendor_aas())))
    entries = [
        (i.filename, transform(i.filename, src.read(i)) if transform else src.read(i)) for i in src.infolist()
    ]
    return _zip(entries + list(extra))


def _lying_sizes(data: bytes) -> bytes:
    """Patch every entry's declared uncompressed size to 10 bytes (a header that lies)."""
    out = bytearray(data)
    for sig, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        pos = out.find(sig)
        while pos >= 0:
            size = struct.unpack_from("<I", out, pos + offset)[0]
            if size > 10:
                struct.pack_into("<I", out, pos + offset, 10)
            pos = out.find(sig, pos + 4)
    return bytes(out)


def _compressible(size: int) -> bytes:
    rnd = random.Random(7)
    chunk = 64 + 1024
    parts = [rnd.randbytes(64) + b"\0" * 1024 for _ in range(size // chunk + 1)]
    return b"".join(parts)[:size]


def _encrypted() -> bytes:
    """A package whose extra entry says it is encrypted (general purpose flag bit 0, as a password tool sets it)."""
    data = bytearray(_package_with([("aasx/secret.xml", b"<x/>")]))
    name = b"aasx/secret.xml"
    for sig, flag_at, name_len_at, name_at in ((b"PK\x03\x04", 6, 26, 30), (b"PK\x01\x02", 8, 28, 46)):
        pos = data.find(sig)
        while pos >= 0:
            (length,) = struct.unpack_from("<H", data, pos + name_len_at)
            if data[pos + name_at : pos + name_at + length] == name:
                data[pos + flag_at] |= 0x1
            pos = data.find(sig, pos + 4)
    return bytes(data)


def _multipart(parts: list[tuple[str, str | None, str | None, bytes]]) -> tuple[bytes, str]:
    boundary = "----twinbid" + os.urandom(8).hex()
    out = b""
    for name, filename, ctype, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode()
        if ctype:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def _hostile() -> list[tuple[str, bytes, str, int, str]]:
    """(case, body, content type, expected status, expected words in the message)."""
    two = vendor_aas()
    two_shells = env_bytes([*two, *vendor_aas()])
    bomb_entry = ("aasx/bomb.bin", b"\0" * (3 * 1024 * 1024))
    big_entries = [(f"aasx/part{i}.bin", _compressible(1024 * 1024)) for i in range(5)]
    no_entities = b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]><aas:environment xmlns:aas="https://admin-shell.io/aas/3/1">&lol2;</aas:environment>'
    bad_json_shell = json.loads(env_bytes(vendor_aas()))
    del bad_json_shell["assetAdministrationShells"][0]["id"]
    nofile, nofile_type = _multipart([("priority", None, None, b"2")])
    reserved = vendor_aas()
    reserved[1].id = "https://twinbid.dev/ids/default/x/sm/Evil"
    reserved[0].submodel = {model.ModelReference.from_referable(reserved[1])}
    return [
        (
            "oversized JSON",
            b'{"assetAdministrationShells": [], "pad": "' + b"x" * 300_000 + b'"}',
            JSON,
            413,
            "limit",
        ),
        ("oversized AASX", b"PK\x03\x04" + os.urandom(600_000), AASX, 413, "limit"),
        ("zip bomb (ratio)", _package_with([bomb_entry]), AASX, 422, "compression ratio"),
        ("zip bomb (unpacked size)", _package_with(big_entries), AASX, 413, "unpacks to more than"),
        (
            "lying size headers",
            _lying_sizes(_package_with([("aasx/notes.txt", b"n" * 5000)])),
            AASX,
            422,
            "entry",
        ),
        (
            "path traversal",
            _package_with([("../../etc/cron.d/evil", b"* * * * * rm -rf /")]),
            AASX,
            422,
            "path traversal",
        ),
        ("absolute path", _package_with([("/tmp/evil.sh", b"#!/bin/sh")]), AASX, 422, "absolute"),
        (
            "too many entries",
            _package_with([(f"aasx/f{i}.txt", b"x") for i in range(80)]),
            AASX,
            422,
            "entries",
        ),
        ("encrypted entry", _encrypted(), AASX, 422, "encrypted"),
        (
            "V3.0 XML",
            _package_with(
                transform=lambda n, d: d.replace(b"admin-shell.io/aas/3/1", b"admin-shell.io/aas/3/0")
            ),
            AASX,
            422,
            "V3.0",
        ),
        (
            "empty package",
            _package_with(
                transform=lambda n, d: (
                    b'<?xml version="1.0"?><aas:environment xmlns:aas="https://admin-shell.io/aas/3/1"/>'
                    if n.endswith("data.xml")
                    else d
                )
            ),
            AASX,
            422,
            "no AAS objects",
        ),
        (
            "entity expansion",
            _package_with(transform=lambda n, d: no_entities if n.endswith("data.xml") else d),
            AASX,
            422,
            "DOCTYPE",
        ),
        (
            "broken XML",
            _package_with(transform=lambda n, d: b"<aas:environment" if n.endswith("data.xml") else d),
            AASX,
            422,
            "aasx",
        ),
        ("not a ZIP", b"hello, this is not a package", AASX, 422, "not a ZIP"),
        ("not an AAS (JSON)", b'{"hello": "world"}', JSON, 422, "not an AAS"),
        ("not JSON", b"{'assetAdministrationShells': ", JSON, 422, "not valid JSON"),
        ("deeply nested JSON", b"[" * 200_000, JSON, 422, "nested too deeply"),
        ("a single shell", to_json(two[0]).encode(), JSON, 422, "single shell"),
        ("invalid AAS JSON", json.dumps(bad_json_shell).encode(), JSON, 422, "not a valid AAS"),
        ("two shells", two_shells, JSON, 422, "2 shells"),
        (
            "no globalAssetId",
            env_bytes(vendor_aas(global_asset_id=False)),
            JSON,
            422,
            "globalAssetId: missing",
        ),
        (
            "asset type, not instance",
            env_bytes(vendor_aas(kind=model.AssetKind.TYPE)),
            JSON,
            422,
            "assetKind",
        ),
        ("twinbid's id space", env_bytes(reserved), JSON, 422, "twinbid's own id space"),
        ("wrong content type", env_bytes(vendor_aas()), "text/plain", 415, "not accepted"),
        ("XML, not AASX", b"<environment/>", "application/xml", 415, "not accepted"),
        ("multipart without a file", nofile, nofile_type, 422, "file: missing"),
        ("empty body", b"", JSON, 400, "empty"),
    ]


async def test_hostile_uploads_are_refused_and_the_service_keeps_serving(tmp_path: Path) -> None:
    config = OrderTakingConfig(limits=LIMITS, submit_rate=Rate(burst=1000, per_second=1000))
    async with service(tmp_path, config=config) as (_svc, base, received):
        async with httpx.AsyncClient(base_url=base, headers=auth(KEYS["acme"]), timeout=30) as c:
            seen = []
            for case, body, ctype, status, words in _hostile():
                r = await c.post("/orders", content=body, headers={"Content-Type": ctype})
                assert r.status_code == status, f"{case}: {r.status_code} {r.text[:500]}"
                message = texts(r)
                assert words.lower() in message.lower(), f"{case}: {message}"
                assert (await c.get("/orders")).status_code == 200, case  # still serving
                seen.append(case)
            assert received == []
            # ... and a good order still goes through, as JSON, as AASX and as multipart
            r = await c.post("/orders", content=env_bytes(vendor_aas()), headers={"Content-Type": JSON})
            assert r.status_code == 201, r.text
            r = await c.post("/orders", content=aasx_bytes(vendor_aas()), headers={"Content-Type": AASX})
            assert r.status_code == 201, r.text
            body, ctype = _multipart(
                [
                    ("file", "gear.aasx", AASX, aasx_bytes(vendor_aas())),
                    ("priority", None, None, b"4"),
                    ("productType", None, None, b"gear"),
                ]
            )
            r = await c.post("/orders", content=body, headers={"Content-Type": ctype})
            assert r.status_code == 201, r.text
            assert r.json()["priority"] == 4
            assert len(received) == 3 and all(o.shell.asset_information.global_asset_id for o in received)
    assert len(seen) == len(_hostile())


async def test_order_parameters_are_checked_field_by_field(tmp_path: Path) -> None:
    async with service(tmp_path) as (_svc, base, received):
        async with httpx.AsyncClient(base_url=base, headers=auth(KEYS["acme"])) as c:

            async def post(params: dict, objects=None) -> httpx.Response:
                return await c.post(
                    "/orders",
                    content=env_bytes(objects or vendor_aas()),
                    headers={"Content-Type": JSON},
                    params=params,
                )

            r = await post(
                {
                    "productType": "spaceship",
                    "priority": "0",
                    "due": "soon",
                    "notificationUrl": "ftp://x.example",
                    "color": "red",
                }
            )
            assert r.status_code == 422
            fields = {m["field"]: m["text"] for m in r.json()["messages"]}
            assert set(fields) == {"productType", "priority", "due", "notificationUrl", "color"}
            assert (
                "unknown product type 'spaceship'" in fields["productType"]
                and "'gear'" in fields["productType"]
            )
            assert "1 (top" in fields["priority"]
            assert "http" in fields["notificationUrl"]
            for url, why in (
                ("https://user:pw@hooks.example/x", "credentials"),
                ("http://", "no host"),
                ("notaurl", "http"),
                ("http://hooks.example:99999/x", "port"),
            ):
                r = await post({"notificationUrl": url})
                assert (
                    r.status_code == 422
                    and r.json()["messages"][0]["field"] == "notificationUrl"
                    and why in texts(r).lower()
                ), url
            r = await post({"customization": json.dumps({"color": {"nested": 1}})})
            assert r.status_code == 422 and r.json()["messages"][0]["field"] == "customization.color"
            r = await post({"priority": "2", "due": "-1"})
            assert r.status_code == 422 and "due" in texts(r)
            r = await post({}, vendor_aas(asset_type=None))
            assert r.status_code == 422 and "productType: missing" in texts(r)
            r = await post({}, vendor_aas(asset_type="teapot"))
            assert r.status_code == 422 and "'teapot' is no known product type" in texts(r)
            assert received == []
            r = await post(
                {
                    "productType": "shaft",
                    "due": "12.5",
                    "customization": json.dumps({"color": "red", "3d": True}),
                }
            )
            assert r.status_code == 201, r.text
            order = received[-1]
            assert (order.product_type, order.priority, order.due, order.plan) == (
                "shaft",
                3,
                12.5,
                "plan of shaft",
            )
            assert order.customization == {"color": "red", "3d": True}


# ---------------------------------------------------------------------------------------------------------------------
# keys, vendors, limits
# ---------------------------------------------------------------------------------------------------------------------


async def test_keys_and_vendors(tmp_path: Path) -> None:
    async with service(tmp_path) as (svc, base, received):
        async with httpx.AsyncClient(base_url=base) as c:
            r = await c.post("/orders", content=env_bytes(vendor_aas()), headers={"Content-Type": JSON})
            assert (
                r.status_code == 401
                and "API key" in texts(r)
                and r.headers["www-authenticate"].startswith("Bearer")
            )
            wrong = KEYS["acme"][:-4] + "abcd"
            r = await c.post(
                "/orders", content=env_bytes(vendor_aas()), headers={"Content-Type": JSON, **auth(wrong)}
            )
            assert r.status_code == 401 and "invalid API key" in texts(r)
            r = await c.get("/orders", headers={"X-API-Key": "no such key at all"})
            assert r.status_code == 401
            assert received == []
            # every kind of vendor entry: scrypt hash, scenario sha256 hash, key from the environment
            orders = {}
            for vendor, headers in (
                ("acme", auth(KEYS["acme"])),
                ("globex", {"X-API-Key": KEYS["globex"]}),
                ("initech", auth(SCENARIO_KEY)),
                ("umbrella", auth(ENV_KEY)),
            ):
                r = await c.post(
                    "/orders", content=env_bytes(vendor_aas()), headers={"Content-Type": JSON, **headers}
                )
                assert r.status_code == 201, (vendor, r.text)
                orders[vendor] = r.json()["orderId"]
                assert received[-1].vendor == vendor and received[-1].product.startswith(vendor + "-gear-")
            # a vendor sees only its own orders
            acme, globex = auth(KEYS["acme"]), {"X-API-Key": KEYS["globex"]}
            assert (await c.get(f"/orders/{orders['acme']}", headers=acme)).status_code == 200
            for path in (f"/orders/{orders['acme']}", f"/orders/{orders['acme']}/aas"):
                r = await c.get(path, headers=globex)
                assert r.status_code == 404 and "no order" in texts(r)
            assert (await c.get("/orders/ord-doesnotexist", headers=acme)).status_code == 404
            listed = (await c.get("/orders", headers=globex)).json()["result"]
            assert [o["orderId"] for o in listed] == [orders["globex"]]
            # the submitted AAS comes back (no live twin behind this service)
            r = await c.get(f"/orders/{orders['acme']}/aas", headers=acme)
            assert r.status_code == 200 and r.headers["twinbid-aas-source"] == "submitted"
            assert {o.id for o in read_json(r.content).objects} == {o.id for o in received[0].objects}
    # the webhook secret of a vendor without a configured one: derived from its key, kept, never the key
    assert svc.outbox.secret_for("acme") == derive_webhook_secret(KEYS["acme"])
    assert svc.outbox.secret_for("umbrella") == derive_webhook_secret(ENV_KEY)


async def test_rate_limits(tmp_path: Path) -> None:
    config = OrderTakingConfig(
        submit_rate=Rate(burst=2, per_second=0.2),
        read_rate=Rate(burst=3, per_second=0.2),
        auth_failure_rate=Rate(burst=3, per_second=0.01),
    )
    async with service(tmp_path, config=config) as (_svc, base, received):
        async with httpx.AsyncClient(base_url=base) as c:
            acme = {"Content-Type": JSON, **auth(KEYS["acme"])}
            for _ in range(2):
                assert (
                    await c.post("/orders", content=env_bytes(vendor_aas()), headers=acme)
                ).status_code == 201
            r = await c.post("/orders", content=env_bytes(vendor_aas()), headers=acme)
            assert r.status_code == 429 and "rate limit" in texts(r)
            assert 1 <= int(r.headers["retry-after"]) <= 5
            assert len(received) == 2
            # other vendors and other kinds of requests have their own buckets
            r = await c.post(
                "/orders",
                content=env_bytes(vendor_aas()),
                headers={"Content-Type": JSON, **auth(KEYS["globex"])},
            )
            assert r.status_code == 201
            for _ in range(3):
                assert (await c.get("/orders", headers=acme)).status_code == 200
            assert (await c.get("/orders", headers=acme)).status_code == 429
            # guessing keys: a few failures, then 429 for this address — known keys still work
            for _ in range(3):
                assert (await c.get("/orders", headers=auth("tbk_acme_guess" + "x" * 30))).status_code == 401
            r = await c.get("/orders", headers=auth("tbk_acme_guess" + "y" * 30))
            assert r.status_code == 429 and "failed logins" in texts(r)
            assert (await c.get("/orders", headers=auth(KEYS["globex"]))).status_code == 200


async def test_idempotency_conflicts_and_refusals_by_the_plant(tmp_path: Path) -> None:
    async def picky(order: AcceptedOrder) -> None:
        if order.priority == 1:
            raise OrderRejected("the plant takes no rush orders today", field="priority")
        if order.priority == 5:
            raise RuntimeError("database on fire")

    async with service(tmp_path, on_order=picky) as (_svc, base, received):
        async with httpx.AsyncClient(
            base_url=base, headers={"Content-Type": JSON, **auth(KEYS["acme"])}
        ) as c:
            objects = vendor_aas()
            headers = {"Idempotency-Key": "req-1"}
            first = await c.post("/orders", content=env_bytes(objects), headers=headers)
            again = await c.post("/orders", content=env_bytes(objects), headers=headers)
            assert first.status_code == 201 and again.status_code == 200
            assert first.json()["orderId"] == again.json()["orderId"] and len(received) == 1
            r = await c.post("/orders", content=env_bytes(objects))
            assert r.status_code == 409 and "already submitted as order" in texts(r)
            r = await c.post("/orders", content=env_bytes(objects), headers={**auth(KEYS["globex"])})
            assert (
                r.status_code == 409
                and "already in use" in texts(r)
                and first.json()["orderId"] not in texts(r)
            )
            # refused by the plant: the vendor gets the reason, the AAS can be submitted again
            rush = vendor_aas()
            r = await c.post("/orders", content=env_bytes(rush), params={"priority": "1"})
            assert (
                r.status_code == 422
                and r.json()["messages"][0]["field"] == "priority"
                and "no rush orders" in texts(r)
            )
            r = await c.post("/orders", content=env_bytes(rush), params={"priority": "5"})
            assert r.status_code == 500 and "database on fire" in texts(r)
            r = await c.post("/orders", content=env_bytes(rush), params={"priority": "2"})
            assert r.status_code == 201
            assert [o["status"] for o in (await c.get("/orders")).json()["result"]] == [
                "accepted",
                "accepted",
            ]


async def test_progress_events_and_a_restart(tmp_path: Path) -> None:
    receiver = Receiver(derive_webhook_secret(KEYS["acme"]))
    hook = await receiver.start()
    try:
        async with service(tmp_path) as (svc, base, received):
            async with httpx.AsyncClient(
                base_url=base, headers={"Content-Type": JSON, **auth(KEYS["acme"])}
            ) as c:
                r = await c.post("/orders", content=env_bytes(vendor_aas()), params={"notificationUrl": hook})
                done = r.json()
                r = await c.post("/orders", content=env_bytes(vendor_aas()), params={"notificationUrl": hook})
                running = r.json()

                class FakeAgent:
                    def now(self) -> float:
                        return 7.5

                agent = FakeAgent()
                svc.on_node_event(agent, "manufacturing-accepted", done["product"], None, {"priority": 3})
                svc.on_node_event(
                    agent,
                    "step-scheduled",
                    done["product"],
                    1,
                    {"resource": "ws-1", "start": 0.0, "end": 2.0},
                )
                svc.on_node_event(
                    agent, "step-completed", done["product"], 1, {"resource": "ws-1", "finished": 2.0}
                )
                svc.on_node_event(agent, "manufacturing-completed", done["product"], None, {"flow_time": 2.0})
                svc.on_node_event(
                    agent,
                    "step-scheduled",
                    running["product"],
                    1,
                    {"resource": "ws-1", "start": 2.0, "end": 4.0},
                )
                svc.on_node_event(
                    agent, "step-completed", "scenario-product-1", 1, {}
                )  # not a vendor order: ignored
                doc = (await c.get(f"/orders/{done['orderId']}")).json()
                assert doc["status"] == "completed" and doc["stepsSource"] == "events"
                assert doc["steps"] == [
                    {
                        "index": 1,
                        "outcome": "completed",
                        "resource": "ws-1",
                        "scheduledStart": 0.0,
                        "scheduledEnd": 2.0,
                        "finished": 2.0,
                    }
                ]
                assert [e["sim"] for e in doc["events"]] == [7.5] * 4
                assert (await c.get(f"/orders/{running['orderId']}")).json()["status"] == "running"
                assert await svc.outbox.flush(10)
        assert sorted(receiver.acknowledged) == sorted(
            [f"{done['orderId']}:manufacturing-accepted:-", f"{done['orderId']}:step-scheduled:1:ws-1@0.0",
             f"{done['orderId']}:step-completed:1", f"{done['orderId']}:manufacturing-completed:-",
             f"{running['orderId']}:step-scheduled:1:ws-1@2.0"]
        )  # fmt: skip

        # the product twin committed an event, and the process died before it reached the outbox
        db = open_database(sqlite_url(tmp_path / "svc.db"))
        with db.session() as s:
            s.add(
                EventRecord(
                    agent=running["product"],
                    kind="step-completed",
                    product=running["product"],
                    step=1,
                    sim=4.0,
                    wall_ms=0,
                    data=json.dumps({"resource": "ws-1"}),
                )
            )
            s.commit()
        db.dispose()
        # a new process on the same database: unfinished orders are handed over again, finished ones are not
        async with service(tmp_path) as (svc, base, received):
            assert [(o.order_id, o.resumed) for o in received] == [(running["orderId"], True)]
            caught_up = [e for e in svc.outbox.events(running["orderId"]) if e["type"] == "step-completed"]
            assert caught_up and caught_up[0]["sim"] == 4.0
            assert received[0].submodels[0].id_short == "TechnicalData"
            async with httpx.AsyncClient(
                base_url=base, headers={"Content-Type": JSON, **auth(KEYS["acme"])}
            ) as c:
                doc = (await c.get(f"/orders/{done['orderId']}")).json()
                assert doc["status"] == "completed" and len(doc["events"]) == 4
                assert all(e["delivery"]["state"] == "delivered" for e in doc["events"])
    finally:
        await receiver.stop()


async def test_submit_command_reports_refusals(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = tmp_path / "bad.json"
    bad.write_bytes(env_bytes(vendor_aas(global_asset_id=False)))
    good = tmp_path / "good.json"
    good.write_bytes(env_bytes(vendor_aas()))
    async with service(tmp_path) as (_svc, base, received):
        result = await asyncio.to_thread(
            runner.invoke, vendor_app, ["submit", str(bad), "--url", base, "--key", KEYS["acme"]]
        )
        assert result.exit_code == 1
        assert "rejected (422)" in result.stderr and "globalAssetId: missing" in result.stderr
        result = await asyncio.to_thread(
            runner.invoke, vendor_app, ["submit", str(good), "--url", base, "--key", "wrong-key-123"]
        )
        assert result.exit_code == 1 and "rejected (401)" in result.stderr
        args = [
            "submit",
            str(good),
            "--url",
            base,
            "--key",
            KEYS["acme"],
            "--type",
            "shaft",
            "--set",
            "color=blue",
            "--set",
            "size=3",
            "--json",
        ]
        result = await asyncio.to_thread(runner.invoke, vendor_app, args)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["productType"] == "shaft"
        assert received[-1].customization == {"color": "blue", "size": 3}
    result = await asyncio.to_thread(
        runner.invoke,
        vendor_app,
        ["submit", str(good), "--url", base, "--key", KEYS["acme"], "--retries", "1"],
    )
    assert result.exit_code == 3 and "cannot reach" in result.stderr
    result = runner.invoke(vendor_app, ["new-key", "acme"])
    key = re.search(r"(tbk_acme_\S+)", result.stdout).group(1)
    stored = re.search(r'api_key_hash: "(\S+)"', result.stdout).group(1)
    from agents.ordertaking.auth import verify_api_key

    assert verify_api_key(key, stored) and not verify_api_key(key + "x", stored)


async def test_openapi_document_describes_the_order_api(tmp_path: Path) -> None:
    async with service(tmp_path) as (_svc, base, _received):
        async with httpx.AsyncClient(base_url=base) as c:
            doc = (await c.get("/openapi.json")).json()
    content = doc["paths"]["/orders"]["post"]["requestBody"]["content"]
    assert set(content) == {JSON, AASX, "multipart/form-data"}
    assert {p["name"] for p in doc["paths"]["/orders"]["post"]["parameters"]} >= {
        "productType",
        "priority",
        "due",
        "notificationUrl",
        "customization",
        "Idempotency-Key",
    }
    assert {"/orders/{orderId}", "/orders/{orderId}/aas"} <= set(doc["paths"])
    path = "/submodels/{submodelIdentifier}/submodel-elements/{idShortPath}"
    assert doc["paths"][f"{path}/invoke-async"]["post"]["operationId"] == "InvokeOperationAsync"
    assert (
        doc["paths"][f"{path}/operation-status/{{handleId}}"]["get"]["operationId"]
        == "GetOperationAsyncStatus"
    )
    assert set(doc["components"]["securitySchemes"]) == {"bearerAuth", "apiKeyHeader"}
    assert "OrderReceipt" in doc["components"]["schemas"]


async def test_a_slow_hand_over_answers_202_and_finishes_in_the_background(tmp_path: Path) -> None:
    gate = asyncio.Event()

    async def slow(order: AcceptedOrder) -> None:
        await gate.wait()

    config = OrderTakingConfig(intake_timeout=0.1, submit_rate=Rate(burst=100, per_second=100))
    async with service(tmp_path, config=config, on_order=slow) as (_svc, base, _received):
        async with httpx.AsyncClient(
            base_url=base, headers={"Content-Type": JSON, **auth(KEYS["acme"])}
        ) as c:
            r = await c.post("/orders", content=env_bytes(vendor_aas()))
            assert r.status_code == 202 and r.json()["status"] == "received"
            order_id = r.json()["orderId"]
            assert (await c.get(f"/orders/{order_id}")).json()["status"] == "received"
            gate.set()
            doc = await wait_for_status(c, order_id, ("accepted",), within=5)
            assert doc["status"] == "accepted"
