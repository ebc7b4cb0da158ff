"""AAS helpers: every shell and submodel the builders make passes the independent aas-core3.1 verification
(before and after documentation records are added), round-trips through JSON and AASX, and bad input is
refused clearly."""

from __future__ import annotations

import datetime as dt
import io
import json
import zipfile

import pytest
from basyx.aas import model
from hypothesis import given
from hypothesis import strategies as st

from agents.aas import build as b
from agents.aas import ids
from agents.aas import io as aio
from agents.aas.semantics import (
    CapabilityDescription,
    Nameplate,
    ProcessDocumentation,
    capability_semantic_id,
)
from agents.aas.valueonly import submodel_value_only
from agents.aas.verify import verify, verify_objects

UTC = dt.UTC


def resource_aas(short: str = "mill-1") -> tuple[model.AssetAdministrationShell, list[model.Submodel]]:
    nameplate = b.nameplate(
        ids.submodel_id(short, "Nameplate"),
        manufacturer_name="ACME Machines",
        product_designation="5-axis mill",
        uri_of_product="https://acme.example/mills/m1",
        order_code="M5-001",
        address=b.Address("Werkstrasse 1", "39106", "Magdeburg", "DE"),
        serial_number="SN-0001",
        year_of_construction=2024,
        date_of_manufacture=dt.date(2024, 3, 1),
        product_family="Mills",
        product_type="M5",
        article_number="A-55",
        hardware_version="1.0",
        software_version="2.3",
        country_of_origin="DE",
    )
    caps = b.capabilities(
        ids.submodel_id(short, "Capabilities"),
        [
            b.CapabilityOffer(
                "milling",
                {"maxDiameter": (0.0, 120.0), "tolerance": 0.01, "coolant": True},
                comment="5-axis milling",
            ),
            "drilling",
            b.CapabilityOffer("3d-print", semantic_id="urn:example:cap:additive"),
        ],
    )
    bidding = b.bidding_parameters(
        ids.submodel_id(short, "BiddingParameters"),
        cost_rate=2.5,
        setup_cost=4,
        speed_factor=1.2,
        transport_speed=0.5,
        location="cell-a",
        proposal_validity=5.0,
        capability_rates={"milling": b.CapabilityRate(3.0, 12.0), "drilling": 1.5},
    )
    status = b.status(ids.submodel_id(short, "Status"), updated_at=dt.datetime(2025, 1, 1, tzinfo=UTC))
    shell = b.shell(
        ids.shell_id(short),
        "Mill1",
        global_asset_id=ids.asset_id(short),
        asset_type="workstation",
        submodels=[nameplate, caps, bidding, status],
    )
    return shell, [nameplate, caps, bidding, status]


def product_aas(short: str = "gear-7") -> tuple[model.AssetAdministrationShell, list[model.Submodel]]:
    order = b.order(
        ids.submodel_id(short, "Order"),
        order_id="o-7",
        product_type="gear",
        priority=1,
        notification_endpoint="https://vendor.example/hooks/o-7",
        due_date=dt.datetime(2025, 6, 1, 12, tzinfo=UTC),
        release_time=0.0,
        customization={"color": "red", "teeth": 24, "module": 1.5, "hardened": True},
        vendor="vendor-a",
    )
    plan = b.process_plan(
        ids.submodel_id(short, "ProcessPlan"),
        [
            b.PlanStep(1, "milling", alternatives=("drilling",), parameters={"depth": 3.0, "passes": 2}),
            b.PlanStep(2, "drilling", parameters={"holes": 4, "diameter": (5.0, 5.2)}),
            b.PlanStep(3, "https://example.org/caps/inspection"),
        ],
    )
    doc = b.process_documentation(ids.submodel_id(short, "ProcessDocumentation"))
    shell = b.shell(
        ids.shell_id(short), "Gear7", global_asset_id=ids.asset_id(short), submodels=[order, plan, doc]
    )
    return shell, [order, plan, doc]


