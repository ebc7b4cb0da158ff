"""Shell and submodel descriptors: validation, and how twinbid's agents map onto them.

Mapping (documented in docs/api.md, "Descriptors"):

==============================  ========================================================================
agent data                      descriptor field
==============================  ========================================================================
AAS id                          ``id``
AAS idShort                     ``idShort``
asset                           ``globalAssetId``, ``assetKind`` (``Instance``), ``assetType`` (agent kind)
AAS server endpoint             ``endpoints[0]``: ``interface = "AAS-3.0"``,
                                ``protocolInformation.href = <AAS server>/shells/<base64url(id)>``,
                                ``endpointProtocol = "HTTP"``, ``endpointProtocolVersion = ["1.1"]``
each submodel                   ``submodelDescriptors[]``: ``id``, ``idShort``, ``semanticId``, endpoint
                                ``interface = "SUBMODEL-3.0"``, ``href = <AAS server>/submodels/<b64(id)>``
short name (MQTT id / topics)   extension ``twinbid:shortName`` (``xs:string``)
offered capability semanticIds  extension ``twinbid:capabilities`` (``xs:string``, a JSON array of strings)
plant namespace (optional)      extension ``twinbid:namespace`` (``xs:string``)
==============================  ========================================================================

The registry indexes the short name and every capability semanticId, so ``GET /shell-descriptors?
capability=<semanticId>`` and ``?shortName=<name>`` are index lookups.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .identifiers import b64url_encode

SHORT_NAME_EXT = "twinbid:shortName"
CAPABILITIES_EXT = "twinbid:capabilities"
NAMESPACE_EXT = "twinbid:namespace"
#: The agent's Ed25519 public key (base64): what its signatures of step records verify with.
SIGNING_KEY_EXT = "twinbid:signingKey"
AAS_INTERFACE = "AAS-3.0"
SUBMODEL_INTERFACE = "SUBMODEL-3.0"
LEASE_HEADER = "Twinbid-Lease-TTL"  # request header: lease length in seconds
EXPIRES_HEADER = "Twinbid-Lease-Expires"  # response header: lease end, epoch seconds

_ID_SHORT = r"^[a-zA-Z][a-zA-Z0-9_-]*[a-zA-Z0-9_]+$"


class DescriptorError(ValueError):
    """A descriptor does not match the Part 2 schema (maps to HTTP 400)."""


# --- schema (subset of Part2-API-Schemas that the registry relies on; unknown fields are kept) --------------------


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class _Key(_Base):
    type: str = Field(min_length=1)
    value: str = Field(min_length=1, max_length=2048)


class _Reference(_Base):
    type: Literal["ExternalReference", "ModelReference"]
    keys: list[_Key] = Field(min_length=1)


class _ProtocolInformation(_Base):
    href: str = Field(max_length=2048)
    endpointProtocol: str | None = Field(default=None, max_length=128)
    endpointProtocolVersion: list[str] | None = None
    subprotocol: str | None = Field(default=None, max_length=128)
    subprotocolBody: str | None = Field(default=None, max_length=2048)
    subprotocolBodyEncoding: str | None = Field(default=None, max_length=128)


class _Endpoint(_Base):
    interface: str = Field(max_length=128)
    protocolInformation: _ProtocolInformation


class _Extension(_Base):
    name: str = Field(min_length=1, max_length=128)
    valueType: str | None = None
    value: str | None = None
    semanticId: _Reference | None = None


class _LangString(_Base):
    language: str = Field(min_length=1)
    text: str = Field(min_length=1)


class _SpecificAssetId(_Base):
    name: str = Field(min_length=1, max_length=64)
    value: str = Field(min_length=1, max_length=2048)


class _Descriptor(_Base):
    description: list[_LangString] | None = None
    displayName: list[_LangString] | None = None
    extensions: list[_Extension] | None = Field(default=None, min_length=1)


class SubmodelDescriptorModel(_Descriptor):
    id: str = Field(min_length=1, max_length=2048)
    idShort: str | None = Field(default=None, min_length=1, max_length=128, pattern=_ID_SHORT)
    endpoints: list[_Endpoint] = Field(min_length=1)
    semanticId: _Reference | None = None
    supplementalSemanticIds: list[_Reference] | None = Field(default=None, min_length=1)


class ShellDescriptorModel(_Descriptor):
    id: str = Field(min_length=1, max_length=2048)
    idShort: str | None = Field(default=None, min_length=1, max_length=128, pattern=_ID_SHORT)
    assetKind: Literal["Instance", "Type", "Role", "NotApplicable"] | None = None
    assetType: str | None = Field(default=None, min_length=1, max_length=2048)
    globalAssetId: str | None = Field(default=None, min_length=1, max_length=2048)
    endpoints: list[_Endpoint] | None = Field(default=None, min_length=1)
    specificAssetIds: list[_SpecificAssetId] | None = None
    submodelDescriptors: list[SubmodelDescriptorModel] | None = None


def _errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc or 'body'}: {err['msg']}")
    return "; ".join(parts)


def validate_shell_descriptor(data: Any) -> dict[str, Any]:
    """Check a shell descriptor against the schema; returns it unchanged (extra fields are kept)."""
    if not isinstance(data, dict):
        raise DescriptorError("an AssetAdministrationShellDescriptor must be a JSON object")
    try:
        model = ShellDescriptorModel.model_validate(data)
    except ValidationError as exc:
        raise DescriptorError(_errors(exc)) from None
    ids = [sd.id for sd in model.submodelDescriptors or ()]
    if len(ids) != len(set(ids)):
        raise DescriptorError("submodelDescriptors contain duplicate ids")
    capabilities_of(data)  # the extension must parse
    return data


def validate_submodel_descriptor(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise DescriptorError("a SubmodelDescriptor must be a JSON object")
    try:
        SubmodelDescriptorModel.model_validate(data)
    except ValidationError as exc:
        raise DescriptorError(_errors(exc)) from None
    return data


# --- reading our extensions --------------------------------------------------------------------------------------


def extension_value(descriptor: Mapping[str, Any], name: str) -> str | None:
    for ext in descriptor.get("extensions") or ():
        if isinstance(ext, dict) and ext.get("name") == name:
            value = ext.get("value")
            return value if isinstance(value, str) else None
    return None


def short_name_of(descriptor: Mapping[str, Any]) -> str | None:
    return extension_value(descriptor, SHORT_NAME_EXT)


def capabilities_of(descriptor: Mapping[str, Any]) -> list[str]:
    """The capability semanticIds a shell offers (extension ``twinbid:capabilities``, a JSON array)."""
    raw = extension_value(descriptor, CAPABILITIES_EXT)
    if not raw:
        return []
    try:
        value = json.loads(raw)
    except ValueError:
        raise DescriptorError(f"extension {CAPABILITIES_EXT} must hold a JSON array of strings") from None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise DescriptorError(f"extension {CAPABILITIES_EXT} must hold a JSON array of strings")
    return list(dict.fromkeys(value))


def semantic_id_of(descriptor: Mapping[str, Any]) -> str | None:
    ref = descriptor.get("semanticId")
    if isinstance(ref, dict) and ref.get("keys"):
        value = ref["keys"][0].get("value")
        return value if isinstance(value, str) else None
    return None


def endpoint_href(descriptor: Mapping[str, Any], interface: str | None = None) -> str | None:
    """The ``href`` of the first endpoint (with the given interface prefix, e.g. ``AAS-``)."""
    for ep in descriptor.get("endpoints") or ():
        if interface is None or str(ep.get("interface", "")).startswith(interface):
            return ep.get("protocolInformation", {}).get("href")
    return None


def aas_server_base(descriptor: Mapping[str, Any]) -> str | None:
    """The AAS server's base URL, from the shell endpoint ``<base>/shells/<b64>``."""
    href = endpoint_href(descriptor, "AAS-")
    if href and "/shells/" in href:
        return href.rsplit("/shells/", 1)[0]
    return href


