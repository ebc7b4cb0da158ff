"""What the bidding messages carry, as real AAS V3 submodel elements.

Each message content is one `SubmodelElementCollection` built with basyx and
serialised by basyx's own JSON encoder, so any AAS tool can read our
`interactionElements`. The required capability travels as an AAS `Capability`
element whose semanticId names the capability (IDTA 02020 style).

Decoding goes through basyx's strict decoder, so a peer that sends elements
basyx cannot read gets a precise error instead of a silently empty result.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from basyx.aas import model
from basyx.aas.adapter.json import json_deserialization

from protocol.bidding.flat import field_names

SEMANTIC_PREFIX = "https://twinbid.dev/i40/"
CAPABILITY_PREFIX = "https://twinbid.dev/capabilities/"


class ElementError(ValueError):
    """interactionElements that do not carry what the message type needs."""


# --- what a number in a message may be ------------------------------------------------------------
#
# Every number read from a peer is checked here, before it can reach a state machine, a schedule
# or the journal: a step of 10**30 failed three handlers and a whole group commit (the database
# stores 64-bit integers), a step of -7 was executed, a release of 1e308 was booked. The bounds are
# data, one table, read by `_coerce` for the fields of each message and by `_read_property` for
# every property (parameters included).

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: Far past any plant's horizon in simulated time units (31,700 years of seconds), yet its epoch
#: milliseconds fit a 64-bit integer a thousand times over.
MAX_TIME = 1e12
#: Prices and other amounts: well inside a double's exact integers (2**53), so sums stay exact.
MAX_AMOUNT = 1e15
PRIORITY_LEVELS = 5  # 1 = top priority ... 5 = lowest (protocol.selection weighs between them)
#: The fields that are simulated times or durations (never negative).
TIME_FIELDS = (
    "release due remaining_work earliest_start completion duration setup transport valid_until"
    " start started finished breakdown_delay"
).split()
#: field name -> inclusive (low, high); a number without a row is bounded by its type alone
#: (an int within 64 bits, a float finite and within +-MAX_AMOUNT).
BOUNDS: dict[str, tuple[float, float]] = {
    "step": (1, 2**31 - 1),  # the process plan's 1-based index
    "priority": (1, PRIORITY_LEVELS),
    "price": (0.0, MAX_AMOUNT),
    **dict.fromkeys(TIME_FIELDS, (0.0, MAX_TIME)),
}


def check_number(name: str, value: int | float) -> None:
    """Raise ElementError unless `value` is a number `name` may hold (see BOUNDS)."""
    if isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ElementError(f"{name}: {value} is not a finite number")
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        raise ElementError(f"{name}: {value} does not fit a 64-bit integer")
    low, high = BOUNDS.get(
        name, (-MAX_AMOUNT, MAX_AMOUNT) if isinstance(value, float) else (INT64_MIN, INT64_MAX)
    )
    if not low <= value <= high:
        raise ElementError(f"{name}: {value} is outside {low:g}..{high:g}")


def capability_semantic_id(name: str) -> str:
    return CAPABILITY_PREFIX + name


def _ref(uri: str) -> model.ExternalReference:
    return model.ExternalReference((model.Key(model.KeyTypes.GLOBAL_REFERENCE, uri),))


_XS_TYPES: dict[type, type] = {float: float, int: model.datatypes.Long, bool: bool, str: str}


def _prop(name: str, value: Any) -> model.Property:
    if isinstance(value, float) and not math.isfinite(value):
        raise ElementError(f"{name}: {value} is not a finite number")
    return model.Property(name, _XS_TYPES[type(value)], value, semantic_id=_ref(SEMANTIC_PREFIX + name))


def _params_collection(params: dict[str, Any]) -> model.SubmodelElementCollection:
    items = []
    for key in sorted(params):
        value = params[key]
        if type(value) not in _XS_TYPES:
            value = json.dumps(value, sort_keys=True)
        items.append(model.Property(key, _XS_TYPES[type(value)], value))
    return model.SubmodelElementCollection(
        "parameters", items, semantic_id=_ref(SEMANTIC_PREFIX + "parameters")
    )


T = TypeVar("T", bound="Content")


@dataclass(frozen=True)
class Content:
    """Base of message contents: a flat record of typed fields <-> one AAS collection.

    Subclasses declare `ID_SHORT` and plain fields (str, int, float, bool); a
    field named `capability` becomes an AAS Capability element, a field named
    `parameters` a nested collection.
    """

    ID_SHORT: ClassVar[str] = ""

    def to_element(self) -> model.SubmodelElementCollection:
        items: list[model.SubmodelElement] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "capability":
                items.append(model.Capability(value, semantic_id=_ref(capability_semantic_id(value))))
            elif f.name == "parameters":
                items.append(_params_collection(value))
            else:
                items.append(_prop(f.name, value))
        return model.SubmodelElementCollection(
            self.ID_SHORT, items, semantic_id=_ref(SEMANTIC_PREFIX + self.ID_SHORT)
        )

    def to_json_elements(self) -> list[dict[str, Any]]:
        """The AAS JSON of `to_element()`, written directly (equality with basyx is tested).

        basyx needs about a millisecond per message to build and encode these
        objects; the bidding hot path cannot afford that, the shape is fixed.
        """
        items: list[dict[str, Any]] = []
        for name in field_names(type(self)):
            value = getattr(self, name)
            if value is None:
                continue
            if name == "capability":
                items.append(
                    {
                        "idShort": value,
                        "modelType": "Capability",
                        "semanticId": reference_json(CAPABILITY_PREFIX + value),
                    }
                )
            elif name == "parameters":
                items.append(_params_json(value))
            else:
                items.append(_prop_json(name, value, reference_json(SEMANTIC_PREFIX + name)))
        return [
            {
                "idShort": self.ID_SHORT,
                "modelType": "SubmodelElementCollection",
                "semanticId": reference_json(SEMANTIC_PREFIX + self.ID_SHORT),
                "value": items,
            }
        ]

    @classmethod
    def from_element(cls: type[T], element: model.SubmodelElement) -> T:
        if not isinstance(element, model.SubmodelElementCollection) or element.id_short != cls.ID_SHORT:
            raise ElementError(f"expected a collection {cls.ID_SHORT!r}, got {_describe(element)}")
        values: dict[str, Any] = {}
        for item in element.value:
            if isinstance(item, model.Capability):
                values["capability"] = item.id_short
            elif isinstance(item, model.SubmodelElementCollection) and item.id_short == "parameters":
                values["parameters"] = {
                    p.id_short: p.value for p in item.value if isinstance(p, model.Property)
                }
            elif isinstance(item, model.Property):
                values[item.id_short] = item.value
        return cls._from_values(values)

    @classmethod
    def _from_values(cls: type[T], values: dict[str, Any]) -> T:
        kwargs: dict[str, Any] = {}
        for name, kind, required in _specs(cls):
            if name in values:
                kwargs[name] = _coerce(cls.ID_SHORT, name, kind, values[name])
            elif required:
                raise ElementError(f"{cls.ID_SHORT}.{name}: missing")
        return cls(**kwargs)

    @classmethod
    def from_json_elements(cls: type[T], elements: list[dict[str, Any]], *, strict: bool = False) -> T:
        """Find and decode this content among a message's interactionElements.

        The default reads the AAS JSON directly, checking every value against its
        declared `valueType`; `strict=True` goes through basyx's strict decoder.
        """
        for i, raw in enumerate(elements):
            if isinstance(raw, dict) and raw.get("idShort") == cls.ID_SHORT:
                where = f"interactionElements[{i}]"
                if strict:
                    return cls.from_element(decode_element(raw, where))
                return cls._from_values(_read_collection(raw, where, cls.ID_SHORT))
        raise ElementError(f"interactionElements: no {cls.ID_SHORT!r} collection")


def _describe(element: object) -> str:
    return f"{type(element).__name__} {getattr(element, 'id_short', '')!r}"


_SPECS: dict[type, tuple[tuple[str, str, bool], ...]] = {}


def _specs(cls: type) -> tuple[tuple[str, str, bool], ...]:
    """(field, its type annotation as text, required) per content class, worked out once."""
    specs = _SPECS.get(cls)
    if specs is None:
        specs = _SPECS[cls] = tuple(
            (
                f.name,
                str(f.type),
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
            )
            for f in dataclasses.fields(cls)
        )
    return specs


def _coerce(owner: str, name: str, text: str, value: Any) -> Any:
    try:
        if name in ("capability", "parameters"):
            return value
        if "float" in text:
            out = float(value)
        elif "int" in text:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("not a whole number")
            out = int(value)
        else:
            out = None
        if out is not None:
            check_number(name, out)
            return out
        if "bool" in text:
            return bool(value)
        return str(value)
    except ElementError as exc:
        raise ElementError(f"{owner}.{exc}") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise ElementError(f"{owner}.{name}: {value!r} is not a valid {text} ({exc})") from None


@functools.lru_cache(maxsize=4096)
def reference_json(uri: str) -> dict[str, Any]:
    """A semanticId reference. Cached, so one dict serves every message that carries it: the
    elements of a message are written, never changed."""
    return {"type": "ExternalReference", "keys": [{"type": "GlobalReference", "value": uri}]}


def xsd_double(value: float) -> str:
    """A finite float as basyx writes an xs:double (its ``xsd_repr``, without the type dispatch)."""
    return repr(value).replace("e", "E")


def _xs(value: Any) -> tuple[str, str]:
    """(valueType, lexical value) exactly as basyx writes them."""
    if isinstance(value, bool):
        return "xs:boolean", "true" if value else "false"
    if isinstance(value, int):
        return "xs:long", str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ElementError(f"{value} is not a finite number")
        return "xs:double", xsd_double(value)
    return "xs:string", str(value)


def _prop_json(name: str, value: Any, semantic: dict[str, Any] | None) -> dict[str, Any]:
    try:
        value_type, text = _xs(value)
    except ElementError as exc:
        raise ElementError(f"{name}: {exc}") from None
    out: dict[str, Any] = {"idShort": name, "modelType": "Property"}
    if semantic is not None:
        out["semanticId"] = semantic
    out["value"] = text
    out["valueType"] = value_type
    return out


def _params_json(params: dict[str, Any]) -> dict[str, Any]:
    items = []
    for key in sorted(params):
        value = params[key]
        if type(value) not in _XS_TYPES:
            value = json.dumps(value, sort_keys=True)
        items.append(_prop_json(key, value, None))
    return {
        "idShort": "parameters",
        "modelType": "SubmodelElementCollection",
        "semanticId": reference_json(SEMANTIC_PREFIX + "parameters"),
        "value": items,
    }


_FROM_XS = {
    "xs:double": float,
    "xs:float": float,
    "xs:decimal": float,
    "xs:long": int,
    "xs:int": int,
    "xs:integer": int,
    "xs:short": int,
    "xs:string": str,
    "xs:anyURI": str,
    "xs:boolean": lambda s: {"true": True, "false": False, "1": True, "0": False}[s],
}


def _read_property(raw: Any, where: str) -> tuple[str, Any]:
    if not isinstance(raw, dict) or raw.get("modelType") != "Property":
        raise ElementError(f"{where}: expected a Property")
    name, value_type, text = raw.get("idShort"), raw.get("valueType"), raw.get("value")
    if (
        not isinstance(name, str)
        or not isinstance(value_type, str)
        or value_type not in _FROM_XS
        or not isinstance(text, str)
    ):
        raise ElementError(
            f"{where}: a Property needs a string idShort, a known valueType and a string value"
        )
    try:
        value = _FROM_XS[value_type](text)
    except (ValueError, KeyError):
        raise ElementError(f"{where}.{name}: {text!r} is not a valid {value_type}") from None
    if isinstance(value, (int, float)):
        try:
            check_number(name, value)
        except ElementError as exc:
            raise ElementError(f"{where}.{exc}") from None
    return name, value


def _read_collection(raw: dict[str, Any], where: str, id_short: str) -> dict[str, Any]:
    if raw.get("modelType") != "SubmodelElementCollection" or not isinstance(raw.get("value", []), list):
        raise ElementError(f"{where}: {id_short} must be a SubmodelElementCollection with a list value")
    values: dict[str, Any] = {}
    for j, item in enumerate(raw.get("value", [])):
        at = f"{where}.value[{j}]"
        kind = item.get("modelType") if isinstance(item, dict) else None
        if kind == "Capability" and isinstance(item.get("idShort"), str):
            values["capability"] = item["idShort"]
        elif kind == "SubmodelElementCollection" and item.get("idShort") == "parameters":
            inner = item.get("value", [])
            if not isinstance(inner, list):
                raise ElementError(f"{at}: parameters must hold a list")
            values["parameters"] = dict(_read_property(p, f"{at}.value[{k}]") for k, p in enumerate(inner))
        elif kind == "Property":
            name, value = _read_property(item, at)
            values[name] = value
    return values


def decode_element(raw: dict[str, Any], where: str = "interactionElements") -> model.SubmodelElement:
    """One AAS element from its JSON, strictly: what basyx cannot read is an error."""
    try:
        obj = json.loads(json.dumps(raw), cls=json_deserialization.StrictAASFromJsonDecoder)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise ElementError(f"{where}: not a valid AAS element: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, model.SubmodelElement):
        raise ElementError(f"{where}: expected a submodel element, got {type(obj).__name__}")
    return obj


# --- the contents of the bidding messages --------------------------------------------------------


@dataclass(frozen=True)
class StepCall(Content):
    """callForProposal: the step to be done and what constrains it."""

    ID_SHORT: ClassVar[str] = "CallForProposal"
    product: str  # short name of the product
    step: int  # index in the process plan, from 0
    capability: str
    location: str  # where the product is now
    release: float  # earliest simulated time the step may start
    priority: int = 3
    due: float | None = None
    remaining_work: float = 0.0  # nominal work still ahead, for queue ordering
    alternatives: str = ""  # other capabilities that would do, space-separated
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def capabilities(self) -> tuple[str, ...]:
        """The required capability first, then the acceptable alternatives."""
        return (self.capability, *(c for c in self.alternatives.split() if c != self.capability))

    def latest_end(self, duration: float) -> float:
        """When this step, taking `duration`, must end for the product to meet its due date: the
        due date less the nominal work after it (inf without a due date)."""
        if self.due is None:
            return float("inf")
        return round(self.due - max(self.remaining_work - duration, 0.0), 9)


@dataclass(frozen=True)
class Bid(Content):
    """proposal: a binding offer until `valid_until`."""

    ID_SHORT: ClassVar[str] = "Proposal"
    resource: str
    capability: str
    earliest_start: float
    completion: float
    duration: float
    setup: float
    transport: float
    price: float
    valid_until: float
    location: str


@dataclass(frozen=True)
class Booking(Content):
    """informConfirm: the booked slot, as promised in the proposal."""

    ID_SHORT: ClassVar[str] = "Booking"
    resource: str
    start: float
    completion: float


@dataclass(frozen=True)
class StepResult(Content):
    """inform: the step is done."""

    ID_SHORT: ClassVar[str] = "StepResult"
    resource: str
    started: float
    finished: float
    location: str
    outcome: str = "done"
    breakdown_delay: float = 0.0


@dataclass(frozen=True)
class Reason(Content):
    """refuseProposal, rejectProposal, informFailure, notUnderstood: why."""

    ID_SHORT: ClassVar[str] = "Reason"
    code: str
    text: str = ""
