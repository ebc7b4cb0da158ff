"""Builders for twinbid's shells and submodels (basyx-python-sdk 2.x, metamodel V3.1).

Every builder returns plain basyx objects that pass the independent ``aas_core3_1`` verification
(:func:`agents.aas.verify.verify_objects`) — the tests check each one, before and after documentation
records are added. Rules the builders enforce so callers cannot get them wrong:

* idShorts are at least two characters (the Part 2 OpenAPI pattern ``^[a-zA-Z][a-zA-Z0-9_-]*[a-zA-Z0-9_]+$``
  is stricter than the metamodel); free text such as capability or parameter names goes through
  :func:`to_id_short`.
* ``xs:dateTime`` values must be timezone-aware ``datetime`` objects (a naive one raises ``ValueError``);
  simulated times are ``float`` time units and become ``xs:double``.
* Empty collections are left empty (basyx then omits ``value``, as the schema's ``minItems: 1`` wants).

The semanticIds come from :mod:`agents.aas.semantics`.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from basyx.aas import model

from .semantics import (
    BiddingParameters,
    CapabilityDescription,
    Nameplate,
    Order,
    ProcessDocumentation,
    ProcessPlan,
    Status,
    capability_semantic_id,
)

Scalar = str | int | float | bool | _dt.datetime | _dt.date
TimeValue = float | int | _dt.datetime

DT = model.datatypes

# ---------------------------------------------------------------------------------------------------------------------
# small element helpers
# ---------------------------------------------------------------------------------------------------------------------

_ID_SHORT = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*[A-Za-z0-9_]$")


def to_id_short(text: str, prefix: str = "X") -> str:
    """Turn free text (``3d-print``, ``feed rate``) into a valid idShort (``X3d-print``, ``feed_rate``)."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", text.strip())
    if not cleaned or not cleaned[0].isalpha():
        cleaned = prefix + cleaned
    cleaned = cleaned.rstrip("-")
    if len(cleaned) < 2:
        cleaned += "_"
    return cleaned[:128]


def check_id_short(id_short: str) -> str:
    if not _ID_SHORT.match(id_short) or len(id_short) > 128:
        raise ValueError(
            f"invalid idShort {id_short!r} (letters, digits, '_' and '-', at least 2 characters)"
        )
    return id_short


def ext_ref(value: str) -> model.ExternalReference:
    """An ExternalReference with one GlobalReference key — the usual form of a semanticId."""
    return model.ExternalReference((model.Key(model.KeyTypes.GLOBAL_REFERENCE, value),))


def semantic_value(obj: model.HasSemantics | None) -> str | None:
    """The first key value of an element's semanticId (or None)."""
    if obj is None or obj.semantic_id is None or not obj.semantic_id.key:
        return None
    return obj.semantic_id.key[0].value


def _aware(value: _dt.datetime) -> _dt.datetime:
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        raise ValueError(f"xs:dateTime values must be timezone-aware, got naive {value.isoformat()}")
    return value


def _infer(value: Scalar) -> tuple[type, Any]:
    if isinstance(value, bool):
        return DT.Boolean, value
    if isinstance(value, int):
        return DT.Long, value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(
                f"non-finite number {value!r} refused: a price or time of inf/NaN is a bug upstream"
            )
        return DT.Double, value
    if isinstance(value, _dt.datetime):
        return DT.DateTime, _aware(value)
    if isinstance(value, _dt.date):
        return DT.Date, DT.Date(value.year, value.month, value.day)
    if isinstance(value, str):
        return DT.String, value
    raise TypeError(f"unsupported property value {value!r} ({type(value).__name__})")


def prop(
    id_short: str,
    value: Scalar | None,
    value_type: type | None = None,
    *,
    semantic_id: str | None = None,
    supplemental: Iterable[str] = (),
    description: str | None = None,
) -> model.Property:
    """A Property; the XSD type is inferred from ``value`` unless ``value_type`` is given.

    ``int`` becomes ``xs:long``, ``float`` ``xs:double``, aware ``datetime`` ``xs:dateTime``.
    Passing ``value_type=DT.Double`` with an ``int`` converts it.
    """
    if value is None:
        if value_type is None:
            raise ValueError(f"{id_short}: value_type is required when value is None")
        vt, v = value_type, None
    elif value_type is None:
        vt, v = _infer(value)
    else:
        vt, v = value_type, value
        if isinstance(v, _dt.datetime):
            _aware(v)
        if vt is DT.Double and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"non-finite number {v!r} refused: a price or time of inf/NaN is a bug upstream")
    return model.Property(
        check_id_short(id_short),
        value_type=vt,
        value=v,
        semantic_id=ext_ref(semantic_id) if semantic_id else None,
        supplemental_semantic_id=[ext_ref(s) for s in supplemental],
        description=model.MultiLanguageTextType({"en": description}) if description else None,
    )