# --- building ----------------------------------------------------------------------------------------------------


def _http_endpoint(interface: str, href: str) -> dict[str, Any]:
    return {
        "interface": interface,
        "protocolInformation": {"href": href, "endpointProtocol": "HTTP", "endpointProtocolVersion": ["1.1"]},
    }


def _ext(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "valueType": "xs:string", "value": value}


def submodel_descriptor(
    *, submodel_id: str, base_url: str, id_short: str | None = None, semantic_id: str | None = None
) -> dict[str, Any]:
    desc: dict[str, Any] = {"id": submodel_id}
    if id_short:
        desc["idShort"] = id_short
    if semantic_id:
        desc["semanticId"] = {
            "type": "ExternalReference",
            "keys": [{"type": "GlobalReference", "value": semantic_id}],
        }
    desc["endpoints"] = [
        _http_endpoint(SUBMODEL_INTERFACE, f"{base_url.rstrip('/')}/submodels/{b64url_encode(submodel_id)}")
    ]
    return desc


def shell_descriptor(
    *,
    aas_id: str,
    short_name: str,
    base_url: str,
    id_short: str | None = None,
    capabilities: Iterable[str] = (),
    submodels: Sequence[Mapping[str, str | None]] = (),
    global_asset_id: str | None = None,
    asset_type: str | None = None,
    namespace: str | None = None,
    extra_extensions: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A descriptor for an agent's shell served at ``base_url`` (see the module docstring for the mapping).

    ``submodels`` items are mappings with ``id`` and optional ``idShort`` / ``semanticId``.
    """
    base = base_url.rstrip("/")
    desc: dict[str, Any] = {"id": aas_id}
    if id_short:
        desc["idShort"] = id_short
    desc["assetKind"] = "Instance"
    if asset_type:
        desc["assetType"] = asset_type
    if global_asset_id:
        desc["globalAssetId"] = global_asset_id
    desc["endpoints"] = [_http_endpoint(AAS_INTERFACE, f"{base}/shells/{b64url_encode(aas_id)}")]
    extensions = [_ext(SHORT_NAME_EXT, short_name)]
    caps = list(dict.fromkeys(capabilities))
    if caps:
        extensions.append(_ext(CAPABILITIES_EXT, json.dumps(caps)))
    if namespace:
        extensions.append(_ext(NAMESPACE_EXT, namespace))
    for name, value in (extra_extensions or {}).items():
        extensions.append(_ext(name, value))
    desc["extensions"] = extensions
    if submodels:
        desc["submodelDescriptors"] = [
            submodel_descriptor(
                submodel_id=str(sm["id"]),
                base_url=base,
                id_short=sm.get("idShort"),
                semantic_id=sm.get("semanticId"),
            )
            for sm in submodels
        ]
    return desc
