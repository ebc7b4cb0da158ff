"""Identifiers: base64url (for URLs) and the ids of twinbid's shells, assets and submodels.

Every id we mint is an IRI under ``https://twinbid.dev/ids/{ns}/{short_name}/...`` — globally unique as
long as (namespace, short name) is, which the registry enforces per plant namespace. Vendor-supplied
product shells keep the vendor's ids; only the submodels we add get ids of ours.
"""

from __future__ import annotations

import re

from registry.identifiers import MalformedIdentifier, b64url_decode, b64url_encode

__all__ = [
    "ID_BASE",
    "MalformedIdentifier",
    "asset_id",
    "b64url_decode",
    "b64url_encode",
    "check_short_name",
    "plant_id_prefix",
    "shell_id",
    "submodel_id",
]

ID_BASE = "https://twinbid.dev/ids"
_SHORT_NAME = re.compile(r"^[a-z0-9-]+$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._~-]+$")


def check_short_name(short_name: str) -> str:
    """Short names are ``[a-z0-9-]+`` (they double as MQTT client ids and topic levels)."""
    if not _SHORT_NAME.match(short_name):
        raise ValueError(f"invalid short name {short_name!r}: expected [a-z0-9-]+")
    return short_name


def _segment(value: str, what: str) -> str:
    if not _SEGMENT.match(value):
        raise ValueError(f"invalid {what} {value!r}: use unreserved URI characters only")
    return value


def shell_id(short_name: str, namespace: str = "default") -> str:
    """The AAS id of an agent: ``https://twinbid.dev/ids/{ns}/{short_name}/aas``."""
    return f"{ID_BASE}/{_segment(namespace, 'namespace')}/{check_short_name(short_name)}/aas"


def plant_id_prefix(namespace: str = "default") -> str:
    """What every id twinbid mints for a plant's agents starts with (uploads may not use it)."""
    return f"{ID_BASE}/{_segment(namespace, 'namespace')}/"


def asset_id(short_name: str, namespace: str = "default") -> str:
    """The globalAssetId of the asset an agent represents."""
    return f"{ID_BASE}/{_segment(namespace, 'namespace')}/{check_short_name(short_name)}/asset"


def submodel_id(short_name: str, submodel: str, namespace: str = "default") -> str:
    """A submodel id: ``https://twinbid.dev/ids/{ns}/{short_name}/sm/{Submodel}``."""
    return f"{ID_BASE}/{_segment(namespace, 'namespace')}/{check_short_name(short_name)}/sm/{_segment(submodel, 'submodel name')}"