def time_prop(id_short: str, value: TimeValue | None, *, semantic_id: str | None = None) -> model.Property:
    """A point in time: aware ``datetime`` -> ``xs:dateTime``; simulated time units -> ``xs:double``."""
    if value is None:
        return prop(id_short, None, DT.Double, semantic_id=semantic_id)
    if isinstance(value, _dt.datetime):
        return prop(id_short, value, DT.DateTime, semantic_id=semantic_id)
    return prop(id_short, float(value), DT.Double, semantic_id=semantic_id)


def mlp(
    id_short: str,
    texts: Mapping[str, str] | str,
    *,
    semantic_id: str | None = None,
    supplemental: Iterable[str] = (),
    language: str = "en",
) -> model.MultiLanguageProperty:
    values = {language: texts} if isinstance(texts, str) else dict(texts)
    return model.MultiLanguageProperty(
        check_id_short(id_short),
        value=model.MultiLanguageTextType(values),
        semantic_id=ext_ref(semantic_id) if semantic_id else None,
        supplemental_semantic_id=[ext_ref(s) for s in supplemental],
    )


def smc(
    id_short: str,
    elements: Iterable[model.SubmodelElement] = (),
    *,
    semantic_id: str | None = None,
    supplemental: Iterable[str] = (),
    description: str | None = None,
) -> model.SubmodelElementCollection:
    return model.SubmodelElementCollection(
        check_id_short(id_short),
        value=list(elements),
        semantic_id=ext_ref(semantic_id) if semantic_id else None,
        supplemental_semantic_id=[ext_ref(s) for s in supplemental],
        description=model.MultiLanguageTextType({"en": description}) if description else None,
    )


def submodel(
    submodel_id: str,
    id_short: str,
    semantic_id: str,
    elements: Iterable[model.SubmodelElement] = (),
    *,
    description: str | None = None,
    version: tuple[str, str] | None = ("1", "0"),
    template_id: str | None = None,
) -> model.Submodel:
    admin = None
    if version is not None:
        admin = model.AdministrativeInformation(
            version=version[0], revision=version[1], template_id=template_id
        )
    return model.Submodel(
        submodel_id,
        submodel_element=list(elements),
        id_short=check_id_short(id_short),
        semantic_id=ext_ref(semantic_id),
        administration=admin,
        description=model.MultiLanguageTextType({"en": description}) if description else None,
    )


def scalar_params(
    params: Mapping[str, Scalar | tuple[float, float]], *, semantic_id: str | None = None
) -> list[model.SubmodelElement]:
    """Parameters as Properties (or Ranges for ``(min, max)`` tuples), idShorts derived from the names."""
    out: list[model.SubmodelElement] = []
    for name, value in params.items():
        if isinstance(value, tuple):
            lo, hi = value
            out.append(
                model.Range(
                    to_id_short(name),
                    DT.Double,
                    min=float(lo),
                    max=float(hi),
                    semantic_id=ext_ref(semantic_id) if semantic_id else None,
                )
            )
        else:
            out.append(prop(to_id_short(name), value, semantic_id=semantic_id))
    return out


def element_value(element: model.SubmodelElement | None) -> Any:
    """Python value of a Property/Range/MLP (None for other kinds or a missing element)."""
    if isinstance(element, model.Property):
        return element.value
    if isinstance(element, model.Range):
        return (element.min, element.max)
    if isinstance(element, model.MultiLanguageProperty):
        return dict(element.value) if element.value else {}
    return None


def child(container: model.UniqueIdShortNamespace, id_short: str) -> model.SubmodelElement | None:
    try:
        return container.get_referable(id_short)  # type: ignore[return-value]
    except KeyError:
        return None


def set_value(container: model.UniqueIdShortNamespace, id_short: str, value: Any) -> None:
    """Set the value of an existing Property (keeping its valueType), creating it if missing."""
    element = child(container, id_short)
    if element is None:
        _add(container, prop(id_short, value))
        return
    if not isinstance(element, model.Property):
        raise TypeError(f"{id_short} is a {type(element).__name__}, not a Property")
    if isinstance(value, _dt.datetime):
        _aware(value)
    if element.value_type is DT.Double and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    element.value = value


def _add(container: model.UniqueIdShortNamespace, element: model.SubmodelElement) -> None:
    if isinstance(container, model.Submodel):
        container.submodel_element.add(element)
    elif isinstance(container, model.SubmodelElementCollection | model.SubmodelElementList):
        container.value.add(element)
    else:
        raise TypeError(f"cannot add elements to {type(container).__name__}")


