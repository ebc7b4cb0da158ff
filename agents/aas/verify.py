"""Independent verification of our basyx objects with ``aas_core3_1`` (the IDTA's generated SDK).

basyx enforces some constraints while objects are built, aas-core checks all of the metamodel's
constraints and patterns. Running both catches what each misses: the objects are serialised by basyx
to the official JSON, loaded with ``aas_core3_1.jsonization`` and verified; the result is the list of
problems as ``"<path>: <cause>"`` strings (empty = valid).

``aas_core3_1`` is a test-time dependency; importing this module without it raises ``ImportError``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import aas_core3_1.jsonization as aas_jsonization
import aas_core3_1.verification as aas_verification
from basyx.aas import model

from .io import environment_json, to_jsonable

__all__ = ["verify", "verify_element", "verify_environment_jsonable", "verify_objects"]


def verify_environment_jsonable(env: dict[str, Any]) -> list[str]:
    """Verify an environment given as JSON data (``{"assetAdministrationShells": [...], ...}``)."""
    try:
        environment = aas_jsonization.environment_from_jsonable(env)
    except aas_jsonization.DeserializationException as exc:
        return [f"{exc.path}: {exc.cause}"]
    return [f"{err.path}: {err.cause}" for err in aas_verification.verify(environment)]


def verify_objects(objects: Iterable[model.Identifiable]) -> list[str]:
    """Verify shells / submodels / concept descriptions together, as one environment."""
    return verify_environment_jsonable(json.loads(environment_json(objects)))


def verify_element(element: model.SubmodelElement) -> list[str]:
    """Verify a single submodel element by wrapping its JSON in a throw-away submodel."""
    env = {
        "submodels": [
            {"modelType": "Submodel", "id": "urn:twinbid:verify", "submodelElements": [to_jsonable(element)]}
        ]
    }
    return verify_environment_jsonable(env)


def verify(*objects: model.Identifiable | model.SubmodelElement | Iterable[model.Identifiable]) -> list[str]:
    """Convenience: any mix of identifiables, iterables of them, and submodel elements."""
    identifiables: list[model.Identifiable] = []
    errors: list[str] = []
    for obj in objects:
        if isinstance(obj, model.Identifiable):
            identifiables.append(obj)
        elif isinstance(obj, model.SubmodelElement):
            errors.extend(verify_element(obj))
        else:
            identifiables.extend(obj)
    if identifiables:
        errors.extend(verify_objects(identifiables))
    return errors
