"""The registry service: AAS Registry API and Submodel Registry API (AAS Part 2 v3.1), plus leases and a
capability lookup.

Standard routes (both specs in full, profile SSP-001):

* ``GET|POST /shell-descriptors``, ``GET|PUT|DELETE /shell-descriptors/{aasIdentifier}``
* ``GET|POST /shell-descriptors/{aasIdentifier}/submodel-descriptors``,
  ``GET|PUT|DELETE /shell-descriptors/{aasIdentifier}/submodel-descriptors/{submodelIdentifier}``
* ``GET|POST /submodel-descriptors``, ``GET|PUT|DELETE /submodel-descriptors/{submodelIdentifier}``
* ``GET /description``, ``GET /openapi.json``

Extensions (documented in docs/api.md):

* ``GET /shell-descriptors?capability=<semanticId>`` — shells whose ``twinbid:capabilities`` extension
  lists that capability; ``?shortName=<name>`` — the shell of an agent; ``?idShort=``. Values are plain
  (URL-encoded), not base64. The standard ``assetKind``/``assetType`` filters work too.
* Leases: ``Twinbid-Lease-TTL: <seconds>`` on POST/PUT of a descriptor makes it expire unless renewed
  (renew = PUT the same descriptor again with the header); the response carries ``Twinbid-Lease-Expires``
  (epoch seconds). Expired descriptors are invisible at once and purged by a background task.
* ``PUT /twinbid/bulk/shell-descriptors`` — a JSON array of shell descriptors, created or replaced in one
  transaction (all or none; 400 names the first invalid one), one lease header for all; answers 200
  ``{"created": n, "replaced": m}``. Registration and renewal of a node's agents in a few requests.
* ``POST /twinbid/bulk/lookup`` with ``{"ids": [...], "capabilities": [...]}`` — many lookups in one
  request: ``{"ids": {id: descriptor}, "capabilities": {semanticId: [descriptor, ...]}}`` (live
  descriptors only; an unknown id is left out). A read, safe to repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response

from protocol.tokens import NS_ENV, SECRET_ENV, AuthError, RunTokens, tokens_from_env

from .descriptors import (
    EXPIRES_HEADER,
    LEASE_HEADER,
    DescriptorError,
    short_name_of,
    validate_shell_descriptor,
    validate_submodel_descriptor,
)
from .part2 import (
    ApiError,
    BodyLimitMiddleware,
    InLoopServer,
    MalformedIdentifier,
    b64url_decode,
    b64url_encode,
    install_error_handlers,
    json_bytes,
    json_response,
    make_cursor,
    page_ids,
    paged_body,
    parse_cursor,
    parse_limit,
    read_json_body,
)
from .store import AlreadyExists, RegistryStore

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 256 * 1024
PROFILES = [
    "https://admin-shell.io/aas/API/3/1/AssetAdministrationShellRegistryServiceSpecification/SSP-001",
    "https://admin-shell.io/aas/API/3/1/SubmodelRegistryServiceSpecification/SSP-001",
]
_ASSET_KINDS = ("Instance", "Type", "Role", "NotApplicable")
BULK_SHELLS_PATH = "/twinbid/bulk/shell-descriptors"  # extension: many descriptors in one PUT
BULK_LOOKUP_PATH = "/twinbid/bulk/lookup"  # extension: many lookups (by id, by capability) in one POST
BULK_LOOKUP_MAX = 2000  # ids + capabilities in one lookup


def _decode(segment: str, what: str) -> str:
    try:
        return b64url_decode(segment)
    except MalformedIdentifier as exc:
        raise ApiError(400, f"{what}: {exc}") from None


def _ttl(request: Request) -> float | None:
    raw = request.headers.get(LEASE_HEADER)
    if raw is None or raw == "":
        return None
    try:
        ttl = float(raw)
    except ValueError:
        raise ApiError(400, f"{LEASE_HEADER} must be a number of seconds") from None
    if not math.isfinite(ttl) or ttl <= 0:
        raise ApiError(400, f"{LEASE_HEADER} must be > 0")
    return ttl


def _lease_headers(expires: float | None, location: str | None = None) -> dict[str, str]:
    headers = {}
    if expires is not None:
        headers[EXPIRES_HEADER] = f"{expires:.3f}"
    if location is not None:
        headers["Location"] = location
    return headers


def _shell_body(raw: Any) -> dict[str, Any]:
    try:
        return validate_shell_descriptor(raw)
    except DescriptorError as exc:
        raise ApiError(400, f"invalid AssetAdministrationShellDescriptor: {exc}") from None


def _submodel_body(raw: Any) -> dict[str, Any]:
    try:
        return validate_submodel_descriptor(raw)
    except DescriptorError as exc:
        raise ApiError(400, f"invalid SubmodelDescriptor: {exc}") from None


def create_registry_app(
    store: RegistryStore, *, tokens: RunTokens | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> FastAPI:
    """The FastAPI app over ``store``.

    Reads are open. Every write must carry a bearer token of the run (:mod:`protocol.tokens`;
    without ``tokens`` the registry accepts no write: 401) and may touch only the descriptors of
    the agents the token names: a shell descriptor (and the submodel descriptors nested in it)
    belongs to the agent its ``twinbid:shortName`` names, and neither the new nor the replaced
    descriptor may name anyone else (403), so an id cannot be re-pointed or deleted by a
    stranger. Standalone submodel descriptors (twinbid registers none) name no agent: any agent
    of the run may write them. Refusals are logged and counted in ``app.state.refused``.
    """
    app = FastAPI(
        title="twinbid AAS registry",
        version="3.1",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        description="AAS Registry + Submodel Registry (AAS Part 2 API v3.1), leases and capability "
        "lookup — see docs/api.md",
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    refused: Counter[str] = Counter()
    app.state.refused = refused
    description = json_bytes({"profiles": PROFILES})

    def refuse(request: Request, status: int, text: str) -> ApiError:
        refused[str(status)] += 1
        log.warning("refused %s %s: %d %s", request.method, request.url.path[:200], status, text)
        return ApiError(status, text)

    def authenticate(request: Request) -> frozenset[str]:
        if tokens is None:
            raise refuse(request, 401, "this registry has no credentials of a run: it accepts no writes")
        try:
            return tokens.callers(request.headers.get("authorization"))
        except AuthError as exc:
            raise refuse(request, 401, exc.text) from None

    def authorize(request: Request, callers: frozenset[str], *descriptors: dict[str, Any] | None) -> None:
        """Each descriptor given (new, replaced) must belong to an agent the token names."""
        for desc in descriptors:
            if desc is None:
                continue
            owner = short_name_of(desc)
            if owner is None or owner not in callers:
                who = ", ".join(sorted(callers))
                raise refuse(
                    request,
                    403,
                    f"descriptor {str(desc.get('id'))[:200]!r} belongs to {owner or 'no agent'}; "
                    f"{who} may not write it",
                )

    shells_tag = ["Asset Administration Shell Registry API"]
    submodels_tag = ["Submodel Registry API"]

    @app.get("/description", operation_id="GetSelfDescription", tags=["Description API"])
    async def get_description() -> Response:
        return json_response(description)

    # ---------------------------------------------------------------------------------------------- shells

    @app.get("/shell-descriptors", operation_id="GetAllAssetAdministrationShellDescriptors", tags=shells_tag)
    async def list_shells(request: Request) -> Response:
        q = request.query_params
        limit = parse_limit(q.get("limit"))
        cursor = parse_cursor(q.get("cursor"))
        asset_kind = q.get("assetKind") or None
        if asset_kind is not None and asset_kind not in _ASSET_KINDS:
            raise ApiError(400, f"assetKind must be one of {', '.join(_ASSET_KINDS)}")
        asset_type = _decode(q["assetType"], "assetType") if q.get("assetType") else None
        bodies, last = store.list_shells(
            limit=limit,
            cursor=cursor,
            capability=q.get("capability") or None,
            short_name=q.get("shortName") or None,
            id_short=q.get("idShort") or None,
            asset_kind=asset_kind,
            asset_type=asset_type,
        )
        return json_response(
            paged_body([b.encode("utf-8") for b in bodies], make_cursor(last) if last else None)
        )

    @app.post(
        "/shell-descriptors",
        status_code=201,
        operation_id="PostAssetAdministrationShellDescriptor",
        tags=shells_tag,
    )
    async def post_shell(request: Request) -> Response:
        callers = authenticate(request)
        ttl = _ttl(request)
        desc = _shell_body(await read_json_body(request))
        authorize(request, callers, desc, store.get_shell(desc["id"]))
        try:
            _, expires = store.put_shell(desc, ttl, create_only=True)
        except AlreadyExists:
            raise ApiError(409, f"shell descriptor {desc['id']!r} already exists") from None
        location = f"/shell-descriptors/{b64url_encode(desc['id'])}"
        return json_response(json_bytes(desc), 201, _lease_headers(expires, location))

    @app.get(
        "/shell-descriptors/{aasIdentifier}",
        operation_id="GetAssetAdministrationShellDescriptorById",
        tags=shells_tag,
    )
    async def get_shell(aasIdentifier: str) -> Response:
        aas_id = _decode(aasIdentifier, "aasIdentifier")
        body = store.get_shell_json(aas_id)
        if body is None:
            raise ApiError(404, f"shell descriptor {aas_id!r} not found")
        return json_response(body.encode("utf-8"))

    @app.put(
        "/shell-descriptors/{aasIdentifier}",
        status_code=204,
        operation_id="PutAssetAdministrationShellDescriptorById",
        tags=shells_tag,
    )
    async def put_shell(aasIdentifier: str, request: Request) -> Response:
        callers = authenticate(request)
        aas_id = _decode(aasIdentifier, "aasIdentifier")
        ttl = _ttl(request)
        desc = _shell_body(await read_json_body(request))
        if desc["id"] != aas_id:
            raise ApiError(400, "the descriptor's id does not match the aasIdentifier in the path")
        authorize(request, callers, desc, store.get_shell(aas_id))
        created, expires = store.put_shell(desc, ttl)
        if created:
            return json_response(
                json_bytes(desc), 201, _lease_headers(expires, f"/shell-descriptors/{aasIdentifier}")
            )
        return Response(status_code=204, headers=_lease_headers(expires))

    @app.put(
        BULK_SHELLS_PATH,
        operation_id="PutAssetAdministrationShellDescriptorsInBulk",
        tags=["twinbid extensions"],
    )
    async def put_shells_bulk(request: Request) -> Response:
        """Extension: create or replace many shell descriptors at once (a JSON array), all or none,
        with one lease for all. A node that starts thousands of agents registers and renews them
        in a few requests instead of one each (docs/api.md, "Extensions")."""
        callers = authenticate(request)
        ttl = _ttl(request)
        raw = await read_json_body(request)
        if not isinstance(raw, list):
            raise ApiError(400, "the body must be a JSON array of AssetAdministrationShellDescriptors")
        descs = []
        for index, item in enumerate(raw):
            try:
                descs.append(validate_shell_descriptor(item))
            except DescriptorError as exc:
                raise ApiError(
                    400, f"descriptor {index}: invalid AssetAdministrationShellDescriptor: {exc}"
                ) from None
        for desc in descs:  # all or none
            authorize(request, callers, desc, store.get_shell(desc["id"]))
        created, expires = store.put_shells(descs, ttl)
        body = json_bytes({"created": created, "replaced": len({d["id"] for d in descs}) - created})
        return json_response(body, 200, _lease_headers(expires))

    @app.post(
        BULK_LOOKUP_PATH,
        operation_id="LookUpAssetAdministrationShellDescriptorsInBulk",
        tags=["twinbid extensions"],
    )
    async def lookup_bulk(request: Request) -> Response:
        """Extension: many lookups in one request — descriptors by id and the shells offering each
        capability. A node's directory sends the lookups its agents wait for together
        (docs/api.md, "Extensions"). A read: safe to repeat."""
        raw = await read_json_body(request)
        ids = raw.get("ids", []) if isinstance(raw, dict) else None
        caps = raw.get("capabilities", []) if isinstance(raw, dict) else None
        if not (
            isinstance(ids, list)
            and isinstance(caps, list)
            and all(isinstance(x, str) for x in ids + caps)
            and len(ids) + len(caps) <= BULK_LOOKUP_MAX
        ):
            raise ApiError(
                400,
                f'the body must be {{"ids": [string], "capabilities": [string]}}, {BULK_LOOKUP_MAX} at most',
            )
        by_id, by_cap = store.lookup(ids, caps)
        parts = [b'{"ids":{']
        parts.append(b",".join(json_bytes(k) + b":" + v.encode() for k, v in by_id.items()))
        parts.append(b'},"capabilities":{')
        parts.append(
            b",".join(
                json_bytes(k) + b":[" + b",".join(v.encode() for v in bodies) + b"]"
                for k, bodies in by_cap.items()
            )
        )
        parts.append(b"}}")
        return json_response(b"".join(parts))

    @app.delete(
        "/shell-descriptors/{aasIdentifier}",
        status_code=204,
        operation_id="DeleteAssetAdministrationShellDescriptorById",
        tags=shells_tag,
    )
    async def delete_shell(aasIdentifier: str, request: Request) -> Response:
        callers = authenticate(request)
        aas_id = _decode(aasIdentifier, "aasIdentifier")
        authorize(request, callers, store.get_shell(aas_id))
        if not store.delete_shell(aas_id):
            raise ApiError(404, f"shell descriptor {aas_id!r} not found")
        return Response(status_code=204)

    # ---------------------------------------------------------------------------------------------- nested

    def _shell_or_404(aas_id: str) -> dict[str, Any]:
        desc = store.get_shell(aas_id)
        if desc is None:
            raise ApiError(404, f"shell descriptor {aas_id!r} not found")
        return desc

    @app.get(
        "/shell-descriptors/{aasIdentifier}/submodel-descriptors",
        operation_id="GetAllSubmodelDescriptorsThroughSuperpath",
        tags=shells_tag,
    )
    async def list_nested(aasIdentifier: str, request: Request) -> Response:
        aas_id = _decode(aasIdentifier, "aasIdentifier")
        limit = parse_limit(request.query_params.get("limit"))
        cursor = parse_cursor(request.query_params.get("cursor"))
        by_id = {sd["id"]: sd for sd in _shell_or_404(aas_id).get("submodelDescriptors") or ()}
        page, next_cursor = page_ids(by_id, limit, cursor)
        return json_response(paged_body([json_bytes(by_id[i]) for i in page], next_cursor))

    @app.post(
        "/shell-descriptors/{aasIdentifier}/submodel-descriptors",
        status_code=201,
        operation_id="PostSubmodelDescriptor-ThroughSuperpath",
        tags=shells_tag,
    )
    async def post_nested(aasIdentifier: str, request: Request) -> Response:
        callers = authenticate(request)
        aas_id = _decode(aasIdentifier, "aasIdentifier")
        sd = _submodel_body(await read_json_body(request))
        shell = _shell_or_404(aas_id)
        authorize(request, callers, shell)
        nested = list(shell.get("submodelDescriptors") or ())
        if any(x["id"] == sd["id"] for x in nested):
            raise ApiError(409, f"submodel descriptor {sd['id']!r} already exists in {aas_id!r}")
        shell["submodelDescriptors"] = [*nested, sd]
        if not store.update_shell_body(shell):
            raise ApiError(404, f"shell descriptor {aas_id!r} not found")
        location = f"/shell-descriptors/{aasIdentifier}/submodel-descriptors/{b64url_encode(sd['id'])}"
        return json_response(json_bytes(sd), 201, {"Location": location})

    @app.get(
        "/shell-descriptors/{aasIdentifier}/submodel-descriptors/{submodelIdentifier}",
        operation_id="GetSubmodelDescriptorByIdThroughSuperpath",
        tags=shells_tag,
    )
    async def get_nested(aasIdentifier: str, submodelIdentifier: str) -> Response:
        aas_id = _decode(aasIdentifier, "aasIdentifier")
        sm_id = _decode(submodelIdentifier, "submodelIdentifier")
        for sd in _shell_or_404(aas_id).get("submodelDescriptors") or ():
            if sd["id"] == sm_id:
                return json_response(json_bytes(sd))
        raise ApiError(404, f"submodel descriptor {sm_id!r} not found in {aas_id!r}")

    @app.put(
        "/shell-descriptors/{aasIdentifier}/submodel-descriptors/{submodelIdentifier}",
        status_code=204,
        operation_id="PutSubmodelDescriptorByIdThroughSuperpath",
        tags=shells_tag,
    )
    async def put_nested(aasIdentifier: str, submodelIdentifier: str, request: Request) -> Response:
        callers = authenticate(request)
        aas_id = _decode(aasIdentifier, "aasIdentifier")
        sm_id = _decode(submodelIdentifier, "submodelIdentifier")
        sd = _submodel_body(await read_json_body(request))
        if sd["id"] != sm_id:
            raise ApiError(400, "the descriptor's id does not match the submodelIdentifier in the path")
        shell = _shell_or_404(aas_id)
        authorize(request, callers, shell)
        nested = list(shell.get("submodelDescriptors") or ())
        index = next((i for i, x in enumerate(nested) if x["id"] == sm_id), None)
        if index is None:
            nested.append(sd)
        else:
            nested[index] = sd
        shell["submodelDescriptors"] = nested
        if not store.update_shell_body(shell):
            raise ApiError(404, f"shell descriptor {aas_id!r} not found")
        if index is None:
            location = f"/shell-descriptors/{aasIdentifier}/submodel-descriptors/{submodelIdentifier}"
            return json_response(json_bytes(sd), 201, {"Location": location})
        return Response(status_code=204)

    @app.delete(
        "/shell-descriptors/{aasIdentifier}/submodel-descriptors/{submodelIdentifier}",
        status_code=204,
        operation_id="DeleteSubmodelDescriptorByIdThroughSuperpath",
        tags=shells_tag,
    )
    async def delete_nested(aasIdentifier: str, submodelIdentifier: str, request: Request) -> Response:
        callers = authenticate(request)
        aas_id = _decode(aasIdentifier, "aasIdentifier")
        sm_id = _decode(submodelIdentifier, "submodelIdentifier")
        shell = _shell_or_404(aas_id)
        authorize(request, callers, shell)
        nested = list(shell.get("submodelDescriptors") or ())
        kept = [x for x in nested if x["id"] != sm_id]
        if len(kept) == len(nested):
            raise ApiError(404, f"submodel descriptor {sm_id!r} not found in {aas_id!r}")
        if kept:
            shell["submodelDescriptors"] = kept
        else:
            shell.pop("submodelDescriptors", None)
        store.update_shell_body(shell)
        return Response(status_code=204)

    # ---------------------------------------------------------------------------------------------- submodels

    @app.get("/submodel-descriptors", operation_id="GetAllSubmodelDescriptors", tags=submodels_tag)
    async def list_submodels(request: Request) -> Response:
        q = request.query_params
        limit = parse_limit(q.get("limit"))
        cursor = parse_cursor(q.get("cursor"))
        bodies, last = store.list_submodels(
            limit=limit, cursor=cursor, semantic_id=q.get("semanticId") or None
        )
        return json_response(
            paged_body([b.encode("utf-8") for b in bodies], make_cursor(last) if last else None)
        )

    @app.post(
        "/submodel-descriptors", status_code=201, operation_id="PostSubmodelDescriptor", tags=submodels_tag
    )
    async def post_submodel(request: Request) -> Response:
        authenticate(request)
        ttl = _ttl(request)
        sd = _submodel_body(await read_json_body(request))
        try:
            _, expires = store.put_submodel(sd, ttl, create_only=True)
        except AlreadyExists:
            raise ApiError(409, f"submodel descriptor {sd['id']!r} already exists") from None
        location = f"/submodel-descriptors/{b64url_encode(sd['id'])}"
        return json_response(json_bytes(sd), 201, _lease_headers(expires, location))

    @app.get(
        "/submodel-descriptors/{submodelIdentifier}",
        operation_id="GetSubmodelDescriptorById",
        tags=submodels_tag,
    )
    async def get_submodel(submodelIdentifier: str) -> Response:
        sm_id = _decode(submodelIdentifier, "submodelIdentifier")
        body = store.get_submodel_json(sm_id)
        if body is None:
            raise ApiError(404, f"submodel descriptor {sm_id!r} not found")
        return json_response(body.encode("utf-8"))

    @app.put(
        "/submodel-descriptors/{submodelIdentifier}",
        status_code=204,
        operation_id="PutSubmodelDescriptorById",
        tags=submodels_tag,
    )
    async def put_submodel(submodelIdentifier: str, request: Request) -> Response:
        authenticate(request)
        sm_id = _decode(submodelIdentifier, "submodelIdentifier")
        ttl = _ttl(request)
        sd = _submodel_body(await read_json_body(request))
        if sd["id"] != sm_id:
            raise ApiError(400, "the descriptor's id does not match the submodelIdentifier in the path")
        created, expires = store.put_submodel(sd, ttl)
        if created:
            return json_response(
                json_bytes(sd), 201, _lease_headers(expires, f"/submodel-descriptors/{submodelIdentifier}")
            )
        return Response(status_code=204, headers=_lease_headers(expires))

    @app.delete(
        "/submodel-descriptors/{submodelIdentifier}",
        status_code=204,
        operation_id="DeleteSubmodelDescriptorById",
        tags=submodels_tag,
    )
    async def delete_submodel(submodelIdentifier: str, request: Request) -> Response:
        authenticate(request)
        sm_id = _decode(submodelIdentifier, "submodelIdentifier")
        if not store.delete_submodel(sm_id):
            raise ApiError(404, f"submodel descriptor {sm_id!r} not found")
        return Response(status_code=204)

    return app


class FastLookups:
    """ASGI fast path for the two lookups agents make all the time, in front of the FastAPI app.

    ``GET /shell-descriptors/{aasIdentifier}`` and ``GET /shell-descriptors?capability=...`` (optionally with
    ``limit``/``cursor``) are answered straight from the store's cached JSON text, skipping FastAPI's
    routing and dependency machinery (~0.3 ms a request here), with a ``Server-Timing: app;dur=<ms>`` header
    telling how long the registry itself took. Anything else — other routes, other query
    parameters, malformed input, unknown ids — falls through to the FastAPI app, which owns every error
    answer; the fast path never produces an error itself.
    """

    _PREFIX = "/shell-descriptors/"

    def __init__(self, app: Any, store: RegistryStore) -> None:
        self.app = app
        self.store = store

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            started = time.perf_counter()
            body = self._lookup(scope)
            if body is not None:
                took = f"app;dur={(time.perf_counter() - started) * 1000:.3f}".encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"server-timing", took),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    def _lookup(self, scope: dict[str, Any]) -> bytes | None:
        path: str = scope["path"]
        try:
            if (
                path.startswith(self._PREFIX)
                and "/" not in path[len(self._PREFIX) :]
                and not scope["query_string"]
            ):
                text = self.store.get_shell_json(b64url_decode(path[len(self._PREFIX) :]))
                return text.encode("utf-8") if text is not None else None
            if path == "/shell-descriptors" and scope["query_string"]:
                from urllib.parse import parse_qs

                query = parse_qs(scope["query_string"].decode("latin-1"), strict_parsing=True)
                if (
                    "capability" not in query
                    or not set(query) <= {"capability", "limit", "cursor"}
                    or any(len(v) != 1 for v in query.values())
                ):
                    return None
                limit = parse_limit(query.get("limit", [None])[0])
                cursor = parse_cursor(query.get("cursor", [None])[0])
                bodies, last = self.store.list_shells(
                    limit=limit, cursor=cursor, capability=query["capability"][0]
                )
                return paged_body([b.encode("utf-8") for b in bodies], make_cursor(last) if last else None)
        except (ApiError, MalformedIdentifier, ValueError, UnicodeError):
            return None  # FastAPI answers it, with the spec's error body
        return None


class RegistryServer:
    """The registry service inside the running event loop, with its lease-purging task.

    ``base_url = await RegistryServer(db_url).start(port=0)`` ... ``await server.stop()``.
    """

    def __init__(
        self,
        db_url: str | None = None,
        *,
        store: RegistryStore | None = None,
        cache_ttl: float = 1.0,
        purge_interval: float = 5.0,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        log_level: str = "warning",
        tokens: RunTokens | None = None,
    ) -> None:
        self._owns_store = store is None
        self.store = store if store is not None else RegistryStore(db_url, cache_ttl=cache_ttl)
        self.app = create_registry_app(self.store, tokens=tokens, max_body_bytes=max_body_bytes)
        self.purge_interval = purge_interval
        self._http = InLoopServer(FastLookups(self.app, self.store), log_level=log_level)
        self._purger: asyncio.Task[None] | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        url = await self._http.start(host, port)
        self._purger = asyncio.create_task(self._purge_loop(), name="registry-purge")
        return url

    async def stop(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purger
            self._purger = None
        await self._http.stop()
        if self._owns_store:
            self.store.close()

    @property
    def base_url(self) -> str:
        return self._http.base_url

    @property
    def refused(self) -> Counter[str]:
        """Refused writes by HTTP status."""
        return self.app.state.refused

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(self.purge_interval)
            try:
                purged = self.store.purge_expired()
                if purged:
                    log.info("purged %d expired descriptors", purged)
            except Exception:  # keep purging later; a transient DB error must not stop the loop
                log.exception("purging expired descriptors failed")

    async def __aenter__(self) -> RegistryServer:
        if not self._http.running:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve_registry(host: str, port: int, db_url: str | None) -> None:
    """Run the registry until cancelled (``twinbid registry serve``). ``db_url`` None = SQLite file in the cwd.

    Writes need the run's tokens: set ``TWINBID_HTTP_SECRET`` (the ``http_secret`` of the run's
    ``credentials.json``) and ``TWINBID_NS``; without them the registry is read-only."""
    tokens = tokens_from_env()
    if tokens is None:
        log.warning("%s/%s not set: the registry accepts no writes", SECRET_ENV, NS_ENV)
    server = RegistryServer(db_url, log_level="info", tokens=tokens)
    url = await server.start(host, port)
    log.info("AAS registry listening on %s (database %s)", url, server.store.engine.url.render_as_string())
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


def serve(host: str = "127.0.0.1", port: int = 8080, db_url: str | None = None) -> None:
    """Blocking entry point: run :func:`serve_registry` in a fresh event loop until Ctrl-C."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_registry(host, port, db_url))