def replace_child(
    container: model.Submodel | model.SubmodelElementCollection, element: model.SubmodelElement
) -> bool:
    """Put ``element`` into ``container``, replacing a child with the same idShort. Returns True if one was replaced."""
    members = container.submodel_element if isinstance(container, model.Submodel) else container.value
    existing = child(container, element.id_short)  # type: ignore[arg-type]
    if existing is not None:
        members.remove(existing)
    members.add(element)
    return existing is not None


# ---------------------------------------------------------------------------------------------------------------------
# shell
# ---------------------------------------------------------------------------------------------------------------------


def shell(
    aas_id: str,
    id_short: str,
    *,
    global_asset_id: str,
    asset_kind: model.AssetKind = model.AssetKind.INSTANCE,
    asset_type: str | None = None,
    submodels: Iterable[model.Submodel] = (),
    description: str | None = None,
) -> model.AssetAdministrationShell:
    """An AAS with its asset information and references to ``submodels``."""
    return model.AssetAdministrationShell(
        asset_information=model.AssetInformation(
            asset_kind=asset_kind, global_asset_id=global_asset_id, asset_type=asset_type
        ),
        id_=aas_id,
        id_short=check_id_short(id_short),
        submodel={model.ModelReference.from_referable(sm) for sm in submodels},
        description=model.MultiLanguageTextType({"en": description}) if description else None,
    )


def link(aas: model.AssetAdministrationShell, *submodels: model.Submodel) -> None:
    """Add submodel references to a shell (idempotent)."""
    known = {ref.get_identifier() for ref in aas.submodel}
    for sm in submodels:
        if sm.id not in known:
            aas.submodel.add(model.ModelReference.from_referable(sm))
            known.add(sm.id)


def unlink(aas: model.AssetAdministrationShell, submodel_id: str) -> None:
    for ref in list(aas.submodel):
        if ref.get_identifier() == submodel_id:
            aas.submodel.discard(ref)


# ---------------------------------------------------------------------------------------------------------------------
# Digital Nameplate (IDTA 02006-3-0)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    street: str
    zipcode: str
    city: str
    national_code: str  # ISO 3166-1 alpha-2


def nameplate(
    submodel_id: str,
    *,
    manufacturer_name: str,
    product_designation: str,
    uri_of_product: str,
    order_code: str,
    address: Address,
    serial_number: str | None = None,
    year_of_construction: int | str | None = None,
    date_of_manufacture: _dt.date | None = None,
    product_type: str | None = None,
    product_family: str | None = None,
    article_number: str | None = None,
    hardware_version: str | None = None,
    software_version: str | None = None,
    country_of_origin: str | None = None,
    language: str = "en",
) -> model.Submodel:
    """The Digital Nameplate 3.0 with its mandatory elements and the optional ones given."""
    n = Nameplate
    ecl = n.ECLASS

    def p(id_short: str, sem: str, value: Any, vt: type = DT.String) -> model.Property:
        return prop(id_short, value, vt, semantic_id=sem, supplemental=[ecl[sem]] if sem in ecl else ())

    def m(id_short: str, sem: str, text: str) -> model.MultiLanguageProperty:
        return mlp(
            id_short, text, semantic_id=sem, supplemental=[ecl[sem]] if sem in ecl else (), language=language
        )

    elements: list[model.SubmodelElement] = [
        p("URIOfTheProduct", n.URI_OF_THE_PRODUCT, uri_of_product, DT.AnyURI),
        m("ManufacturerName", n.MANUFACTURER_NAME, manufacturer_name),
        m("ManufacturerProductDesignation", n.MANUFACTURER_PRODUCT_DESIGNATION, product_designation),
        smc(
            "AddressInformation",
            [
                mlp("Street", address.street, semantic_id=n.STREET, language=language),
                mlp("Zipcode", address.zipcode, semantic_id=n.ZIPCODE, language=language),
                mlp("CityTown", address.city, semantic_id=n.CITY_TOWN, language=language),
                mlp("NationalCode", address.national_code, semantic_id=n.NATIONAL_CODE, language=language),
            ],
            semantic_id=n.ADDRESS_INFORMATION,
        ),
        p("OrderCodeOfManufacturer", n.ORDER_CODE_OF_MANUFACTURER, order_code),
    ]
    optional: list[tuple[str, str, Any, str]] = [
        ("ManufacturerProductFamily", n.MANUFACTURER_PRODUCT_FAMILY, product_family, "mlp"),
        ("ManufacturerProductType", n.MANUFACTURER_PRODUCT_TYPE, product_type, "str"),
        (
            "ProductArticleNumberOfManufacturer",
            n.PRODUCT_ARTICLE_NUMBER_OF_MANUFACTURER,
            article_number,
            "str",
        ),
        ("SerialNumber", n.SERIAL_NUMBER, serial_number, "str"),
        (
            "YearOfConstruction",
            n.YEAR_OF_CONSTRUCTION,
            str(year_of_construction) if year_of_construction is not None else None,
            "str",
        ),
        ("DateOfManufacture", n.DATE_OF_MANUFACTURE, date_of_manufacture, "date"),
        ("HardwareVersion", n.HARDWARE_VERSION, hardware_version, "str"),
        ("SoftwareVersion", n.SOFTWARE_VERSION, software_version, "str"),
        ("CountryOfOrigin", n.COUNTRY_OF_ORIGIN, country_of_origin, "str"),
    ]
    for id_short, sem, value, kind in optional:
        if value is None:
            continue
        if kind == "mlp":
            elements.append(m(id_short, sem, value))
        elif kind == "date":
            elements.append(p(id_short, sem, value, DT.Date))
        else:
            elements.append(p(id_short, sem, value))
    return submodel(
        submodel_id,
        "Nameplate",
        n.SUBMODEL,
        elements,
        version=("3", "0"),
        template_id=n.TEMPLATE_ID,
        description="Digital Nameplate (IDTA 02006-3-0)",
    )