def step_record(index: int, outcome: str = "completed") -> b.StepRecord:
    return b.StepRecord(
        index=index,
        capability="milling",
        call_for_proposal_id=f"cfp-{index}",
        bids=[
            b.BidRecord("mill-1", 10.0, 22.5, 31.0, score=0.91, proposal_id="p-1"),
            b.BidRecord(
                "mill-2",
                dt.datetime(2025, 1, 1, 8, tzinfo=UTC),
                dt.datetime(2025, 1, 1, 9, tzinfo=UTC),
                25.0,
                score=0.4,
            ),
        ],
        winner="mill-1",
        reason="priority 1: earliest completion (22.5 < 32400.0)",
        scheduled_start=10.0,
        scheduled_end=22.5,
        started=10.2,
        finished=22.4,
        resource="mill-1",
        outcome=outcome,
        outcome_text="ok",
        recorded_at=dt.datetime(2025, 1, 1, 9, 30, tzinfo=UTC),
    )


def test_resource_aas_verifies() -> None:
    shell, submodels = resource_aas()
    assert verify_objects([shell, *submodels]) == []
    for sm in submodels:
        assert verify(sm) == [], sm.id_short


def test_product_aas_verifies_before_and_after_documentation() -> None:
    shell, (order, plan, doc) = product_aas()
    assert verify_objects([shell, order, plan, doc]) == []
    b.put_step_record(doc, step_record(1))
    b.put_step_record(doc, b.StepRecord(2, "drilling", outcome="negotiating"))
    b.put_step_record(
        doc, b.StepRecord(3, "inspection", outcome="failed", outcome_text="no proposals after 3 rounds")
    )
    assert len(doc.submodel_element) == 3
    assert verify_objects([shell, order, plan, doc]) == []
    nameplate = b.nameplate(
        ids.submodel_id("gear-7", "Nameplate"),
        manufacturer_name="twinbid plant",
        product_designation="gear",
        uri_of_product="https://twinbid.dev/products/gear-7",
        order_code="o-7",
        address=b.Address("a", "b", "c", "DE"),
        serial_number="gear-7",
    )
    b.link(shell, nameplate)
    assert verify_objects([shell, order, plan, doc, nameplate]) == []


def test_step_record_put_is_idempotent_and_round_trips() -> None:
    _, (_, _, doc) = product_aas()
    record = step_record(1)
    b.put_step_record(doc, record)
    b.put_step_record(doc, record)
    assert [e.id_short for e in doc.submodel_element] == ["Step001"]
    (back,) = b.read_step_records(doc)
    assert back.winner == "mill-1" and back.outcome == "completed"
    assert back.capability == capability_semantic_id("milling")
    assert [bid.resource for bid in back.bids] == ["mill-1", "mill-2"]
    assert back.bids[1].start == dt.datetime(2025, 1, 1, 8, tzinfo=UTC)
    assert back.started == pytest.approx(10.2)
    # replacing the record with a later state keeps one copy
    b.put_step_record(doc, b.StepRecord(1, "milling", outcome="running", started=10.2))
    (again,) = b.read_step_records(doc)
    assert again.outcome == "running" and again.bids == ()


def test_semantic_ids_are_the_templates() -> None:
    _shell, (nameplate, caps, *_rest) = resource_aas()
    assert (
        b.semantic_value(nameplate)
        == Nameplate.SUBMODEL
        == "https://admin-shell.io/idta/nameplate/3/0/Nameplate"
    )
    assert b.semantic_value(b.child(nameplate, "SerialNumber")) == Nameplate.SERIAL_NUMBER
    assert b.semantic_value(caps) == CapabilityDescription.SUBMODEL
    offers = b.read_capabilities(caps)
    assert [o.semantic_id for o in offers] == [
        "https://twinbid.dev/capabilities/milling",
        "https://twinbid.dev/capabilities/drilling",
        "urn:example:cap:additive",
    ]
    assert offers[0].parameters == {"maxDiameter": (0.0, 120.0), "tolerance": 0.01, "coolant": True}
    _, (_, _, doc) = product_aas()
    assert b.semantic_value(doc) == ProcessDocumentation.SUBMODEL


