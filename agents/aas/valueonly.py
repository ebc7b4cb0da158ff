"""The ValueOnly serialisation of AAS Part 2 (``.../$value``), computed from the official JSON.

Rules (Part 2 v3.1, "ValueOnly serialization"): a submodel or collection becomes an object keyed by
idShort; a list becomes an array; a Property becomes its value as a JSON number/boolean/string
according to its ``valueType``; a MultiLanguageProperty an array of ``{lang: text}``; a Range
``{"min", "max"}``; File/Blob ``{"contentType", "value"}``; a ReferenceElement its reference; relationship
elements ``{"first", "second"(, "annotations")}``; an Entity ``{"statements", "entityType", "globalAssetId",
"specificAssetIds"}``; a BasicEventElement ``{"observed"}``. Operations and Capabilities carry no value and
are left out.
"""

from __future__ import annotations

from typing import Any

_INTEGER_TYPES = frozenset(
    {
        "xs:integer",
        "xs:long",
        "xs:int",
        "xs:short",
        "xs:byte",
        "xs:nonNegativeInteger",
        "xs:positiveInteger",
        "xs:unsignedLong",
        "xs:unsignedInt",
        "xs:unsignedShort",
        "xs:unsignedByte",
        "xs:nonPositiveInteger",
        "xs:negativeInteger",
    }
)
_FLOAT_TYPES = frozenset({"xs:double", "xs:float", "xs:decimal"})
_SKIP = frozenset({"Operation", "Capability"})


def _scalar(value: str | None, value_type: str | None) -> Any:
    if value is None:
        return None
    try:
        if value_type in _INTEGER_TYPES:
            return int(value)
        if value_type in _FLOAT_TYPES:
            number = float(value)
            return number if number == number and number not in (float("inf"), float("-inf")) else value
        if value_type == "xs:boolean":
            return value in ("true", "1")
    except ValueError:
        return value
    return value


def element_value_only(element: dict[str, Any]) -> Any:
    """ValueOnly of one submodel element given as official JSON."""
    kind = element.get("modelType")
    if kind == "Property":
        return _scalar(element.get("value"), element.get("valueType"))
    if kind == "MultiLanguageProperty":
        return [{ls["language"]: ls["text"]} for ls in element.get("value", [])]
    if kind == "Range":
        vt = element.get("valueType")
        return {"min": _scalar(element.get("min"), vt), "max": _scalar(element.get("max"), vt)}
    if kind in ("File", "Blob"):
        out = {"contentType": element.get("contentType")}
        if "value" in element:
            out["value"] = element["value"]
        return out
    if kind == "ReferenceElement":
        return element.get("value")
    if kind == "SubmodelElementCollection":
        return elements_value_only(element.get("value", []))
    if kind == "SubmodelElementList":
        return [element_value_only(e) for e in element.get("value", []) if e.get("modelType") not in _SKIP]
    if kind in ("RelationshipElement", "AnnotatedRelationshipElement"):
        out = {"first": element.get("first"), "second": element.get("second")}
        if kind == "AnnotatedRelationshipElement":
            out["annotations"] = elements_value_only(element.get("annotations", []))
        return out
    if kind == "Entity":
        out = {
            "statements": elements_value_only(element.get("statements", [])),
            "entityType": element.get("entityType"),
        }
        if "globalAssetId" in element:
            out["globalAssetId"] = element["globalAssetId"]
        if "specificAssetIds" in element:
            out["specificAssetIds"] = [{s["name"]: s["value"]} for s in element["specificAssetIds"]]
        return out
    if kind == "BasicEventElement":
        return {"observed": element.get("observed")}
    return None


def elements_value_only(elements: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        e["idShort"]: element_value_only(e)
        for e in elements
        if e.get("modelType") not in _SKIP and "idShort" in e
    }


def submodel_value_only(submodel: dict[str, Any]) -> dict[str, Any]:
    """ValueOnly of a submodel given as official JSON: ``{idShort: value, ...}`` of its elements."""
    return elements_value_only(submodel.get("submodelElements", []))