# ---------------------------------------------------------------------------------------------------------------------
# Capabilities (IDTA 02020-1-0 Capability Description)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CapabilityOffer:
    """One offered capability: its name (or full semanticId) and its parameters.

    Parameter values are scalars or ``(min, max)`` ranges, e.g. ``{"maxDiameter": (0.0, 120.0)}``.
    """

    name: str
    parameters: Mapping[str, Scalar | tuple[float, float]] = field(default_factory=dict)
    comment: str | None = None
    semantic_id: str | None = None

    @property
    def sid(self) -> str:
        return self.semantic_id or capability_semantic_id(self.name)


def capabilities(submodel_id: str, offers: Iterable[CapabilityOffer | str]) -> model.Submodel:
    """The offered capabilities: a CapabilitySet with one CapabilityContainer per capability."""
    cd = CapabilityDescription
    containers = []
    for offer in offers:
        if isinstance(offer, str):
            offer = CapabilityOffer(offer)
        name = offer.name.rsplit("/", 1)[-1]
        inner: list[model.SubmodelElement] = [
            model.Capability(
                to_id_short(name),
                semantic_id=ext_ref(offer.sid),
                supplemental_semantic_id=[ext_ref(cd.CAPABILITY)],
            ),
        ]
        if offer.comment:
            inner.append(mlp("CapabilityComment", offer.comment, semantic_id=cd.CAPABILITY_COMMENT))
        if offer.parameters:
            prop_containers = [
                smc(
                    to_id_short(f"{to_id_short(pname)}Container"),
                    scalar_params({pname: pvalue}),
                    semantic_id=cd.PROPERTY_CONTAINER,
                )
                for pname, pvalue in offer.parameters.items()
            ]
            inner.append(smc("PropertySet", prop_containers, semantic_id=cd.PROPERTY_SET))
        containers.append(
            smc(to_id_short(f"{to_id_short(name)}Container"), inner, semantic_id=cd.CAPABILITY_CONTAINER)
        )
    return submodel(
        submodel_id,
        "OfferedCapabilities",
        cd.SUBMODEL,
        [smc("CapabilitySet", containers, semantic_id=cd.CAPABILITY_SET)],
        description="Offered capabilities (IDTA 02020-1-0 Capability Description)",
    )


def read_capabilities(sm: model.Submodel) -> list[CapabilityOffer]:
    """Parse a capability submodel built by :func:`capabilities` (or one shaped like IDTA 02020) back into offers."""
    offers: list[CapabilityOffer] = []
    cd = CapabilityDescription
    for cap_set in sm.submodel_element:
        if not isinstance(cap_set, model.SubmodelElementCollection):
            continue
        for container in cap_set.value:
            if not isinstance(container, model.SubmodelElementCollection):
                continue
            cap = next((e for e in container.value if isinstance(e, model.Capability)), None)
            if cap is None:
                continue
            params: dict[str, Any] = {}
            comment = element_value(child(container, "CapabilityComment")) or None
            pset = child(container, "PropertySet")
            if isinstance(pset, model.SubmodelElementCollection):
                for pc in pset.value:
                    if isinstance(pc, model.SubmodelElementCollection):
                        for el in pc.value:
                            params[el.id_short] = element_value(el)
            sid = semantic_value(cap) or capability_semantic_id(cap.id_short)
            offers.append(
                CapabilityOffer(
                    name=cap.id_short,
                    parameters=params,
                    comment=next(iter(comment.values())) if comment else None,
                    semantic_id=sid,
                )
            )
    del cd
    return offers


