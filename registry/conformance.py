"""Check HTTP answers against the official AAS Part 2 OpenAPI files (used by the tests).

The IDTA files are loaded as published, with two adjustments that do not touch any schema:

* ``servers`` becomes ``/`` so requests to any host (our free loopback ports) match;
* path-level parameters that name a placeholder the path does not have are dropped — the Submodel
  Repository file declares ``aasIdentifier`` on ``.../invoke/$value`` and ``.../invoke-async/$value``,
  which no request can supply, and openapi-core refuses such a path otherwise.

Needs ``openapi-core`` and ``PyYAML`` (test dependencies); imported lazily by the tests only.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

SPEC_FILE = "V3.1_SSP-001.yaml"
AAS_REGISTRY = "AssetAdministrationShellRegistryServiceSpecification"
SUBMODEL_REGISTRY = "SubmodelRegistryServiceSpecification"
AAS_REPOSITORY = "AssetAdministrationShellRepositoryServiceSpecification"
SUBMODEL_REPOSITORY = "SubmodelRepositoryServiceSpecification"


def _yaml(path: Path) -> Any:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml is ~10x faster on these files
    return yaml.load(path.read_text(encoding="utf-8"), Loader=loader)


@functools.lru_cache(maxsize=32)
def _cached_file(uri: str) -> Any:
    """Referenced spec files, parsed once: the default handler re-reads and re-parses the YAML of
    Part1/Part2 on every validation (~30 parses of 50 kB each), which made each check take ~1 s."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise ValueError(f"only local spec files are resolved, not {uri!r}")
    return _yaml(Path(unquote(parsed.path)))


def _parameters(spec_dir: Path) -> dict[str, tuple[str, str]]:
    """Part 2 shared parameters: component key -> (name, location)."""
    data = _yaml(spec_dir / "Part2-API-Schemas" / "openapi.yaml")
    return {key: (value["name"], value["in"]) for key, value in data["components"]["parameters"].items()}


@functools.lru_cache(maxsize=16)
def load_spec(spec_dir: Path, name: str) -> Any:
    """An ``openapi_core.OpenAPI`` for ``<spec_dir>/<name>/V3.1_SSP-001.yaml`` (with the adjustments above)."""
    from jsonschema_path import SchemaPath
    from openapi_core import OpenAPI

    path = spec_dir / name / SPEC_FILE
    data = _yaml(path)
    data["servers"] = [{"url": "/"}]
    shared = _parameters(spec_dir)
    dropped = []
    for template, item in data.get("paths", {}).items():
        placeholders = set(re.findall(r"{([^}]+)}", template))
        params = item.get("parameters")
        if not params:
            continue
        kept = []
        for param in params:
            ref = param.get("$ref", "")
            pname, location = (
                shared.get(ref.rsplit("/", 1)[-1], ("", "")) if ref else (param.get("name"), param.get("in"))
            )
            if location == "path" and pname not in placeholders:
                dropped.append((template, pname))
                continue
            kept.append(param)
        item["parameters"] = kept
    handlers = {"file": _cached_file, "<all_urls>": _cached_file}
    spec = OpenAPI(
        SchemaPath.from_dict(
            data, base_uri=path.resolve().as_uri(), handlers=handlers, resolved_cache_maxsize=4096
        )
    )
    spec.dropped_parameters = dropped  # type: ignore[attr-defined]
    return spec


class _Request:
    def __init__(self, method: str, url: str, body: bytes | None, content_type: str) -> None:
        from openapi_core.datatypes import RequestParameters
        from werkzeug.datastructures import Headers, ImmutableMultiDict

        parts = urlsplit(url)
        self.method = method.lower()
        self.host_url = f"{parts.scheme}://{parts.netloc}"
        self.path = parts.path
        self.body = body
        self.content_type = content_type
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(parse_qs(parts.query)), header=Headers(), cookie=ImmutableMultiDict()
        )


class _Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        from werkzeug.datastructures import Headers

        self.status_code = status
        self.headers = Headers(headers)
        self.content_type = headers.get("content-type", "application/json" if body else "")
        self.data = body


@dataclass
class Checked:
    method: str
    path: str
    status: int
    spec: str


@dataclass
class SpecValidator:
    """Validate responses against whichever of the loaded specs has the route.

    Use as an httpx response hook (``event_hooks={"response": [validator.hook]}``) so every answer a test
    sees is checked; ``checked`` records what was validated, ``unmatched`` the routes no spec has.
    """

    specs: dict[str, Any]
    checked: list[Checked] = field(default_factory=list)
    unmatched: list[tuple[str, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, spec_dir: Path, names: Iterable[str]) -> SpecValidator:
        return cls({name: load_spec(spec_dir, name) for name in names})

    def validate(
        self,
        method: str,
        url: str,
        status: int,
        headers: dict[str, str],
        body: bytes,
        request_body: bytes | None = None,
        request_content_type: str = "application/json",
    ) -> str | None:
        """Validate one exchange; returns the spec name that matched (None if none has the route)."""
        from openapi_core.templating.paths.exceptions import OperationNotFound, PathNotFound, ServerNotFound

        request = _Request(method, url, request_body, request_content_type)
        response = _Response(status, {k.lower(): v for k, v in headers.items()}, body)
        for name, spec in self.specs.items():
            try:
                spec.validate_response(request, response)
            except (PathNotFound, OperationNotFound, ServerNotFound):
                continue
            except Exception as exc:
                cause = exc.__cause__ or exc
                text = f"{method} {request.path} -> {status}: {type(exc).__name__}: {str(cause)[:1500]}"
                self.failures.append(text)
                raise AssertionError(text) from exc
            self.checked.append(Checked(method.upper(), request.path, status, name))
            return name
        self.unmatched.append((method.upper(), request.path))
        return None

    async def hook(self, response: Any) -> None:
        """httpx async response hook."""
        await response.aread()
        request = response.request
        self.validate(
            request.method,
            str(request.url),
            response.status_code,
            dict(response.headers),
            response.content,
            None,
            request.headers.get("content-type", ""),
        )