def test_process_plan_round_trip() -> None:
    _, (_, plan, _) = product_aas()
    steps = b.read_process_plan(plan)
    assert [s.index for s in steps] == [1, 2, 3]
    assert steps[0].alternatives == (capability_semantic_id("drilling"),)
    assert steps[1].parameters == {"holes": 4, "diameter": (5.0, 5.2)}
    assert steps[2].capability == "https://example.org/caps/inspection"


def test_status_update_keeps_verifying() -> None:
    _, (*_, status) = resource_aas()
    b.update_status(status, state="busy", queue_length=3, current_step="gear-7/Step001", updated_at=42.0)
    assert b.element_value(b.child(status, "QueueLength")) == 3
    assert b.element_value(b.child(status, "UpdatedAt")) == 42.0
    b.update_status(status, current_step=None, updated_at=dt.datetime(2025, 2, 1, tzinfo=UTC))
    assert verify(status) == []
    with pytest.raises(KeyError):
        b.update_status(status, colour="red")


def test_naive_datetimes_and_bad_values_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        b.prop("When", dt.datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        b.put_step_record(product_aas()[1][2], b.StepRecord(1, "x", recorded_at=dt.datetime(2025, 1, 1)))
    with pytest.raises(ValueError, match="priority"):
        b.order("urn:o", order_id="o", product_type="p", priority=0)
    with pytest.raises(ValueError, match="priority"):
        b.order("urn:o", order_id="o", product_type="p", priority=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-finite"):
        b.prop("Bad", float("nan"))
    with pytest.raises(ValueError, match="outcome"):
        b.step_record_element(b.StepRecord(1, "x", outcome="great"))
    with pytest.raises(ValueError, match="idShort"):
        b.prop("x", 1)  # one character: valid in the metamodel, refused by the Part 2 API pattern


def test_to_id_short() -> None:
    assert b.to_id_short("3d-print") == "X3d-print"
    assert b.to_id_short("feed rate") == "feed_rate"
    assert b.to_id_short("a") == "a_"
    assert b.to_id_short("trailing-") == "trailing"


def test_ids() -> None:
    assert ids.shell_id("mill-1") == "https://twinbid.dev/ids/default/mill-1/aas"
    assert (
        ids.submodel_id("mill-1", "Status", "plant-a") == "https://twinbid.dev/ids/plant-a/mill-1/sm/Status"
    )
    with pytest.raises(ValueError):
        ids.shell_id("Mill_1")
    with pytest.raises(ids.MalformedIdentifier):
        ids.b64url_decode("a")  # impossible length
    with pytest.raises(ids.MalformedIdentifier):
        ids.b64url_decode("ab+/")  # not the url-safe alphabet
    with pytest.raises(ids.MalformedIdentifier):
        ids.b64url_decode("__8")  # decodes to bytes that are not UTF-8
    assert ids.b64url_decode(ids.b64url_encode("urn:x") + "==") == "urn:x"  # padding tolerated


@given(st.text(min_size=1, max_size=300))
def test_b64url_round_trip(identifier: str) -> None:
    encoded = ids.b64url_encode(identifier)
    assert "=" not in encoded and "/" not in encoded and "+" not in encoded
    assert ids.b64url_decode(encoded) == identifier


def test_value_only() -> None:
    _, (order, _, _) = product_aas()
    value = submodel_value_only(aio.to_jsonable(order))
    assert value["Priority"] == 1
    assert value["DueDate"] == "2025-06-01T12:00:00+00:00"
    assert value["Customization"] == {"color": "red", "teeth": 24, "module": 1.5, "hardened": True}


def test_json_round_trip_and_strict_element_parsing() -> None:
    shell, submodels = resource_aas()
    text = aio.environment_json([shell, *submodels])
    result = aio.read_json(text.encode())
    assert {o.id for o in result.objects} == {shell.id, *(s.id for s in submodels)}
    assert result.warnings == []
    element = aio.element_from_json(
        {"modelType": "Property", "idShort": "Qty", "valueType": "xs:int", "value": "3"}
    )
    assert isinstance(element, model.Property) and element.value == 3
    with pytest.raises(aio.AasReadError):
        aio.element_from_json({"modelType": "Property", "idShort": "Qty"})  # valueType missing
    with pytest.raises(aio.AasReadError):
        aio.element_from_json({"modelType": "Submodel", "id": "urn:x"})  # not an element
    with pytest.raises(aio.AasReadError):
        aio.element_from_json({"idShort": "NoType"})
    with pytest.raises(aio.EmptyPackageError):
        aio.read_json(b'{"assetAdministrationShells": []}')


def test_aasx_round_trip(tmp_path) -> None:
    shell, submodels = product_aas()
    b.put_step_record(submodels[2], step_record(1))
    path = tmp_path / "gear-7.aasx"
    aio.write_aasx(path, [shell, *submodels])
    result = aio.read_aasx(path)
    assert [s.id for s in result.shells] == [shell.id]
    assert {s.id for s in result.submodels} == {s.id for s in submodels}
    assert verify_objects(result.objects) == []
    doc = next(s for s in result.submodels if s.id_short == "ProcessDocumentation")
    assert b.read_step_records(doc)[0].bids[1].start == dt.datetime(2025, 1, 1, 8, tzinfo=UTC)
    # JSON parts inside the package work too
    data = aio.aasx_bytes([shell, *submodels], write_json=True)
    assert len(aio.read_aasx(data).objects) == 4


def _downgrade_to_v30(package: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(package)) as zin, zipfile.ZipFile(out, "w") as zout:
        for name in zin.namelist():
            content = zin.read(name)
            if name.endswith(".xml"):
                content = content.replace(
                    b"https://admin-shell.io/aas/3/1", b"https://admin-shell.io/aas/3/0"
                )
            zout.writestr(name, content)
    return out.getvalue()


def test_v30_aasx_is_rejected_not_accepted_empty() -> None:
    shell, submodels = product_aas()
    v30 = _downgrade_to_v30(aio.aasx_bytes([shell, *submodels]))
    with pytest.raises(aio.EmptyPackageError, match=r"3\.0.*only V3\.1"):
        aio.read_aasx(v30)


def test_garbage_and_shell_less_packages_are_rejected() -> None:
    with pytest.raises(aio.AasReadError):
        aio.read_aasx(b"not a zip file")
    _, submodels = product_aas()
    buf = io.BytesIO()
    from basyx.aas.adapter import aasx

    with aasx.AASXWriter(buf) as writer:
        writer.write_all_aas_objects(
            "/aasx/data.xml", model.DictIdentifiableStore(submodels), aasx.DictSupplementaryFileContainer()
        )
    with pytest.raises(aio.EmptyPackageError, match="no Asset Administration Shell"):
        aio.read_aasx(buf.getvalue())
    assert len(aio.read_aasx(buf.getvalue(), require_shell=False).objects) == 3


def test_verification_catches_errors() -> None:
    """The verifier is not a rubber stamp: a broken object yields errors."""
    env = json.loads(aio.environment_json(resource_aas()[1]))
    env["submodels"][0]["submodelElements"][0]["valueType"] = "xs:int"  # URIOfTheProduct is not an int
    from agents.aas.verify import verify_environment_jsonable

    assert verify_environment_jsonable(env)
    prop = b.prop("Count", 3, b.DT.Int)
    prop.value_type = b.DT.Boolean  # basyx does not re-check on assignment
    assert verify(prop)


def test_fast_encoder_matches_basyx() -> None:
    """The cached-dispatch encoder used on the hot paths writes exactly what basyx's encoder writes."""
    from basyx.aas.adapter.json import AASToJsonEncoder

    shell, submodels = resource_aas()
    pshell, psubmodels = product_aas()
    b.put_step_record(psubmodels[2], step_record(1))
    ops = b.submodel("urn:sm:ops", "Ops", "urn:sem:ops", [b.operation("Op1", inputs={"qty": b.DT.Int})])
    for obj in [shell, *submodels, pshell, *psubmodels, ops, *ops.submodel_element]:
        assert aio.to_json(obj) == json.dumps(obj, cls=AASToJsonEncoder)


def test_store_json_matches_basyx_after_writes() -> None:
    from agents.aas.store import AasStore, WriteKind, WriteRequest

    store = AasStore()
    shell, (order, plan, doc) = product_aas()
    store.add("gear-7", shell, order, plan, doc)
    for i in range(1, 4):
        store.apply(
            WriteRequest(
                WriteKind.PUT, doc.id, b.step_id_short(i), b.step_record_element(step_record(i)), "gear-7"
            )
        )
        assert json.loads(store.submodel_json(doc.id)) == aio.to_jsonable(doc)
    store.apply(WriteRequest(WriteKind.DELETE, doc.id, "Step002", None, "gear-7"))
    store.apply(
        WriteRequest(
            WriteKind.PATCH, doc.id, "Step001", b.smc("Step001", [b.prop("Outcome", "failed")]), "gear-7"
        )
    )
    data = json.loads(store.submodel_json(doc.id))
    assert data == aio.to_jsonable(doc)
    assert [e["idShort"] for e in data["submodelElements"]] == ["Step001", "Step003"]
    with store.edit(doc.id, "Step003") as sm:
        b.put_step_record(sm, b.StepRecord(3, "milling", outcome="cancelled"))
    assert json.loads(store.submodel_json(doc.id)) == aio.to_jsonable(doc)
    assert json.loads(store.submodel_json(order.id)) == aio.to_jsonable(order)


_times = st.one_of(
    st.floats(min_value=-1e9, max_value=1e12, allow_nan=False),
    st.integers(min_value=0, max_value=10**9),
    st.datetimes(
        min_value=dt.datetime(1970, 1, 2), max_value=dt.datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
)
_text = st.text(min_size=1, max_size=20).filter(lambda s: s.strip() == s and "\x00" not in s)
_bids = st.builds(
    b.BidRecord,
    resource=_text,
    start=_times,
    completion=_times,
    price=st.floats(min_value=0, max_value=1e9, allow_nan=False),
    score=st.one_of(st.none(), st.floats(min_value=-1e9, max_value=1e9, allow_nan=False)),
    proposal_id=st.one_of(st.none(), _text),
)
_records = st.builds(
    b.StepRecord,
    index=st.integers(min_value=0, max_value=999),
    capability=st.from_regex(r"[a-z][a-z0-9-]{0,15}", fullmatch=True),
    call_for_proposal_id=st.one_of(st.none(), _text),
    bids=st.lists(_bids, max_size=4).map(tuple),
    winner=st.one_of(st.none(), _text),
    reason=st.one_of(st.none(), _text),
    scheduled_start=st.one_of(st.none(), _times),
    scheduled_end=st.one_of(st.none(), _times),
    started=st.one_of(st.none(), _times),
    finished=st.one_of(st.none(), _times),
    resource=st.one_of(st.none(), _text),
    outcome=st.sampled_from(b.OUTCOMES),
    outcome_text=st.one_of(st.none(), _text),
    recorded_at=st.one_of(st.none(), st.datetimes(timezones=st.just(UTC))),
)


@given(_records)
def test_step_record_json_is_what_basyx_writes(record: b.StepRecord) -> None:
    """The hot path writes records as JSON directly; it must be byte for byte basyx's JSON of the object."""
    from agents.aas import docjson

    data = docjson.step_record(record)
    assert json.dumps(data) == aio.to_json(b.step_record_element(record))
    parsed = aio.element_from_json(data)  # basyx's strict decoder takes it
    doc = b.process_documentation("urn:d")
    b.replace_child(doc, parsed)
    (back,) = b.read_step_records(doc)
    assert (back.index, back.outcome, len(back.bids)) == (record.index, record.outcome, len(record.bids))


def test_completion_json_parses_and_carries_the_template_semantics() -> None:
    from agents.aas import docjson

    data = docjson.completion(4, 10.5, dt.datetime(2026, 1, 1, tzinfo=UTC), "mill-1")
    element = aio.element_from_json(data)
    assert aio.to_json(element) == json.dumps(data)
    assert b.semantic_value(b.child(element, "Finished")) == ProcessDocumentation.FINISHED
    assert b.element_value(b.child(element, "Outcome")) == "completed"
    with pytest.raises(ValueError, match="non-finite"):
        docjson.completion(4, float("inf"), 1.0, "mill-1")
    with pytest.raises(ValueError, match="timezone-aware"):
        docjson.completion(4, dt.datetime(2026, 1, 1), 1.0, "mill-1")


def test_pending_json_elements_are_served_and_built_where_basyx_would_put_them() -> None:
    """put_element_json defers building objects; JSON readers and object readers see the same submodel."""
    from agents.aas import docjson
    from agents.aas.store import AasStore, StoreError

    store = AasStore()
    shell, (order, plan, doc) = product_aas()
    store.add("gear-7", shell, order, plan, doc)
    b.put_step_record(doc, step_record(1))
    store.changed(doc.id)
    generation = store.generation(doc.id)
    store.put_element_json(doc.id, docjson.step_record(step_record(2)))
    store.put_element_json(doc.id, docjson.step_record(b.StepRecord(1, "milling", outcome="failed")))
    assert store.generation(doc.id) == generation + 2
    served = json.loads(store.submodel_json(doc.id))
    assert [e["idShort"] for e in served["submodelElements"]] == ["Step001", "Step002"]
    assert store.has_element(doc.id, "Step002")
    with pytest.raises(StoreError):
        store.has_element(doc.id, "Step009")
    sm = store.get_submodel(doc.id)  # builds the pending elements, in place
    assert [e.id_short for e in sm.submodel_element] == ["Step001", "Step002"]
    assert aio.to_jsonable(sm) == served
    assert json.loads(store.submodel_json(doc.id)) == served
    assert [r.outcome for r in b.read_step_records(sm)] == ["failed", b.read_step_records(sm)[1].outcome]
    assert verify_objects([shell, order, plan, sm]) == []


def test_documentation_merge_keeps_a_final_outcome_and_moves_replaced_children_last() -> None:
    from agents.aas import docjson
    from agents.product.documentation import merge_record, outcome_of

    booked = docjson.step_record(
        b.StepRecord(2, "milling", outcome="scheduled", winner="mill-1", scheduled_start=1)
    )
    done = docjson.completion(2, 1.0, 3.0, "mill-1")
    merged = merge_record(booked, done)
    assert outcome_of(merged) == "completed"
    assert [c["idShort"] for c in merged["value"]][-4:] == ["Started", "Finished", "Resource", "Outcome"]
    assert outcome_of(booked) == "scheduled"  # inputs are not changed
    late = merge_record(merged, docjson.step_record(b.StepRecord(2, "milling", outcome="scheduled")))
    assert outcome_of(late) == "completed"  # a booking arriving after completion does not undo it
    # the same merge on basyx objects gives the same record
    doc = b.process_documentation("urn:doc")
    b.replace_child(doc, aio.element_from_json(booked))
    existing = b.child(doc, "Step002")
    patch = aio.element_from_json(done)
    for item in list(patch.value):
        patch.value.remove(item)
        b.replace_child(existing, item)
    assert aio.to_jsonable(existing) == merged