# ---------------------------------------------------------------------------------------------------------------------
# BiddingParameters and Status (resources)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CapabilityRate:
    """Per-capability pricing and speed: money per time unit of processing, nominal duration in time units."""

    cost_rate: float
    nominal_duration: float | None = None


def bidding_parameters(
    submodel_id: str,
    *,
    cost_rate: float,
    setup_cost: float = 0.0,
    speed_factor: float = 1.0,
    transport_speed: float | None = None,
    location: str | None = None,
    proposal_validity: float | None = None,
    capability_rates: Mapping[str, CapabilityRate | float] | None = None,
) -> model.Submodel:
    """How a resource prices and times its proposals (cost rates, speeds)."""
    b = BiddingParameters
    elements: list[model.SubmodelElement] = [
        prop("CostRate", cost_rate, DT.Double, semantic_id=b.COST_RATE),
        prop("SetupCost", setup_cost, DT.Double, semantic_id=b.SETUP_COST),
        prop("SpeedFactor", speed_factor, DT.Double, semantic_id=b.SPEED_FACTOR),
    ]
    if transport_speed is not None:
        elements.append(prop("TransportSpeed", transport_speed, DT.Double, semantic_id=b.TRANSPORT_SPEED))
    if location is not None:
        elements.append(prop("Location", location, DT.String, semantic_id=b.LOCATION))
    if proposal_validity is not None:
        elements.append(
            prop("ProposalValidity", proposal_validity, DT.Double, semantic_id=b.PROPOSAL_VALIDITY)
        )
    if capability_rates:
        rates = []
        for cap, rate in capability_rates.items():
            if not isinstance(rate, CapabilityRate):
                rate = CapabilityRate(float(rate))
            inner = [prop("CostRate", rate.cost_rate, DT.Double, semantic_id=b.COST_RATE)]
            if rate.nominal_duration is not None:
                inner.append(prop("NominalDuration", rate.nominal_duration, DT.Double))
            rates.append(
                smc(
                    to_id_short(cap.rsplit("/", 1)[-1]),
                    inner,
                    semantic_id=b.CAPABILITY_RATE,
                    supplemental=[capability_semantic_id(cap)],
                )
            )
        elements.append(smc("CapabilityRates", rates, semantic_id=b.CAPABILITY_RATES))
    return submodel(
        submodel_id,
        "BiddingParameters",
        b.SUBMODEL,
        elements,
        description="Pricing and timing parameters for proposals",
    )


STATES = ("idle", "busy", "setup", "down", "waiting", "transport", "done", "failed")


def status(
    submodel_id: str,
    *,
    state: str = "idle",
    queue_length: int = 0,
    current_step: str | None = None,
    current_product: str | None = None,
    location: str | None = None,
    updated_at: TimeValue | None = None,
) -> model.Submodel:
    """Live status. Always carries every element (empty strings for none) so writers can PATCH/PUT them."""
    s = Status
    elements = [
        prop("State", state, DT.String, semantic_id=s.STATE),
        prop("QueueLength", int(queue_length), DT.Int, semantic_id=s.QUEUE_LENGTH),
        prop("CurrentStep", current_step or "", DT.String, semantic_id=s.CURRENT_STEP),
        prop("CurrentProduct", current_product or "", DT.String, semantic_id=s.CURRENT_PRODUCT),
        prop("Location", location or "", DT.String, semantic_id=s.LOCATION),
        time_prop("UpdatedAt", updated_at if updated_at is not None else 0.0, semantic_id=s.UPDATED_AT),
    ]
    return submodel(submodel_id, "Status", s.SUBMODEL, elements, description="Live status of the asset")


def update_status(sm: model.Submodel, **fields: Any) -> None:
    """Update status fields in place (``state=``, ``queue_length=``, ``current_step=``, ...)."""
    names = {
        "state": "State",
        "queue_length": "QueueLength",
        "current_step": "CurrentStep",
        "current_product": "CurrentProduct",
        "location": "Location",
        "updated_at": "UpdatedAt",
    }
    for key, value in fields.items():
        if key not in names:
            raise KeyError(f"unknown status field {key!r}")
        if key in ("current_step", "current_product", "location") and value is None:
            value = ""
        if key == "updated_at":
            existing = child(sm, "UpdatedAt")
            kind = DT.DateTime if isinstance(value, _dt.datetime) else DT.Double
            if value is not None and isinstance(existing, model.Property) and existing.value_type is kind:
                # Every queue change stamps the status: set the value, do not rebuild the element.
                existing.value = value if kind is DT.DateTime else float(value)
            else:
                replace_child(sm, time_prop("UpdatedAt", value, semantic_id=Status.UPDATED_AT))
            continue
        set_value(sm, names[key], value)


# ---------------------------------------------------------------------------------------------------------------------
# Order and ProcessPlan (products)
# ---------------------------------------------------------------------------------------------------------------------


def order(
    submodel_id: str,
    *,
    order_id: str,
    product_type: str,
    priority: int,
    notification_endpoint: str | None = None,
    due_date: TimeValue | None = None,
    release_time: TimeValue | None = None,
    customization: Mapping[str, Scalar] | None = None,
    vendor: str | None = None,
) -> model.Submodel:
    """The order: customization, priority (1 = top priority .. 5 = lowest), due date, notification endpoint."""
    if isinstance(priority, bool) or not isinstance(priority, int) or not 1 <= priority <= 5:
        raise ValueError(f"priority must be an integer 1..5 (1 is top), got {priority!r}")
    o = Order
    elements: list[model.SubmodelElement] = [
        prop("OrderId", order_id, DT.String, semantic_id=o.ORDER_ID),
        prop("ProductType", product_type, DT.String, semantic_id=o.PRODUCT_TYPE),
        prop(
            "Priority",
            priority,
            DT.Int,
            semantic_id=o.PRIORITY,
            description="1 = top priority (earliest completion) .. 5 = lowest (cheapest)",
        ),
    ]
    if due_date is not None:
        elements.append(time_prop("DueDate", due_date, semantic_id=o.DUE_DATE))
    if release_time is not None:
        elements.append(time_prop("ReleaseTime", release_time, semantic_id=o.RELEASE_TIME))
    if notification_endpoint:
        elements.append(
            prop(
                "NotificationEndpoint", notification_endpoint, DT.AnyURI, semantic_id=o.NOTIFICATION_ENDPOINT
            )
        )
    if vendor:
        elements.append(prop("Vendor", vendor, DT.String, semantic_id=o.VENDOR))
    elements.append(smc("Customization", scalar_params(customization or {}), semantic_id=o.CUSTOMIZATION))
    return submodel(submodel_id, "Order", o.SUBMODEL, elements, description="Manufacturing order")


@dataclass(frozen=True)
class PlanStep:
    """One step of a process plan: 1-based index, required capability (+ acceptable alternatives), parameters."""

    index: int
    capability: str
    alternatives: Sequence[str] = ()
    parameters: Mapping[str, Scalar | tuple[float, float]] = field(default_factory=dict)


def step_id_short(index: int) -> str:
    """``Step001`` — idShorts must start with a letter; zero-padding keeps them in order when sorted."""
    if index < 0:
        raise ValueError("step index must be >= 0")
    return f"Step{index:03d}"


def process_plan(submodel_id: str, steps: Iterable[PlanStep]) -> model.Submodel:
    """The ordered steps, one collection each (``Step001``...)."""
    pp = ProcessPlan
    elements = []
    seen: set[int] = set()
    for step in sorted(steps, key=lambda s: s.index):
        if step.index in seen:
            raise ValueError(f"duplicate step index {step.index}")
        seen.add(step.index)
        inner: list[model.SubmodelElement] = [
            prop("Index", step.index, DT.Int, semantic_id=pp.STEP_INDEX),
            prop(
                "RequiredCapability",
                capability_semantic_id(step.capability),
                DT.AnyURI,
                semantic_id=pp.REQUIRED_CAPABILITY,
            ),
        ]
        if step.alternatives:
            inner.append(
                smc(
                    "AlternativeCapabilities",
                    [
                        prop(
                            f"Alternative{i:02d}",
                            capability_semantic_id(alt),
                            DT.AnyURI,
                            semantic_id=pp.REQUIRED_CAPABILITY,
                        )
                        for i, alt in enumerate(step.alternatives, start=1)
                    ],
                    semantic_id=pp.ALTERNATIVES,
                )
            )
        if step.parameters:
            inner.append(
                smc(
                    "Parameters",
                    scalar_params(step.parameters, semantic_id=pp.PARAMETER),
                    semantic_id=pp.PARAMETERS,
                )
            )
        elements.append(smc(step_id_short(step.index), inner, semantic_id=pp.STEP))
    return submodel(
        submodel_id, "ProcessPlan", pp.SUBMODEL, elements, description="Ordered manufacturing steps"
    )


def read_process_plan(sm: model.Submodel) -> list[PlanStep]:
    steps = []
    for el in sm.submodel_element:
        if not isinstance(el, model.SubmodelElementCollection):
            continue
        alts = child(el, "AlternativeCapabilities")
        params = child(el, "Parameters")
        steps.append(
            PlanStep(
                index=int(element_value(child(el, "Index"))),
                capability=str(element_value(child(el, "RequiredCapability"))),
                alternatives=tuple(str(element_value(a)) for a in alts.value)
                if isinstance(alts, model.SubmodelElementCollection)
                else (),
                parameters={p.id_short: element_value(p) for p in params.value}
                if isinstance(params, model.SubmodelElementCollection)
                else {},
            )
        )
    return sorted(steps, key=lambda s: s.index)


# ---------------------------------------------------------------------------------------------------------------------
# ProcessDocumentation (modelled on IDTA 02031-2 Executed Processes)
# ---------------------------------------------------------------------------------------------------------------------

OUTCOMES = ("pending", "negotiating", "scheduled", "running", "completed", "failed", "cancelled")


@dataclass(frozen=True)
class BidRecord:
    """A proposal received for a step (times in simulated time units or aware datetimes)."""

    resource: str
    start: TimeValue
    completion: TimeValue
    price: float
    score: float | None = None
    proposal_id: str | None = None
    #: The selection policy's account of this bid's score (bids are listed best first).
    reason: str | None = None


@dataclass(frozen=True)
class StepRecord:
    """What happened to one step: call for proposal, bids, winner and why, times, resource, outcome."""

    index: int
    capability: str
    call_for_proposal_id: str | None = None
    bids: Sequence[BidRecord] = ()
    winner: str | None = None
    reason: str | None = None
    #: The selection policy that ranked the bids (its name, or module:Class).
    policy: str | None = None
    scheduled_start: TimeValue | None = None
    scheduled_end: TimeValue | None = None
    started: TimeValue | None = None
    finished: TimeValue | None = None
    resource: str | None = None
    outcome: str = "pending"
    outcome_text: str | None = None
    recorded_at: _dt.datetime | None = None


def process_documentation(submodel_id: str, records: Iterable[StepRecord] = ()) -> model.Submodel:
    """The (initially empty) documentation submodel; records are added with :func:`put_step_record`."""
    sm = submodel(
        submodel_id,
        "ProcessDocumentation",
        ProcessDocumentation.SUBMODEL,
        description="One record per manufacturing step (modelled on IDTA 02031-2 Executed Processes)",
    )
    for record in records:
        put_step_record(sm, record)
    return sm


def step_record_element(record: StepRecord) -> model.SubmodelElementCollection:
    """The ``StepNNN`` collection for a record (what :func:`put_step_record` stores)."""
    pd = ProcessDocumentation
    if record.outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}, got {record.outcome!r}")
    elements: list[model.SubmodelElement] = [
        prop("StepIndex", record.index, DT.Int, semantic_id=pd.STEP_INDEX),
        prop(
            "RequiredCapability",
            capability_semantic_id(record.capability),
            DT.AnyURI,
            semantic_id=pd.CAPABILITY,
        ),
        prop("Outcome", record.outcome, DT.String, semantic_id=pd.OUTCOME),
    ]
    if record.call_for_proposal_id:
        elements.append(
            prop(
                "CallForProposalId",
                record.call_for_proposal_id,
                DT.String,
                semantic_id=pd.CALL_FOR_PROPOSAL_ID,
            )
        )
    if record.bids:
        bids = []
        for i, bid in enumerate(record.bids, start=1):
            inner = [
                prop("Resource", bid.resource, DT.String, semantic_id=pd.BID_RESOURCE),
                time_prop("Start", bid.start, semantic_id=pd.BID_START),
                time_prop("Completion", bid.completion, semantic_id=pd.BID_COMPLETION),
                prop("Price", float(bid.price), DT.Double, semantic_id=pd.BID_PRICE),
            ]
            if bid.score is not None:
                inner.append(prop("Score", float(bid.score), DT.Double, semantic_id=pd.BID_SCORE))
            if bid.proposal_id:
                inner.append(prop("ProposalId", bid.proposal_id, DT.String))
            if bid.reason:
                inner.append(prop("SelectionReason", bid.reason, DT.String, semantic_id=pd.SELECTION_REASON))
            bids.append(smc(f"Bid{i:02d}", inner, semantic_id=pd.BID))
        elements.append(smc("Bids", bids, semantic_id=pd.BIDS))
    optional_str = [
        ("Winner", record.winner, pd.WINNER),
        ("SelectionReason", record.reason, pd.SELECTION_REASON),
        ("SelectionPolicy", record.policy, pd.SELECTION_POLICY),
        ("Resource", record.resource, pd.RESOURCE),
        ("OutcomeText", record.outcome_text, pd.OUTCOME_TEXT),
    ]
    for id_short, value, sem in optional_str:
        if value:
            elements.append(prop(id_short, value, DT.String, semantic_id=sem))
    optional_time = [
        ("ScheduledStart", record.scheduled_start, pd.SCHEDULED_START),
        ("ScheduledEnd", record.scheduled_end, pd.SCHEDULED_END),
        ("Started", record.started, pd.STARTED),
        ("Finished", record.finished, pd.FINISHED),
    ]
    for id_short, value, sem in optional_time:
        if value is not None:
            elements.append(time_prop(id_short, value, semantic_id=sem))
    if record.recorded_at is not None:
        elements.append(prop("RecordedAt", record.recorded_at, DT.DateTime, semantic_id=pd.RECORDED_AT))
    return smc(step_id_short(record.index), elements, semantic_id=pd.STEP_RECORD)


def put_step_record(doc: model.Submodel, record: StepRecord) -> model.SubmodelElementCollection:
    """Insert or replace the record of ``record.index`` (idempotent: the same record twice leaves one copy)."""
    element = step_record_element(record)
    replace_child(doc, element)
    return element


append_step_record = put_step_record


def _time(element: model.SubmodelElement | None) -> TimeValue | None:
    value = element_value(element)
    return value if value is None or isinstance(value, _dt.datetime) else float(value)


def read_step_records(doc: model.Submodel) -> list[StepRecord]:
    """Parse the records back (used on resume, and to check idempotency)."""
    records = []
    for el in doc.submodel_element:
        if (
            not isinstance(el, model.SubmodelElementCollection)
            or semantic_value(el) != ProcessDocumentation.STEP_RECORD
        ):
            continue
        bids = []
        bids_el = child(el, "Bids")
        if isinstance(bids_el, model.SubmodelElementCollection):
            for b in sorted(bids_el.value, key=lambda e: e.id_short):
                score = element_value(child(b, "Score"))
                bids.append(
                    BidRecord(
                        resource=str(element_value(child(b, "Resource"))),
                        start=_time(child(b, "Start")),  # type: ignore[arg-type]
                        completion=_time(child(b, "Completion")),  # type: ignore[arg-type]
                        price=float(element_value(child(b, "Price"))),
                        score=float(score) if score is not None else None,
                        proposal_id=element_value(child(b, "ProposalId")),
                        reason=element_value(child(b, "SelectionReason")),
                    )
                )

        def s(name: str, el: model.SubmodelElementCollection = el) -> str | None:
            v = element_value(child(el, name))
            return str(v) if v is not None else None

        records.append(
            StepRecord(
                index=int(element_value(child(el, "StepIndex"))),
                capability=str(element_value(child(el, "RequiredCapability"))),
                call_for_proposal_id=s("CallForProposalId"),
                bids=tuple(bids),
                winner=s("Winner"),
                reason=s("SelectionReason"),
                policy=s("SelectionPolicy"),
                scheduled_start=_time(child(el, "ScheduledStart")),
                scheduled_end=_time(child(el, "ScheduledEnd")),
                started=_time(child(el, "Started")),
                finished=_time(child(el, "Finished")),
                resource=s("Resource"),
                outcome=s("Outcome") or "pending",
                outcome_text=s("OutcomeText"),
                recorded_at=element_value(child(el, "RecordedAt")),
            )
        )
    return sorted(records, key=lambda r: r.index)


# ---------------------------------------------------------------------------------------------------------------------
# Operations (invokable on the AAS server)
# ---------------------------------------------------------------------------------------------------------------------


def operation(
    id_short: str,
    *,
    inputs: Mapping[str, type] | None = None,
    outputs: Mapping[str, type] | None = None,
    semantic_id: str | None = None,
    description: str | None = None,
) -> model.Operation:
    """An Operation with typed input/output Properties (``{"quantity": DT.Int}``)."""

    def var(name: str, vt: type) -> model.Property:
        return model.Property(check_id_short(name), value_type=vt)

    return model.Operation(
        check_id_short(id_short),
        input_variable=[var(k, v) for k, v in (inputs or {}).items()],
        output_variable=[var(k, v) for k, v in (outputs or {}).items()],
        semantic_id=ext_ref(semantic_id) if semantic_id else None,
        description=model.MultiLanguageTextType({"en": description}) if description else None,
    )
